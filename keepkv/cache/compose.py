"""Method composition by objects: one method selects, another merges.

``Selected(selector=SnapKV(), merger=KeepKV())`` is the method the name ``"snapkv+keepkv"`` builds
(:func:`keepkv.cache.methods.make_method` is only the parser of that name): the selector decides everything about
*which* entries stay — budgets (:meth:`plan_layer_budgets`, :meth:`measure_layer_budgets`,
:meth:`slots_for_budget`), protection and the kept / evicted split (:meth:`select`) — and the merger folds what
was evicted into what was kept (:meth:`merge`). The caches record what both read (the longer observation window,
accumulated attention if either needs it). When to compress and whether a compression runs as one compiled graph
are the merger's (KeepKV compresses during decoding whatever its selector does alone).

Ada-KV head budgets are not a composition but an option of the scorers that take budget options
(``head_budgets="adakv"``, :mod:`keepkv.cache.budgets`); ``"adakv-snapkv"`` is ``SnapKV(head_budgets="adakv")``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from keepkv.cache.compressed import CompressedLayerCache
from keepkv.cache.policy import CompressionMethod
from keepkv.errors import KeepKVError

if TYPE_CHECKING:
    from torch import nn


def _merger_attribute(attribute: str) -> property:
    """A read-only attribute of :class:`Selected` that is its merger's."""
    return property(lambda self: getattr(self.merger, attribute), doc=f"The merger's ``{attribute}``.")


class Selected(CompressionMethod):
    """``selector``'s kept / evicted split, ``merger``'s merge (module docstring). ``name`` is the merger's (the
    entries it writes carry its votes); :meth:`options` are the merger's plus ``selector: {name, ...}``."""

    is_eviction_selector = False  # a composition does not select for another merger

    def __init__(self, selector: CompressionMethod, merger: CompressionMethod) -> None:
        if not selector.is_eviction_selector:
            raise KeepKVError(f"{selector.name!r} cannot select for {merger.name!r}: it is not a plain eviction method")
        self.selector, self.merger = selector, merger
        self._compiled_entries = None

    def __repr__(self) -> str:
        return f"Selected(selector={self.selector!r}, merger={self.merger!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Selected):
            return NotImplemented
        return (self.selector, self.merger) == (other.selector, other.merger)

    __hash__ = None  # mutable, like the dataclass methods

    # ---- the merger's ------------------------------------------------------------------------------------------
    name = _merger_attribute("name")  # type: ignore[assignment]
    sinks = _merger_attribute("sinks")  # type: ignore[assignment]
    window = _merger_attribute("window")  # type: ignore[assignment]  (its reference queries; the selector protects)
    compresses_during_decode = _merger_attribute("compresses_during_decode")  # type: ignore[assignment]

    @property
    def stats(self) -> Any:
        """The merger's merge statistics (KeepKV's :class:`~keepkv.ops.merge.MergeStats`)."""
        return self.merger.stats

    def merge(self, cache: CompressedLayerCache, layer: int, kept_slots: Tensor, kept_valid: Tensor,
              evicted_slots: Tensor, evicted_valid: Tensor, compiled: bool = False) -> None:
        self.merger.merge(cache, layer, kept_slots, kept_valid, evicted_slots, evicted_valid, compiled=compiled)

    # ---- the selector's ----------------------------------------------------------------------------------------
    @property
    def protected_entries(self) -> int:
        return self.selector.protected_entries

    def plan_layer_budgets(self, budget: int, num_layers: int) -> list[int]:
        return self.selector.plan_layer_budgets(budget, num_layers)

    def measure_layer_budgets(self, budget: int, caches: Sequence[CompressedLayerCache]) -> list[int] | None:
        return self.selector.measure_layer_budgets(budget, caches)

    def slots_for_budget(self, layer_budget: int) -> int:
        return self.selector.slots_for_budget(layer_budget)

    def scores(self, cache: CompressedLayerCache, layer: int) -> Tensor:
        return self.selector.scores(cache, layer)

    def ranking_scores(self, cache: CompressedLayerCache, layer: int, protected: Tensor) -> Tensor:
        return self.selector.ranking_scores(cache, layer, protected)

    def protected_mask(self, cache: CompressedLayerCache, budget: int | None = None) -> Tensor:
        return self.selector.protected_mask(cache, budget)

    def select(self, cache: CompressedLayerCache, layer: int, budget: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.selector.select(cache, layer, budget)

    # ---- both --------------------------------------------------------------------------------------------------
    @property
    def query_window(self) -> int:
        return max(self.merger.query_window, self.selector.query_window)

    @property
    def needs_accumulated_attention(self) -> bool:
        return self.merger.needs_accumulated_attention or self.selector.needs_accumulated_attention

    @property
    def compiles_whole_compression(self) -> bool:
        return self.merger.layer_free and self.selector.layer_free

    def output_projection_for(self, layer: int) -> Tensor | None:
        """The selector's (CriticalKV reads the layer's ``o_proj``; a merger only merges, it never ranks)."""
        return self.selector.output_projection_for(layer)

    def bind_model(self, network: nn.Module) -> None:
        self.selector.bind_model(network)
        self.merger.bind_model(network)

    def reset_state(self) -> None:
        self.selector.reset_state()
        self.merger.reset_state()

    def for_query_agnostic(self) -> CompressionMethod:
        """The selector ranks, so only its query-agnostic form matters (``self`` when it has none)."""
        selector = self.selector.for_query_agnostic()
        return self if selector is self.selector else Selected(selector, self.merger)

    def options(self) -> dict[str, Any]:
        return {**self.merger.options(), "selector": {"name": self.selector.name, **self.selector.options()}}
