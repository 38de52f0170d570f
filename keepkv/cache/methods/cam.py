"""CaM (Zhang et al., "CaM: Cache Merging for Memory-efficient LLMs Inference", ICML 2024): StreamingLLM's
budget, but the value of a token leaving the cache is spread over the values that follow it.

The cache keeps the ``sinks`` first and the most recent entries (StreamingLLM, :mod:`keepkv.cache.methods.
streamingllm`). When an entry ``e`` is evicted, with ``a`` the attention an entry receives, it is merged into the
next ``m`` values with probability

    p_e = clamp(a_e / mean(a over the recent window), 0, 1)
    M_e ~ Bernoulli(p_e),      v_{e+k} <- v_{e+k} + M_e * v_e / m     for k = 1 .. m      (m = merge_span = 32)

keys untouched, no votes. One draw per evicted entry (and batch row, KV head), shared by its ``m`` targets, as
in the reference code.

Choices written down:

- ``a`` = the attention of the newest query (group mean over the KV head's query heads), the reference code's
  per-step attention row; the recent window = the kept non-sink entries.
- **seeded, counter-based draws**: the uniform number of an eviction is a fixed hash of ``(seed, layer, batch
  row, KV head, token position)`` (:func:`counter_uniform`), so results are reproducible, independent of when
  and in which batch of evictions a token leaves, and need no generator state.
- **batched schedule**: when one compression evicts several entries (prefill; ``W > 1``) they are processed
  oldest first, as if evicted one per step: an evicted entry that is among the next ``m`` of an earlier one
  first receives its share and then passes it on. This recurrence is one unit lower-triangular solve
  ``V_E' = (I - C_EE)^{-1} V_E`` over the evicted entries (``C[i, j] = M_j / m`` when ``i`` is within the ``m``
  entries after ``j``), then every kept entry gets ``sum_j C[s, j] v'_j``. "Next" counts live cache entries in
  position order.
- values are merged in float32, cast back, and clamped to the dtype's finite range (value mass accumulates by
  design: every merged token's value is added, not averaged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from keepkv.cache.compressed import CompressedLayerCache
from keepkv.cache.policy import CompressionMethod
from keepkv.distributed.heads import first_kv_head

HASH_MASK = (1 << 31) - 1
HASH_MULTIPLIER = 0x45D9F3B


def _mix(x: Tensor | int) -> Tensor | int:
    """A 31-bit integer mixing function (products stay below 2^58: no int64 overflow)."""
    x = ((x >> 16) ^ x) * HASH_MULTIPLIER & HASH_MASK
    x = ((x >> 16) ^ x) * HASH_MULTIPLIER & HASH_MASK
    return (x >> 16) ^ x


def counter_uniform(seed: int, layer: int, positions: Tensor, first_head: int = 0) -> Tensor:
    """Uniform numbers in ``[0, 1)`` (float32, 24 bits) for ``positions [batch, kv_heads, n]``: a hash of
    ``(seed, layer, batch row, KV head, position)``, the same on every device and at every call. ``first_head``:
    the global index of the first KV head (a tensor-parallel rank's, :func:`keepkv.distributed.heads.first_kv_head`)."""
    batch, kv_heads, _ = positions.shape
    device = positions.device
    key = _mix(_mix(seed & HASH_MASK) ^ (layer & HASH_MASK))
    rows = torch.arange(batch, device=device, dtype=torch.int64)[:, None, None]
    heads = torch.arange(first_head, first_head + kv_heads, device=device, dtype=torch.int64)[None, :, None]
    x = _mix(_mix(_mix(key ^ rows) ^ heads) ^ (positions.to(torch.int64) & HASH_MASK))
    return (x & ((1 << 24) - 1)).to(torch.float32) / float(1 << 24)


def merge_probability(attention: Tensor, evicted_slots: Tensor, recent: Tensor) -> Tensor:
    """``[batch, kv_heads, E]`` ``clamp(a_e / mean(a over recent), 0, 1)`` (0 if the recent mean is 0)."""
    recent_mean = (attention * recent).sum(dim=-1) / recent.sum(dim=-1).clamp_min(1)
    ratio = attention.gather(2, evicted_slots) / recent_mean.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    return torch.where(recent_mean[..., None] > 0, ratio.clamp(0.0, 1.0), 0.0)


@dataclass
class CaM(CompressionMethod):
    """Options: ``merge_span`` (m = 32), ``seed`` (0), ``sinks`` (4), ``window`` (32)."""

    name = "cam"
    is_eviction_selector = False
    merge_span: int = 32
    seed: int = 0

    def scores(self, cache: CompressedLayerCache, layer: int) -> Tensor:
        return cache.positions.float()  # StreamingLLM: the newest entries after the sinks

    def merge(self, cache: CompressedLayerCache, layer: int, kept_slots: Tensor, kept_valid: Tensor,
              evicted_slots: Tensor, evicted_valid: Tensor, compiled: bool = False) -> None:
        if evicted_slots.shape[-1] == 0 or self.merge_span == 0:
            return
        capacity, dim = cache.capacity, cache.values.shape[-1]
        live = torch.isfinite(cache.log_votes)
        kept = torch.zeros_like(live).scatter(2, kept_slots, kept_valid) & live
        recent = kept & (cache.positions >= self.sinks)
        attention = cache.newest_query_attention().mean(dim=2)  # [B, H, C]
        # evicted entries oldest first (slot order = position order); invalid ones sorted last
        evicted_order = torch.sort(torch.where(evicted_valid, evicted_slots, capacity), dim=-1).indices
        evicted = evicted_slots.gather(2, evicted_order)
        valid = evicted_valid.gather(2, evicted_order)
        probability = merge_probability(attention, evicted, recent)
        draw = counter_uniform(int(self.seed), layer, cache.positions.gather(2, evicted), first_kv_head(cache))
        share = torch.where(valid & (draw < probability), 1.0 / self.merge_span, 0.0)  # M_e / m, [B, H, E]
        live_rank = live.long().cumsum(dim=-1) - 1  # position of each slot among the live entries
        evicted_rank = live_rank.gather(2, evicted)
        # within the evicted entries: e_i receives from e_j when 0 < rank_i - rank_j <= m
        gap = evicted_rank[..., :, None] - evicted_rank[..., None, :]
        spread = ((gap > 0) & (gap <= self.merge_span) & valid[..., :, None]).float() * share[..., None, :]
        evicted_values = cache.values.gather(2, evicted[..., None].expand(-1, -1, -1, dim)).float()
        identity = torch.eye(spread.shape[-1], device=spread.device, dtype=spread.dtype)
        carried = torch.linalg.solve_triangular(identity - spread, evicted_values, upper=False, unitriangular=True)
        # every kept entry s receives sum_j share_j v'_j over the evicted j with 0 < rank_s - rank_j <= m
        gap_to_kept = live_rank[..., :, None] - evicted_rank[..., None, :]  # [B, H, C, E]
        to_kept = ((gap_to_kept > 0) & (gap_to_kept <= self.merge_span) & kept[..., None]).float() * share[..., None, :]
        received = torch.matmul(to_kept, carried)  # [B, H, C, d]
        limit = torch.finfo(cache.values.dtype).max
        merged = (cache.values.float() + received).nan_to_num(nan=0.0).clamp(-limit, limit)
        cache.values.copy_(torch.where(kept[..., None], merged.to(cache.values.dtype), cache.values))
