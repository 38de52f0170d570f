"""WeightedKV (Yuan et al., "WeightedKV: Attention Scores Weighted Key-Value Cache Merging for Large Language
Models", ICASSP 2025, arXiv 2503.01330): drop the key, keep the value by merging it into its neighbour.

Keys are low-rank and redundant, values are not. When the cache is over budget, the non-protected entry ``j``
with the lowest *average* attention

    a_j = (sum of A[q, j] over the queries q that saw j) / (number of those queries)

loses its key, and its value is merged into its neighbouring kept entry ``n`` by a convex combination
weighted by average attention:

    v_n <- (a_j v_j + a_n v_n) / (a_j + a_n),      a_n <- (a_j a_j + a_n a_n) / (a_j + a_n)

(the merged entry's average attention is the same convex combination of the two averages; its key stays
``k_n``; no votes). Sums and counts come from the cache's accumulated attention
(``accumulates_attention = True``, see :mod:`keepkv.cache.methods.h2o`).

Choices where the paper is not explicit (its code is not public), written down here:

- **neighbour** = the next kept entry in position order (the one that follows ``j``; with its key, it is the
  entry whose context ``j`` was part of); the previous kept entry if none follows. Protected entries (sinks,
  recent window) can receive merges.
- **batched schedule**: keepkv compresses ``W`` steps at a time; all entries evicted by one compression merge in
  one N-way step, ``v_n <- (sum_j a_j v_j + a_n v_n) / (sum_j a_j + a_n)`` (and ``a_n`` likewise). With
  ``decode_slack W = 1`` exactly one entry goes per step: the pairwise rule above.
- if all weights of a merge are 0 (entries no query has seen yet) the plain mean is used.
- defaults: ``sinks = 4``, ``window = 16`` (a small recent window; the paper keeps the most recent tokens but
  gives no size). Ties in ``a`` by position (older evicted first). Runs at prefill end and during decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from keepkv.cache.compressed import CompressedLayerCache
from keepkv.cache.methods.h2o import accumulated_attention
from keepkv.cache.policy import CompressionMethod


def average_attention(cache: CompressedLayerCache, method_name: str) -> Tensor:
    """``[batch, kv_heads, capacity]`` ``a_j``: accumulated attention / queries that saw the slot (0 if none)."""
    total = accumulated_attention(cache, method_name)
    return total / cache.attention_queries.clamp_min(1.0)


def neighbour_slots(kept: Tensor) -> Tensor:
    """``[batch, kv_heads, capacity]`` for every slot: the next kept slot after it (the previous kept slot if
    none follows; -1 if the row keeps nothing). ``kept`` is a bool mask over slots (= position order)."""
    capacity = kept.shape[-1]
    slot = torch.arange(capacity, device=kept.device).expand_as(kept)
    next_at_or_after = torch.where(kept, slot, capacity).flip(-1).cummin(dim=-1).values.flip(-1)
    following = torch.cat((next_at_or_after[..., 1:], torch.full_like(next_at_or_after[..., :1], capacity)), dim=-1)
    previous = torch.where(kept, slot, -1).cummax(dim=-1).values
    return torch.where(following < capacity, following, previous)


@dataclass
class WeightedKV(CompressionMethod):
    """Options: ``sinks`` (4), ``window`` (16)."""

    name = "weightedkv"
    accumulates_attention = True
    is_eviction_selector = False
    sinks: int = 4
    window: int = 16

    def scores(self, cache: CompressedLayerCache, layer: int) -> Tensor:
        return average_attention(cache, self.name)

    def merge(self, cache: CompressedLayerCache, layer: int, kept_slots: Tensor, kept_valid: Tensor,
              evicted_slots: Tensor, evicted_valid: Tensor, compiled: bool = False) -> None:
        if evicted_slots.shape[-1] == 0:
            return
        batch, kv_heads, capacity, dim = cache.values.shape
        kept = torch.zeros_like(cache.log_votes, dtype=torch.bool).scatter(2, kept_slots, kept_valid)
        target = neighbour_slots(kept).gather(2, evicted_slots)  # [B, H, E]
        merging = evicted_valid & (target >= 0)
        target = target.clamp_min(0)
        weight = average_attention(cache, self.name).clamp_min(0.0)  # [B, H, C]
        evicted_weight = torch.where(merging, weight.gather(2, evicted_slots), 0.0)
        evicted_values = cache.values.gather(2, evicted_slots[..., None].expand(-1, -1, -1, dim)).float()
        merged_in = torch.zeros(batch, kv_heads, capacity, dtype=torch.float32, device=cache.values.device)
        count_in = torch.zeros_like(merged_in).scatter_add_(2, target, merging.float())
        weight_in = torch.zeros_like(merged_in).scatter_add_(2, target, evicted_weight)
        square_in = torch.zeros_like(merged_in).scatter_add_(2, target, evicted_weight * evicted_weight)
        weighted_values_in = torch.zeros(batch, kv_heads, capacity, dim, dtype=torch.float32,
                                         device=cache.values.device)
        weighted_values_in.scatter_add_(2, target[..., None].expand(-1, -1, -1, dim),
                                        evicted_weight[..., None] * evicted_values)
        plain_values_in = torch.zeros_like(weighted_values_in).scatter_add_(
            2, target[..., None].expand(-1, -1, -1, dim), evicted_values * merging[..., None]
        )
        own_values = cache.values.float()
        total_weight = weight + weight_in
        weighted = (weight[..., None] * own_values + weighted_values_in) / total_weight.clamp_min(1e-30)[..., None]
        plain = (own_values + plain_values_in) / (1.0 + count_in)[..., None]
        use_weights = total_weight > torch.finfo(torch.float32).tiny
        merged_values = torch.where(use_weights[..., None], weighted, plain)
        receives = count_in > 0
        cache.values.copy_(torch.where(receives[..., None], merged_values.to(cache.values.dtype), cache.values))
        # a_n <- convex combination of the averages, stored back as accumulated = a_n * queries
        merged_average = torch.where(use_weights, (weight * weight + square_in) / total_weight.clamp_min(1e-30), weight)
        queries = cache.attention_queries.clamp_min(1.0)
        cache.accumulated_attention.copy_(torch.where(receives, merged_average * queries,
                                                      cache.accumulated_attention))
        cache.attention_queries.copy_(torch.where(receives, queries, cache.attention_queries))
