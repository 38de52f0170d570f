"""The small interface every KV-compression method implements.

A method is a dataclass whose fields are its hyper-parameters (with the paper's defaults). What the cache manager
(:mod:`keepkv.cache.manager`) uses of it:

- :meth:`CompressionMethod.compress` — shrink one layer's cache to a budget: :meth:`~CompressionMethod.select`
  the kept / evicted split, :meth:`~CompressionMethod.merge` evicted entries into kept ones (merging methods),
  then pack the kept entries (:meth:`~keepkv.cache.compressed.CompressedLayerCache.packed_entries`);
- budgets: :meth:`~CompressionMethod.plan_layer_budgets` (per-layer budgets known in advance, e.g. PyramidKV),
  :meth:`~CompressionMethod.measure_layer_budgets` (measured at the first compression, e.g. D2O),
  :meth:`~CompressionMethod.slots_for_budget` (slots per head a layer needs: more than its budget when heads get
  different lengths, Ada-KV) and :attr:`~CompressionMethod.protected_entries` (the least budget);
- what its caches record: :attr:`~CompressionMethod.query_window` (observation-window rows) and
  :attr:`~CompressionMethod.needs_accumulated_attention`;
- :meth:`~CompressionMethod.bind_model` (methods that read weights: CriticalKV's ``W_O``),
  :meth:`~CompressionMethod.reset_state` (per-generation state: D2O's threshold),
  :meth:`~CompressionMethod.for_query_agnostic` (the method to use before the question is known) and
  :meth:`~CompressionMethod.options` (every hyper-parameter, for result rows).

What a method writes: usually only :meth:`~CompressionMethod.scores` (``[batch, kv_heads, capacity]`` float32,
higher = keep; :meth:`~CompressionMethod.ranking_scores` when the scores depend on which slots a compression
protects). The shared :meth:`~CompressionMethod.select` protects attention sinks (``position < sinks``) and
the recent window (:meth:`~CompressionMethod.recent_window` newest positions, the newest token included), then
keeps the highest scores up to the budget (per head, or :meth:`~CompressionMethod.plan_head_budgets` entries),
ties broken by slot = position order (a stable sort), so selection is deterministic. Merging methods also write
:meth:`~CompressionMethod.merge`; a method with its own selection (CriticalKV's two stages) overrides ``select``.

Composition is by objects, not by this class: :class:`keepkv.cache.compose.Selected` takes one method's
selection and another's merge (``snapkv+keepkv``).

Compression runs per layer (all batch rows and heads at once, no Python loop over heads or tokens), at the end of
prefill and whenever the cache has no room left (see :mod:`keepkv.cache.manager`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from keepkv.cache.compressed import CompressedLayerCache
from keepkv.checks import is_integer, is_real, shown
from keepkv.errors import KeepKVError

if TYPE_CHECKING:
    from torch import nn


def _checked_option(method: str, option: str, default: Any, value: Any) -> Any:
    """``value`` in the type of ``default``, or raise unless it has that kind (int: non-negative integer, stored as
    a Python ``int``; float: finite real number, ints accepted, stored as a Python ``float``; str: string). So
    ``value_norm_power=1`` and ``1.0`` build one method with one ``options()`` (and numpy numbers become Python
    ones). Options with other defaults (bools, ``None``) are left to the method, unchanged."""
    if isinstance(default, bool):
        return value
    if isinstance(default, int):
        if not (is_integer(value) and value >= 0):
            raise KeepKVError(f"{method}: option {option} must be a non-negative integer, got {shown(value)}")
        return int(value)
    if isinstance(default, float):
        if not (is_real(value) and math.isfinite(value)):
            raise KeepKVError(f"{method}: option {option} must be a finite number (e.g. {default!r}), "
                              f"got {shown(value)}")
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise KeepKVError(f"{method}: option {option} must be a str (e.g. {default!r}), got {shown(value)}")
    return value


def recent_entries(budget: int | None, recent_fraction: float, window: int, sinks: int) -> int:
    """Newest entries protected at a compression to ``budget``: ``floor(recent_fraction * budget)``, at least
    ``window`` (and 1), at most ``budget - sinks``."""
    least = max(window, 1)
    if budget is None:
        return least
    return max(least, min(math.floor(recent_fraction * budget + 1e-9), budget - sinks))


def split_by_order(cache: CompressedLayerCache, order: Tensor, live: Tensor, budget: int,
                   head_budgets: Tensor | None, width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Keep the first ``budget`` slots of ``order [batch, kv_heads, capacity]`` (each head's first
    ``head_budgets`` of at most ``width`` columns when given); see :meth:`CompressionMethod.select` for the
    returned tensors."""
    if head_budgets is None:
        kept_slots, evicted_slots = order[..., :budget], order[..., budget:]
        return kept_slots, live.gather(2, kept_slots), evicted_slots, live.gather(2, evicted_slots)
    # per-head budgets: a head never keeps the whole buffer, so every head has a slot that is not kept
    width = min(width, cache.capacity)
    rank = torch.arange(cache.capacity, device=order.device)
    head_budgets = head_budgets.clamp(0, min(width, cache.capacity - 1))
    kept_by_rank = live.gather(2, order) & (rank < head_budgets[..., None])
    kept = torch.zeros_like(live).scatter(2, order, kept_by_rank)
    # evicted list of fixed width (every slot): empty slots, then evicted ones, in slot order; the kept slots'
    # places are filled with the head's first non-kept slot (invalid), so a merge that empties every listed
    # slot (keepkv.ops.merge.merge_into_kept) never touches a kept entry
    category = torch.where(kept, 2, torch.where(live, 1, 0))
    listing = torch.sort(category, dim=-1, stable=True).indices
    listed_category = category.gather(2, listing)
    evicted_slots = torch.where(listed_category == 2, listing[..., :1], listing)
    return order[..., :width], kept_by_rank[..., :width], evicted_slots, listed_category == 1


