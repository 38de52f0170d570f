"""When and into what the caches are sized and compressed (host-side bookkeeping, no device syncs).

One :class:`CacheManager` per generation engine, for every method: the full cache is a method like the others
(:class:`~keepkv.cache.methods.full.FullCache`, ``kv_budget=None`` or ``1.0``) that is never compressed. Every
call that may change the caches (:meth:`~CacheManager.allocate`, :meth:`~CacheManager.make_room`,
:meth:`~CacheManager.end_prefill`, :meth:`~CacheManager.start_from_prefill`) returns them: the one way to get
the caches after a call (the engine attaches what it gets; a new list means new caches).

- Full cache: one buffer per layer big enough for the prompt and every new token. With an observing
  ``FullCache(observe_window=...)`` it is the shared prefill of an evaluation (its caches also record the score
  state the methods of a comparison read).
- Compressed cache: a budget ``B`` (entries per KV head, from ``kv_budget`` and the prompt length) and a method.

  * Prefill runs in chunks into a buffer of ``B + chunk`` slots (``chunk``: the widest prefill forward the engine
    asks room for, :meth:`keepkv.generate.GenerationEngine.prefill_room`: the long chunk of an automatic engine);
    whenever the next chunk would not fit, the method compresses every layer to ``B``. At the end of prefill the cache is compressed to ``B`` (for prompts of
    at most ``B + chunk`` tokens this is the only compression: the papers' "compress once after prefill").
  * Decoding then continues in a buffer of ``B + W`` slots (``W = decode_slack``); when it is full the method
    compresses back to ``B``: ``W = 1`` is the every-step schedule of H2O / TOVA / the KeepKV paper, a larger
    ``W`` amortises the compression over ``W`` steps. Methods that compress only once (SnapKV, PyramidKV) let
    the cache grow by the new tokens instead.

  Peak cache memory is therefore ``max(B + chunk, B + W)`` slots per head, whatever the prompt length (a
  compiled engine pads the last chunk to a whole one: a prompt of at most ``B + chunk`` tokens, compressed only
  at the end, then gets its chunk-padded length, less than ``B + 2 chunk``, so that compiled and eager engines
  compress at the same points). A compression made before the whole prompt is read (mid-prompt) cannot see a
  question at the prompt's end: it uses the method's query-agnostic form
  (:meth:`~keepkv.cache.policy.CompressionMethod.for_query_agnostic`); the compression at the end of prefill and
  those of decoding use the method itself.
  ``prefill_compression="once"`` instead keeps the whole prompt through prefill (the full cache's memory for it)
  and compresses once at its end, as the official KeepKV / SnapKV code and kvpress do: every kept entry is then
  chosen by the prompt's last queries (a question at the end of a long prompt sees the whole context).
  With per-layer budgets ``B_l`` (PyramidKV, D2O; their mean is ``B``) every layer's buffer is padded to one
  capacity, ``max_l slots_l + chunk`` / ``max_l slots_l + W``: layer ``l`` still holds at most ``B_l`` live
  entries after a compression (its other slots are empty, ``log_votes = -inf``, masked in attention), but all
  layers have the same shapes, so the compiled decode step compiles the decoder block once and reuses it for
  every layer (:func:`keepkv.compile_limits.repeated_region`; one shape per layer would exceed dynamo's reuse
  limit and compile for minutes) and the prefill attention kernel compiles once. The price is resident memory:
  ``L (max_l slots_l + room)`` slots instead of ``sum_l (slots_l + room)``. Head-adaptive budgets (Ada-KV) need
  ``slots_l > B_l`` slots per head (see :mod:`keepkv.cache.budgets`). Compiled compression ops (KeepKV's merge)
  would still compile one graph per distinct layer budget, so a generation with per-layer budgets compresses
  eagerly (:attr:`CacheManager.compresses_compiled`; the decode step and the prefill kernel stay compiled).

  Capacity never exceeds what the generation can hold: the budget is capped at ``prompt + max_new_tokens``
  entries (:func:`keepkv.cache.budgets.entries_for_budget`) and the prefill buffer at the chunk-padded prompt, so
  a budget at least as long as the prompt behaves like the full cache (nothing compressed at prefill).

  A batch shares one budget: ``B`` comes from the longest prompt of the batch, so with a fractional budget a
  shorter row keeps up to ``ceil(f * longest)`` entries, more than ``ceil(f * its length)``
  (``row_budgets`` records what each row would have kept alone).
"""

