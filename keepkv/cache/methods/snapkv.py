"""SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv 2404.14469).

Once, at the end of prefill, the last ``w`` prompt queries (the *observation window*) vote for the prefix:

    C_i = pool_k( (1/w) sum_{t in window} A[t, i] )            (SnapKV eq. 1-2, per query head)
    score_i = mean over the KV head's query heads of C_i        (GQA)

``A`` is the attention the model computes (vote-weighted, causal, sliding window honoured), ``pool_k`` a 1-D
pooling of width ``k`` along the cache (stride 1, ``k // 2`` padding: neighbours of an important token are kept
with it). The window itself is always kept; the top ``B - w`` prefix entries by ``score`` fill the rest.

Defaults: ``window = 32``, ``kernel_size = 7``, ``pooling = "maxpool"`` — the LongBench configuration of the
SnapKV / PyramidKV reference code (its class defaults are window 64, kernel 5, avgpool: both are options);
``sinks = 0`` (SnapKV protects no sink tokens; they win on attention anyway). Averaging over the window instead
of summing changes no ranking (every head of a row sees the same number of window queries).

Pooling runs over the *selectable* entries only: protected (window, sinks) and empty slots count as 0, i.e. the
zero padding the reference code applies at the prefix/window boundary (for ``maxpool`` a zero changes nothing,
attention being non-negative). With chunked prefill the cache may already have been compressed, so neighbours
in the cache are neighbours among the kept entries.

Compresses once (``compresses_during_decode = False``): the decode cache grows by the new tokens, as in the
paper. Takes the budget options of :class:`~keepkv.cache.budgets.BudgetOptions`
(``head_budgets="adakv"`` is Ada-KV's SnapKV, ``layer_budgets="pyramid"`` is
:mod:`PyramidKV <keepkv.cache.methods.pyramidkv>`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from keepkv.cache.budgets import BudgetOptions
from keepkv.cache.compressed import CompressedLayerCache
from keepkv.errors import KeepKVError
from keepkv.ops.scores import POOLINGS, pool_along_slots

@dataclass
class SnapKV(BudgetOptions):
    """Options: ``window`` (observation window and protected recent entries, 32), ``kernel_size`` (7, odd),
    ``pooling`` (maxpool | avgpool), ``sinks`` (0), plus the budget options (``layer_budgets``,
    ``head_budgets`` ...)."""

    name = "snapkv"
    compresses_during_decode = False
    sinks: int = 0
    window: int = 32
    kernel_size: int = 7
    pooling: str = "maxpool"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pooling not in POOLINGS:
            raise KeepKVError(f"{self.name}: unknown pooling {self.pooling!r}; allowed: {', '.join(POOLINGS)}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise KeepKVError(f"{self.name}: kernel_size must be an odd integer >= 1, got {self.kernel_size}")

    def pooled_head_attention(self, cache: CompressedLayerCache) -> Tensor:
        """``[batch, kv_heads, group, capacity]``: each query head's window-mean attention over the selectable
        entries, pooled along the cache (0 on protected and empty slots before pooling)."""
        live = torch.isfinite(cache.log_votes)
        selectable = live & ~self.protected_mask(cache)
        attention = cache.window_mean_attention() * selectable[:, :, None, :]
        return pool_along_slots(attention, self.kernel_size, self.pooling)

    def scores(self, cache: CompressedLayerCache, layer: int) -> Tensor:
        return self.pooled_head_attention(cache).mean(dim=2)