@dataclass
class CompressionMethod:
    """Base of all methods. ``sinks``: first positions always kept; ``window``: newest positions always kept
    (also the number of recent queries every cache remembers as its observation window)."""

    name: ClassVar[str] = "base"
    compresses_during_decode: ClassVar[bool] = True
    accumulates_attention: ClassVar[bool] = False  # the cache must keep per-slot accumulated attention
    is_eviction_selector: ClassVar[bool] = True  # may pick the evicted set for a merging method (X+keepkv)
    keeps_everything: ClassVar[bool] = False  # the full cache (keepkv.cache.methods.full): never compressed
    layer_free: ClassVar[bool] = False
    """True when the method's selection and merge depend on the layer only through the cache and the budget (no
    per-layer state, no layer-indexed budgets inside ``select``; a layer's weights only through
    :meth:`output_projection_for`, handed over on the cache): its whole compression may then be compiled once for
    every layer (see :attr:`compiles_whole_compression`)."""
    sinks: int = 4
    window: int = 32

    def __post_init__(self) -> None:
        """Check every option against the type of its default and store it in that type
        (:func:`_checked_option`): an ``int`` option takes a non-negative integer, a ``float`` option a finite real
        number (an int is fine and becomes a float; a bool or a string is not), a ``str`` option a string.
        Subclasses check ranges and choices after calling this."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            checked = _checked_option(self.name, field.name, field.default, value)
            if checked is not value:
                setattr(self, field.name, checked)
        self._compiled_entries = None  # torch.compile of _layer_free_entries, made on first use

    # ---- what the cache manager reads -------------------------------------------------------------------------
    @property
    def protected_entries(self) -> int:
        """Entries a budget must at least hold: sinks + recent window (which includes the newest token)."""
        return self.sinks + max(self.window, 1)

    @property
    def query_window(self) -> int:
        """Rows of the caches' observation window: this method's ``window``, at least 1."""
        return max(self.window, 1)

    @property
    def needs_accumulated_attention(self) -> bool:
        """Whether caches for this method must accumulate attention."""
        return self.accumulates_attention

    @property
    def compiles_whole_compression(self) -> bool:
        """Whether :meth:`compress` runs as one compiled graph when asked to run compiled (:attr:`layer_free`
        methods)."""
        return self.layer_free

    def plan_layer_budgets(self, budget: int, num_layers: int) -> list[int]:
        """Entries per KV head of each layer for a requested ``budget`` (default: ``budget`` everywhere)."""
        return [budget] * num_layers

    def measure_layer_budgets(self, budget: int, caches: Sequence[CompressedLayerCache]) -> list[int] | None:
        """Per-layer budgets decided from the caches' contents at the first compression of a generation, or
        ``None`` to keep :meth:`plan_layer_budgets` (default)."""
        return None

    def slots_for_budget(self, layer_budget: int) -> int:
        """Slots per KV head a layer with ``layer_budget`` needs after compression (default: the budget)."""
        return layer_budget

    def bind_model(self, network: nn.Module) -> None:
        """Called once with the model (a :class:`~keepkv.models.transformer.Transformer`) for methods that read
        its weights; default: nothing."""

    def output_projection_for(self, layer: int) -> Tensor | None:
        """``layer``'s bound ``o_proj.weight`` when this method's compression reads it (CriticalKV, KeepKV's
        ``value_weighting="output"``), else ``None`` (default: the cache alone)."""
        return None

    def reset_state(self) -> None:
        """Forget per-generation state; called when the manager allocates caches for a new generation."""

    def for_query_agnostic(self) -> CompressionMethod:
        """The method to compress with when the question is not in the compressed prompt (it comes afterwards:
        ``model.prefill(context)`` without a question, the eval's query-agnostic protocol). Default: ``self``;
        a method whose best score differs between the two settings returns a configured copy (KeepKV)."""
        return self

    def options(self) -> dict[str, Any]:
        """Every hyper-parameter (the dataclass fields), defaults included."""
        return dataclasses.asdict(self)

    def compress(self, cache: CompressedLayerCache, layer: int, budget: int, compiled: bool = False) -> None:
        """Shrink ``cache`` to at most ``budget`` live entries per (batch row, KV head).

        ``compiled`` (the cache manager passes :attr:`~keepkv.cache.manager.CacheManager.compresses_compiled`:
        true when the model runs compiled and the layers share one budget): with
        :attr:`compiles_whole_compression` the selection, the merge and the compaction run as one compiled graph
        (:meth:`compressed_entries` under ``torch.compile``: one graph per (method, cache shapes, budget) whatever
        the layer, no host sync inside); otherwise the merge alone runs its compiled op. A method that reads the
        layer's ``o_proj`` weight (:meth:`output_projection_for`) finds it on ``cache.output_projection`` while the
        compression runs: a tensor reached through an argument, not through the layer index, so the compiled
        graph stays one for every layer."""
        weight = self.output_projection_for(layer)
        # a plain tensor view of the parameter (no copy): the cache is a module and would register a Parameter
        cache.output_projection = None if weight is None else weight.detach()
        try:
            if compiled and self.compiles_whole_compression:
                entries = self.compiled_compression()(self, cache, budget)
            else:
                entries = self.compressed_entries(cache, layer, budget, compiled=compiled)
        finally:
            cache.output_projection = None
        cache.store_packed(entries)

    def compressed_entries(self, cache: CompressedLayerCache, layer: int, budget: int,
                           compiled: bool = False) -> dict[str, Tensor]:
        """Select, merge (in place, into kept slots; ``compiled``: with the merge's compiled op) and return the
        compacted buffers (:meth:`CompressedLayerCache.packed_entries`); :meth:`compress` stores them."""
        with cache.reuse_window_scores():  # selection and merge reference share one window-score product
            kept_slots, kept_valid, evicted_slots, evicted_valid = self.select(cache, layer, budget)
            self.merge(cache, layer, kept_slots, kept_valid, evicted_slots, evicted_valid, compiled=compiled)
        return cache.packed_entries(kept_slots, kept_valid)

    def compiled_compression(self):
        """``torch.compile(fullgraph=True, dynamic=False)`` of the unbound :meth:`_layer_free_entries`, called as
        ``f(method, cache, budget)``; made on first use. The method is an argument, not a bound ``self``, so a
        copy that differs only in tensor-valued options (KeepKV's :meth:`for_query_agnostic`) may share this
        function and its graphs (dynamo guards on the attributes the trace reads, not on the object)."""
        if self._compiled_entries is None:
            self._compiled_entries = torch.compile(type(self)._layer_free_entries, fullgraph=True, dynamic=False)
        return self._compiled_entries

    def _layer_free_entries(self, cache: CompressedLayerCache, budget: int) -> dict[str, Tensor]:
        # layer-free: no layer index inside the graph. -1 is no layer, so a lookup by index (a weight the
        # compression did not hand over on the cache) fails loudly instead of reading layer 0's
        return self.compressed_entries(cache, -1, budget, compiled=True)

    # ---- what a method defines --------------------------------------------------------------------------------
    def scores(self, cache: CompressedLayerCache, layer: int) -> Tensor:
        """``[batch, kv_heads, capacity]`` float32 importance of each slot (higher = keep)."""
        raise KeepKVError(f"method {self.name!r} defines no scores")

    def ranking_scores(self, cache: CompressedLayerCache, layer: int, protected: Tensor) -> Tensor:
        """The scores :meth:`select` ranks by at a compression whose protected slots are ``protected``
        (:meth:`protected_mask` for its budget). Default: :meth:`scores`; a method whose scores depend on which
        slots a compression protects (KeepKV's pooling skips them) overrides this."""
        return self.scores(cache, layer)

    def merge(self, cache: CompressedLayerCache, layer: int, kept_slots: Tensor, kept_valid: Tensor,
              evicted_slots: Tensor, evicted_valid: Tensor, compiled: bool = False) -> None:
        """Fold evicted entries into kept ones, in place (default: nothing, i.e. plain eviction); ``compiled``: use
        the merge's compiled op where the method has one."""

    # ---- the shared selection ---------------------------------------------------------------------------------
    def recent_window(self, budget: int | None) -> int:
        """Newest positions protected at a compression to ``budget`` (default: ``window``, at least 1)."""
        return max(self.window, 1)

    def plan_head_budgets(self, cache: CompressedLayerCache, layer: int, budget: int, keep_priority: Tensor,
                          protected: Tensor, live: Tensor) -> Tensor | None:
        """``[batch, kv_heads]`` int64 entries each head keeps, or ``None`` for ``budget`` per head (default).

        ``keep_priority [batch, kv_heads, capacity]`` is the ranking :meth:`select` sorts by (``+inf`` protected,
        ``-inf`` empty)."""
        return None

    def protected_mask(self, cache: CompressedLayerCache, budget: int | None = None) -> Tensor:
        """``[batch, kv_heads, capacity]``: sinks and the recent window of each row (live slots only)."""
        live = torch.isfinite(cache.log_votes)
        newest = cache.positions.masked_fill(~live, -1).amax(dim=(1, 2), keepdim=True)
        recent = cache.positions > newest - self.recent_window(budget)
        return live & ((cache.positions < self.sinks) | recent)

    def keep_priority(self, cache: CompressedLayerCache, layer: int, budget: int, protected: Tensor,
                      live: Tensor) -> Tensor:
        """``[batch, kv_heads, capacity]`` float32 ranking: ``+inf`` protected, ``-inf`` empty, else the scores
        (NaN and infinities of the scores clamped to finite values)."""
        ranking = self.ranking_scores(cache, layer, protected).float().nan_to_num(nan=-torch.finfo(torch.float32).max)
        ranking = ranking.clamp(-torch.finfo(torch.float32).max, torch.finfo(torch.float32).max)
        ranking = torch.where(protected, float("inf"), ranking)
        return torch.where(live, ranking, -float("inf"))

    def select(self, cache: CompressedLayerCache, layer: int, budget: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(kept_slots, kept_valid, evicted_slots, evicted_valid)``, each ``[batch, kv_heads, n]``.

        With per-head budgets (:meth:`plan_head_budgets`) ``kept_slots`` has :meth:`slots_for_budget` columns of
        which each head's first ``head_budget`` are valid, and ``evicted_slots`` has one column per slot: the
        evicted ones valid, the rest padding that points at a slot that is empty or evicted (never a kept one)."""
        live = torch.isfinite(cache.log_votes)
        protected = self.protected_mask(cache, budget)
        ranking = self.keep_priority(cache, layer, budget, protected, live)
        order = torch.sort(ranking, dim=-1, descending=True, stable=True).indices
        head_budgets = self.plan_head_budgets(cache, layer, budget, ranking, protected, live)
        return split_by_order(cache, order, live, budget, head_budgets, self.slots_for_budget(budget))