from __future__ import annotations

import torch
from torch import Tensor

from keepkv.cache.budgets import entries_for_budget
from keepkv.cache.compressed import CompressedLayerCache
from keepkv.cache.kv_cache import LayerKVCache
from keepkv.cache.methods.full import FullCache
from keepkv.cache.policy import CompressionMethod
from keepkv.distributed.heads import HeadShard, attach_head_shard
from keepkv.distributed.tp import head_shard_of
from keepkv.errors import KeepKVError
from keepkv.runtime import DEFAULT_RUNTIME, RuntimeOptions
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from keepkv.models.config import ModelConfig

PREFILL_COMPRESSION = ("chunked", "once")
DEFAULT_DECODE_SLACK = 64


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class CacheManager:
    """The caches of one generation engine, sized and compressed for ``method`` at ``kv_budget`` (see the module
    docstring for the schedule); ``method=None`` or a :class:`~keepkv.cache.methods.full.FullCache` is the full
    cache (``kv_budget`` ignored).

    Full cache: capacity = prompt (rounded up to whole chunks) + new tokens, rounded up to
    ``runtime.capacity_quantum`` (:class:`keepkv.runtime.RuntimeOptions`) so that prompts of similar lengths share
    one compiled decode graph; ``budget`` is ``None``, nothing is ever compressed.

    Compressed cache: layers may have different budgets (``method.plan_layer_budgets``: PyramidKV;
    ``method.measure_layer_budgets`` at the first compression: D2O) and need ``method.slots_for_budget(B_l)`` slots
    after compression (more than ``B_l`` with Ada-KV head budgets). Every layer's buffer has the same capacity,
    ``max_l slots_l + chunk`` in prefill (at most the chunk-padded prompt) and ``max_l slots_l + W`` in decode
    (:meth:`layer_capacity`), so the compiled graphs see one shape for every layer; ``layer_budgets``,
    ``layer_slots`` and ``cursors`` (host mirrors of the tensor cursors) are per layer. ``row_budgets``: the budget
    each batch row would have alone (``B`` is the longest row's; module docstring).

    ``compiled_ops``: whether compressions run the method's compiled ops (KeepKV's merge, a whole compiled
    compression), as they should with a compiled model (:attr:`compresses_compiled`). ``runtime``: the model's
    :class:`~keepkv.runtime.RuntimeOptions`. ``query_agnostic``: the question comes after the compressions, so the
    manager compresses with ``method.for_query_agnostic()``. ``prefill_buffer_budgets`` (``k``, default 1): the
    chunked prefill buffer holds ``k`` budgets plus a chunk (``k max_l slots_l + chunk`` slots) and compresses to
    the budgets when the next chunk would not fit, so a long prompt is compressed about ``k`` times less often
    (each compression then chooses among more entries, so the kept entries differ from ``k = 1``'s); the issue's
    memory bound allows ``k <= 3`` (weights + 3x budgeted cache + one chunk).
    """

    head_shard: HeadShard | None = None  # tensor parallelism: the rank's KV heads, set by bind_network

    def __init__(
        self, config: ModelConfig, dtype: torch.dtype, device: torch.device, method: CompressionMethod | None = None,
        kv_budget: float | int | None = None, decode_slack: int = DEFAULT_DECODE_SLACK,
        prefill_compression: str = "chunked", *,
        compiled_ops: bool = False, runtime: RuntimeOptions = DEFAULT_RUNTIME, prefill_buffer_budgets: int = 1,
        query_agnostic: bool = False,
    ) -> None:
        if isinstance(decode_slack, bool) or not isinstance(decode_slack, int) or decode_slack < 1:
            raise KeepKVError(f"decode_slack must be an integer >= 1, got {decode_slack!r}")
        if isinstance(prefill_buffer_budgets, bool) or not isinstance(prefill_buffer_budgets, int) \
                or prefill_buffer_budgets < 1:
            raise KeepKVError(f"prefill_buffer_budgets must be an integer >= 1, got {prefill_buffer_budgets!r}")
        if prefill_compression not in PREFILL_COMPRESSION:
            raise KeepKVError(f"prefill_compression must be one of {PREFILL_COMPRESSION}, got {prefill_compression!r}")
        method = FullCache() if method is None else method
        if kv_budget is None and not method.keeps_everything:
            raise KeepKVError(f"method {method.name!r} needs a kv_budget: a fraction in (0, 1] or an integer >= 1")
        self.config, self.dtype, self.device = config, dtype, device
        self.runtime = runtime
        self.method = method.for_query_agnostic() if query_agnostic else method
        # compressions made before the whole prompt is read cannot see a question at its end
        self.context_method = self.method.for_query_agnostic()
        if self.method.keeps_everything:  # the full cache ignores both (load()'s contract), so engines built from it
            decode_slack, prefill_compression = DEFAULT_DECODE_SLACK, "chunked"  # (chat, prefill) get the defaults
        self.kv_budget, self.decode_slack = kv_budget, decode_slack
        self.prefill_compression, self.prefill_buffer_budgets = prefill_compression, prefill_buffer_budgets
        self.compiled_ops = compiled_ops
        self.caches: list[LayerKVCache] = []
        self.budget: int | None = None
        self.compressions = 0
        self.layer_budgets: list[int] = []
        self.layer_slots: list[int] = []
        self.row_budgets: list[int] | None = None
        self.cursors: list[int] = []
        self.filled = 0
        self.budgets_measured = False
        self.room = 0
        self.max_new_tokens = 0
        self.decoding = False  # True after end_prefill: each layer then stays within its slots_l + room

    @property
    def keeps_everything(self) -> bool:
        """Whether this is the full cache (never compressed)."""
        return self.method.keeps_everything

    @property
    def compresses_during_prefill(self) -> bool:
        """Whether the prefill's results depend on its chunks (``prefill_compression="chunked"`` with a budget)."""
        return not self.keeps_everything and self.prefill_compression == "chunked"

    @property
    def methods(self) -> list[CompressionMethod]:
        """The method and, when it differs, its :attr:`context_method` (both get the model and the per-generation
        reset)."""
        return [self.method] if self.context_method is self.method else [self.method, self.context_method]

    @property
    def compresses_compiled(self) -> bool:
        """Whether compressions run the method's compiled ops: ``compiled_ops``, unless the layers have different
        budgets (compiled compression ops get one graph per budget, so a different budget in every layer would
        compile once per layer: PyramidKV + KeepKV, 30 graphs, minutes of inductor). Such generations compress
        eagerly; the decode step and the prefill kernel stay compiled."""
        return self.compiled_ops and len(set(self.layer_budgets)) <= 1

    def bind_network(self, network: nn.Module) -> None:
        """Give the method the model it compresses (CriticalKV reads each layer's ``o_proj`` weight)."""
        for each in self.methods:
            each.bind_model(network)
        self.head_shard = head_shard_of(network)  # tensor parallelism: this rank's KV heads (keepkv.distributed)

    # ---- caches -------------------------------------------------------------------------------------------------
    def _new_caches(self, batch_size: int, capacity: int | list[int]) -> list[LayerKVCache]:
        c = self.config
        capacities = capacity if isinstance(capacity, list) else [capacity] * c.num_layers
        method = self.method
        if method.keeps_everything and not (method.query_window or method.needs_accumulated_attention):
            return [LayerKVCache(batch_size, c.num_kv_heads, layer_capacity, c.head_dim, self.dtype, self.device)
                    for layer_capacity in capacities]
        caches = [
            CompressedLayerCache(
                batch_size, c.num_kv_heads, layer_capacity, c.head_dim, self.dtype, self.device,
                num_heads=c.num_heads, window=method.query_window, sliding_window=c.sliding_window,
                accumulate_attention=method.needs_accumulated_attention,
            )
            for layer_capacity in capacities
        ]
        if method.keeps_everything:
            return caches
        return attach_head_shard(self.head_shard, caches)  # tensor parallelism: cross-head reductions see every rank

    def capacity_for(self, padded_prompt_tokens: int, max_new_tokens: int) -> int:
        """The full cache's capacity for a prompt taking ``padded_prompt_tokens`` slots and ``max_new_tokens``."""
        return round_up(padded_prompt_tokens + max_new_tokens, self.runtime.capacity_quantum)

    def restore(self, capacity: int, budget: int | None = None, layer_budgets: list[int] | None = None,
                ) -> list[LayerKVCache]:
        """Empty one-row caches of ``capacity`` slots for a saved state (``keepkv.context``): the budgets it was
        compressed to are set as :meth:`allocate` would have set them. Returns the caches (not attached)."""
        if not self.keeps_everything:
            for each in self.methods:
                each.reset_state()
            self.budget = budget
            self._set_layer_budgets(list(layer_budgets or []))
        return self._new_caches(1, capacity)

    def entries_per_head(self) -> Tensor:
        """``[layers, batch, kv_heads]`` live entries (reads the device: for reports, not the hot path)."""
        return torch.stack([cache.live_entries() for cache in self.caches])

    def resident_bytes(self) -> int:
        return sum(cache.resident_bytes() for cache in self.caches)

    # ---- budgets ------------------------------------------------------------------------------------------------
    def _set_layer_budgets(self, layer_budgets: list[int]) -> None:
        if len(layer_budgets) != self.config.num_layers:
            raise RuntimeError(f"{self.method.name}: {len(layer_budgets)} layer budgets for "
                               f"{self.config.num_layers} layers")
        self.layer_budgets = list(layer_budgets)
        self.layer_slots = [self.method.slots_for_budget(b) for b in self.layer_budgets]

    def layer_capacity(self, room: int) -> int:
        """The capacity of every layer's buffer: ``max_l slots_l + room`` (one shape for all layers: the compiled
        decoder block and prefill kernel are then compiled once, see the module docstring)."""
        return max(self.layer_slots) + room

    def _budget_for(self, prompt_tokens: int, max_new_tokens: int) -> int:
        return entries_for_budget(self.kv_budget, prompt_tokens, self.method.protected_entries,
                                  max_new_tokens=max_new_tokens, max_context=self.config.max_position_embeddings)

    def _row_budget(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """The budget a row of ``prompt_tokens`` would have alone (never above the batch's ``budget``; a row too
        short for its own fractional budget gets the protected entries instead of an error)."""
        try:
            own = self._budget_for(prompt_tokens, max_new_tokens)
        except KeepKVError:
            own = self.method.protected_entries
        return min(own, self.budget)

    def _start_budgets(self, batch_size: int, prompt_tokens: int, max_new_tokens: int,
                       row_prompt_tokens: list[int] | None) -> None:
        """``B`` from ``prompt_tokens`` (the longest row; a :class:`~keepkv.errors.KeepKVError` for a budget below
        the protected entries or above the model's context), each row's own budget, the layer budgets, and the
        method's per-generation state reset."""
        self.budget = self._budget_for(prompt_tokens, max_new_tokens)
        lengths = row_prompt_tokens if row_prompt_tokens is not None else [prompt_tokens] * batch_size
        self.row_budgets = [self._row_budget(length, max_new_tokens) for length in lengths]
        self.max_new_tokens = max_new_tokens
        for each in self.methods:
            each.reset_state()
        self._set_layer_budgets(self.method.plan_layer_budgets(self.budget, self.config.num_layers))
        self.budgets_measured = False
        self.compressions = 0
        self.decoding = False

    def _measure_budgets(self) -> None:
        """Once per generation, before the first compression: budgets the method measures from the caches."""
        if self.budgets_measured:
            return
        self.budgets_measured = True
        with torch.inference_mode():
            measured = self.method.measure_layer_budgets(self.budget, self.caches)
        if measured is not None:
            self._set_layer_budgets(measured)

    # ---- the calls of the engine (each returns the caches to attach) --------------------------------------------
    def allocate(self, batch_size: int, padded_prompt_tokens: int, max_new_tokens: int, chunk: int,
                 prompt_tokens: int | None = None, row_prompt_tokens: list[int] | None = None) -> list[LayerKVCache]:
        """Caches for a batch whose prompt takes ``padded_prompt_tokens`` slots (chunk padding included) and
        ``prompt_tokens`` real tokens in its longest row (``row_prompt_tokens``: each row's own length, only for
        ``row_budgets``); ``chunk``: the widest forward the prefill will make (a compressed prefill buffer's room). A compressed cache's budgets are set (and a bad budget refused) before any allocation."""
        if self.keeps_everything:
            capacity = self.capacity_for(padded_prompt_tokens, max_new_tokens)
            if self.caches and self.caches[0].keys.shape[0] == batch_size and self.caches[0].capacity == capacity:
                for cache in self.caches:
                    cache.reset()
            else:
                self.caches = self._new_caches(batch_size, capacity)
            self.filled, self.cursors = 0, [0] * self.config.num_layers
            return self.caches
        prompt_tokens = padded_prompt_tokens if prompt_tokens is None else prompt_tokens
        self._start_budgets(batch_size, prompt_tokens, max_new_tokens, row_prompt_tokens)
        self.filled, self.cursors = 0, [0] * self.config.num_layers
        slots = max(self.layer_slots)
        self.room = chunk + (self.prefill_buffer_budgets - 1) * slots  # prefill buffer: k slots + chunk
        # a prompt of at most slots + room tokens is not compressed during prefill: it gets its padded length, the
        # capacity of the full cache (a compiled engine pads the last chunk to a whole one, so this may pass
        # slots + chunk by less than a chunk; capping it would make a compiled engine compress where an eager one
        # does not). prefill_compression="once" keeps the whole prompt (the full cache's prefill memory) and
        # compresses once, in end_prefill
        capacity = max(slots, padded_prompt_tokens)
        if self.prefill_compression == "chunked" and prompt_tokens > slots + self.room:
            capacity = min(slots + self.room, capacity)
        self.caches = self._new_caches(batch_size, capacity)
        return self.caches

    def wrote(self, new_tokens: int) -> None:
        """``new_tokens`` more slots were written in every layer."""
        self.cursors = [cursor + new_tokens for cursor in self.cursors]
        self.filled = max(self.cursors)

    def start_from_prefill(self, source: list[LayerKVCache], prompt_tokens: int, max_new_tokens: int,
                           compress: bool = True) -> list[LayerKVCache]:
        """Continue from a prefill made elsewhere and shared by several methods (evaluation; the protocol of
        "prefill with the full cache, then compress once", as kvpress does; a chat's next turn).

        ``source``: one cache per layer holding the whole prompt (``prompt_tokens`` tokens per row; for a
        compressing method a :class:`CompressedLayerCache` with the score state it reads: an observation window at
        least ``method.query_window`` long, accumulated attention if ``method.needs_accumulated_attention``); it is
        not modified. Its entries are copied into new caches. The full cache gets room for ``max_new_tokens`` more
        tokens and never compresses (``compress`` is ignored). A compressed cache gets its budgets as in
        :meth:`allocate` (``B`` from ``prompt_tokens``), and with ``compress=True`` the method compresses the copies
        to the budget and moves them into the decode buffers exactly like :meth:`end_prefill` (room for
        ``max_new_tokens`` more tokens for compress-once methods, else ``decode_slack``). With ``compress=False``
        the copies keep every entry and get ``max_new_tokens`` slots of room; :meth:`compress_inside_next_forward`
        then compresses them. Returns the caches to attach.
        """
        batch = source[0].keys.shape[0]
        if self.keeps_everything:
            self.caches = self._new_caches(batch, self.capacity_for(source[0].capacity, max_new_tokens))
            with torch.inference_mode():
                for old, new in zip(source, self.caches):
                    for name in ("keys", "values", "log_votes", "positions"):
                        getattr(new, name)[:, :, : old.capacity] = getattr(old, name)
                    new.cursor.copy_(old.cursor)
            self.filled = int(source[0].cursor.max())
            self.cursors = [self.filled] * len(source)
            return self.caches
        self._start_budgets(batch, prompt_tokens, max_new_tokens, None)
        room = 0 if compress else max_new_tokens
        self.caches = self._new_caches(batch, max(old.capacity for old in source) + room)
        with torch.inference_mode():
            for old, new in zip(source, self.caches):
                old.copy_into(new)
        self.cursors = [int(old.cursor.max()) for old in source]
        self.filled = max(self.cursors)
        self.room = room
        if compress:
            self.end_prefill()
        return self.caches

    def make_room(self, new_tokens: int) -> list[LayerKVCache]:
        """Make ``new_tokens`` more fit. The full cache checks its capacity; a compressed cache compresses every
        layer to its budget when they would not fit in some layer. Returns the caches (new ones only when measured
        layer budgets re-size them at the first compression). A compression inside prefill runs before the rest of
        the prompt is read, so it uses :attr:`context_method`."""
        if self.keeps_everything:
            if self.filled + new_tokens > self.caches[0].capacity:
                raise RuntimeError(f"cache overflow: {self.filled} + {new_tokens} > {self.caches[0].capacity} slots")
            return self.caches
        if self._fits(new_tokens):
            return self.caches
        self.compress_all(self.method if self.decoding else self.context_method)
        with torch.inference_mode():
            self._resize(self.room)
        if not self._fits(new_tokens):
            raise RuntimeError(f"cache overflow after compression: {self.cursors} + {new_tokens} slots")
        return self.caches

    def end_prefill(self) -> list[LayerKVCache]:
        """The prompt is in. The full cache is unchanged; a compressed cache is compressed to its budgets and moved
        into the decode buffers (``max_l slots_l + W`` slots, or ``max_l slots_l + max_new`` for methods that
        compress only once). Returns the caches."""
        if self.keeps_everything:
            return self.caches
        self._measure_budgets()
        if any(cursor > budget for cursor, budget in zip(self.cursors, self.layer_budgets)):
            self.compress_all()
        self.room = self.decode_slack if self.method.compresses_during_decode else max(self.max_new_tokens, 1)
        self.decoding = True
        decode_caches = self._new_caches(self.caches[0].keys.shape[0], self.layer_capacity(self.room))
        with torch.inference_mode():
            for old, new in zip(self.caches, decode_caches):
                old.copy_into(new)
        self.cursors = [min(cursor, cache.capacity) for cursor, cache in zip(self.cursors, decode_caches)]
        self.filled = max(self.cursors)
        self.caches = decode_caches
        return self.caches

    # ---- compression --------------------------------------------------------------------------------------------
    def compress_all(self, method: CompressionMethod | None = None) -> None:
        """Compress every layer to its budget with ``method`` (default: :attr:`method`)."""
        method = self.method if method is None else method
        self._measure_budgets()
        compiled = self.compresses_compiled
        with torch.inference_mode():
            for layer, cache in enumerate(self.caches):
                method.compress(cache, layer, self.layer_budgets[layer], compiled=compiled)
        self.cursors = [min(slots, cache.capacity) for slots, cache in zip(self.layer_slots, self.caches)]
        self.filled = max(self.cursors)
        self.compressions += 1

    def compress_inside_next_forward(self) -> None:
        """Oracle schedule for fidelity studies (eager only): every layer is compressed to its budget *inside* the
        next forward, after that forward's new keys were written and its queries joined the observation window,
        and before they attend (``CompressedLayerCache.inline_compression``). The newest query of that forward is
        then the reference query of a merge (KeepKV's ``reference="last"``), so the step that compresses shows the
        merge's own perturbation. Call it before a one-token :meth:`GenerationEngine.decode_step`."""
        if self.keeps_everything:
            raise KeepKVError("the full cache is never compressed: compress_inside_next_forward needs a method "
                              "with a budget")
        self._measure_budgets()

        def compress_once(layer: int):
            def hook(cache: CompressedLayerCache) -> None:
                cache.inline_compression = None
                self.method.compress(cache, layer, self.layer_budgets[layer], compiled=self.compresses_compiled)
            return hook

        for layer, cache in enumerate(self.caches):
            cache.inline_compression = compress_once(layer)
        # host mirrors: after the forward each layer holds its slots (the new token included), i.e. wrote(1) later
        self.cursors = [min(slots, cache.capacity) - 1 for slots, cache in zip(self.layer_slots, self.caches)]
        self.compressions += 1

    def _fits(self, new_tokens: int) -> bool:
        """Whether every layer can take ``new_tokens`` more entries: within the shared capacity, and while decoding
        after :meth:`end_prefill` within the layer's own ``slots_l + room`` (a prompt shorter than the budgets
        is not compressed at the end of prefill, so every layer then grows alike and a layer with a smaller
        budget would otherwise pass its ``slots_l + room`` before the largest layer fills the capacity)."""
        return all(cursor + new_tokens <= (min(cache.capacity, slots + self.room) if self.decoding else cache.capacity)
                   for cursor, cache, slots in zip(self.cursors, self.caches, self.layer_slots))

    def _resize(self, room: int) -> None:
        """Give each layer ``max_l slots_l + room`` slots (copying its entries; a new list if any was replaced)."""
        capacities = [self.layer_capacity(room)] * len(self.caches)
        if [cache.capacity for cache in self.caches] == capacities:
            return
        batch = self.caches[0].keys.shape[0]
        resized = []
        for layer, (old, capacity) in enumerate(zip(self.caches, capacities)):
            if old.capacity == capacity:
                resized.append(old)
                continue
            new = self._new_caches(batch, [capacity])[0]
            old.copy_into(new)
            self.cursors[layer] = min(self.cursors[layer], capacity)
            resized.append(new)
        self.caches = resized
