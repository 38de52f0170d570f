"""A layer cache that compression methods can shrink: its observation state and its compaction.

Three jobs, three modules: the per-slot storage is :class:`~keepkv.cache.kv_cache.LayerKVCache`; this module adds
the *observation state* the methods score with and the compaction that moves it with its slots; the attention
recomputed from that state (window scores, a query's attention) is :class:`~keepkv.cache.attention_scores.
AttentionScores`. :class:`CompressedLayerCache` extends the storage with

- ``window_queries [batch, heads, w, head_dim]`` and ``window_positions [batch, w]``: each row's last ``w`` real
  queries (rotated), in order, oldest first; empty rows have position -1. They are the *observation window* of
  SnapKV / PyramidKV and the reference queries of KeepKV's merge and score predictor. Updated inside the
  forward (compile-friendly: a stable sort puts each row's newest real queries last, no host sync).
- optional per-slot *accumulated attention* (``accumulate_attention=True``, for H2O / D2O / WeightedKV):
  ``accumulated_attention [batch, kv_heads, capacity]`` float32 ``sum_q A[q, i]`` over every real query that saw
  slot ``i`` (the vote-weighted attention probabilities the model uses; a KV head's value is the mean over its
  group's query heads) and ``attention_queries [batch, kv_heads, capacity]`` float32, how many queries saw it.
  Both are updated in :meth:`observe_queries` for every forward (a whole prefill chunk eagerly, one token inside
  the compiled decode step: fixed shapes, in place, no host sync) and travel with their slot in :meth:`packed_entries`.
- :meth:`packed_entries` / :meth:`store_packed`: keep the given slots (in slot order), pack them at ``0 .. n-1``,
  empty the rest and move the cursor to ``n``. Slots stay in position order, so ties broken by slot are ties
  broken by position.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from keepkv.cache.attention_scores import AttentionScores
from keepkv.cache.kv_cache import POSITION_DTYPE, LayerKVCache


class CompressedLayerCache(AttentionScores, LayerKVCache):
    @torch.inference_mode(False)  # normal-tensor buffers, as LayerKVCache's
    def __init__(
        self, batch_size: int, kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype,
        device: torch.device | str | None = None, *, num_heads: int, window: int, sliding_window: int | None = None,
        accumulate_attention: bool = False,
    ) -> None:
        super().__init__(batch_size, kv_heads, capacity, head_dim, dtype, device)
        self.sliding_window = sliding_window
        # oracle mode (tests, fidelity studies): a callable compressing this cache inside the forward, after the
        # current queries joined the window and before they attend (eager only)
        self.inline_compression: Callable[[CompressedLayerCache], None] | None = None
        # the layer's o_proj weight while a compression that reads it runs (CompressionMethod.compress sets and
        # clears it): a tensor argument of the compiled compression, so one graph serves every layer
        self.output_projection: Tensor | None = None
        self.register_buffer(
            "window_queries", torch.zeros(batch_size, num_heads, window, head_dim, dtype=dtype, device=device),
            persistent=False,
        )
        self.register_buffer(
            "window_positions", torch.full((batch_size, window), -1, dtype=POSITION_DTYPE, device=device),
            persistent=False,
        )
        self.accumulate_attention = accumulate_attention
        self._window_scores_memo: list[Tensor] | None = None  # see reuse_window_scores
        state_shape = (batch_size, kv_heads, capacity) if accumulate_attention else (batch_size, kv_heads, 0)
        self.register_buffer(
            "accumulated_attention", torch.zeros(state_shape, dtype=torch.float32, device=device), persistent=False
        )
        self.register_buffer(
            "attention_queries", torch.zeros(state_shape, dtype=torch.float32, device=device), persistent=False
        )

    @property
    def group_size(self) -> int:
        return self.window_queries.shape[1] // self.keys.shape[1]

    def reset(self) -> None:
        super().reset()
        self.window_queries.zero_()
        self.window_positions.fill_(-1)
        self.accumulated_attention.zero_()
        self.attention_queries.zero_()

    def observe_queries(self, queries: Tensor, positions: Tensor, valid: Tensor) -> None:
        """Append this forward's real queries to each row's window, keeping the newest ``w``."""
        if queries.shape[2] == 1:
            self._append_one_query(queries, positions, valid)
        else:
            self._append_queries(queries, positions, valid)
        if self.accumulate_attention:
            self.accumulate_query_attention(queries, positions, valid)
        if self.inline_compression is not None:
            self.inline_compression(self)

    def _append_one_query(self, queries: Tensor, positions: Tensor, valid: Tensor) -> None:
        """The decode step's case of :meth:`_append_queries` (one query per row), without its sort: a row whose
        token is real drops its oldest window row and appends the query; a padding row keeps its window. The same
        result, because absent rows (position -1, zero query) always sit at the front of a window."""
        shifted_queries = torch.cat((self.window_queries[:, :, 1:], queries.to(self.window_queries.dtype)), dim=2)
        shifted_positions = torch.cat((self.window_positions[:, 1:], positions.to(POSITION_DTYPE)), dim=1)
        real = valid[:, 0]
        self.window_queries.copy_(torch.where(real[:, None, None, None], shifted_queries, self.window_queries))
        self.window_positions.copy_(torch.where(real[:, None], shifted_positions, self.window_positions))

    def _append_queries(self, queries: Tensor, positions: Tensor, valid: Tensor) -> None:
        window = self.window_queries.shape[2]
        all_queries = torch.cat((self.window_queries, queries.to(self.window_queries.dtype)), dim=2)
        all_positions = torch.cat((self.window_positions, positions.to(POSITION_DTYPE)), dim=1)
        present = torch.cat((self.window_positions >= 0, valid), dim=1)
        # stable sort on "present": absent entries first, present ones after in their original (time) order
        order = torch.sort(present.to(torch.int8), dim=1, stable=True).indices[:, -window:]
        kept_present = present.gather(1, order)
        self.window_positions.copy_(torch.where(kept_present, all_positions.gather(1, order), -1))
        heads, dim = all_queries.shape[1], all_queries.shape[3]
        gathered = all_queries.gather(2, order[:, None, :, None].expand(-1, heads, -1, dim))
        self.window_queries.copy_(gathered * kept_present[:, None, :, None])

    def accumulate_query_attention(self, queries: Tensor, positions: Tensor, valid: Tensor) -> None:
        """Add this forward's attention column sums to ``accumulated_attention`` and its visibility counts to
        ``attention_queries`` (in place; group mean over the KV head's query heads)."""
        attention, visible = self.query_attention(queries, positions, valid)
        self.accumulated_attention.add_(attention.sum(dim=3).mean(dim=2))
        self.attention_queries.add_(visible.sum(dim=3).squeeze(2).to(torch.float32))

    def packed_entries(self, kept_slots: Tensor, kept_valid: Tensor) -> dict[str, Tensor]:
        """The cache's per-slot buffers after keeping ``kept_slots [batch, kv_heads, n]`` (where ``kept_valid``)
        and dropping every other slot, as new tensors (the cache is not modified; :meth:`store_packed` writes them).

        The kept entries are packed into slots ``0 .. n-1`` in increasing slot order (= position order, so ties
        broken by slot are ties broken by position); slots whose ``kept_valid`` is False become empty (``-inf``
        votes), which is how per-head budgets of different sizes are stored.

        Returns ``{name: tensor}`` for ``keys``, ``values``, ``log_votes``, ``positions`` (and the accumulated
        attention state when kept), each of the buffer's full shape, plus ``cursor`` (the kept count). Kept apart
        from :meth:`store_packed` so a compiled compression returns fresh buffers and the in-place store runs
        outside the graph: inductor may fuse an in-place store into a gather from the same buffer
        (``docs/profile.md``, "Measurements behind the code's choices")."""
        count = kept_slots.shape[2]
        order = torch.sort(torch.where(kept_valid, kept_slots, self.capacity), dim=2).indices
        kept_slots, kept_valid = kept_slots.gather(2, order), kept_valid.gather(2, order)
        index = kept_slots.clamp_max(self.capacity - 1)
        pad = self.capacity - count
        dim = self.keys.shape[3]

        def packed(buffer: Tensor, empty: float | int) -> Tensor:
            if buffer.dim() == 4:
                rows = buffer.gather(2, index[..., None].expand(-1, -1, -1, dim)) * kept_valid[..., None]
                return torch.nn.functional.pad(rows, (0, 0, 0, pad), value=empty)
            rows = torch.where(kept_valid, buffer.gather(2, index), empty)
            return torch.nn.functional.pad(rows, (0, pad), value=empty)

        entries = {
            "keys": packed(self.keys, 0), "values": packed(self.values, 0),
            "log_votes": packed(self.log_votes, -float("inf")), "positions": packed(self.positions, -1),
            "cursor": torch.full_like(self.cursor, count),
        }
        if self.accumulate_attention:
            entries["accumulated_attention"] = packed(self.accumulated_attention, 0.0)
            entries["attention_queries"] = packed(self.attention_queries, 0.0)
        return entries

    def store_packed(self, entries: dict[str, Tensor]) -> None:
        """Copy :meth:`packed_entries`' result into the buffers (in place: the compiled decode graph keeps them)."""
        for name, tensor in entries.items():
            getattr(self, name).copy_(tensor)

    def copy_into(self, other: CompressedLayerCache) -> None:
        """Copy this cache's entries, window and score state into ``other`` (same batch and heads; any capacity
        that holds every slot below this cache's cursor; a window no longer than this one's, which keeps the
        newest queries). Used when the manager re-sizes a cache, and to hand one shared prefill to several
        methods."""
        kept = min(self.capacity, other.capacity)
        for name in ("keys", "values", "log_votes", "positions"):
            getattr(other, name)[:, :, :kept] = getattr(self, name)[:, :, :kept]
        if self.accumulate_attention and other.accumulate_attention:
            other.accumulated_attention[:, :, :kept] = self.accumulated_attention[:, :, :kept]
            other.attention_queries[:, :, :kept] = self.attention_queries[:, :, :kept]
        window = other.window_queries.shape[2]
        if window > self.window_queries.shape[2]:
            raise ValueError(f"cannot copy a window of {self.window_queries.shape[2]} queries into one of {window}")
        other.window_queries.copy_(self.window_queries[:, :, -window:])  # time order: the newest are last
        other.window_positions.copy_(self.window_positions[:, -window:])
        other.cursor.copy_(self.cursor.clamp_max(other.capacity))
