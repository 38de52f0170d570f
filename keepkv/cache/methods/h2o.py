"""H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
NeurIPS 2023, arXiv 2306.14048): keep the heavy hitters by accumulated attention plus a recent window.

Per KV head, every entry's score is the attention it has received so far (H2O Alg. 1):

    score_i = sum over every query q that saw i of A[q, i]      (GQA: mean over the group's query heads)

— at prefill the column sums of the prompt's attention, then one row added per decode step. The cache keeps the
newest ``recent`` entries and the ``B - recent`` others with the highest score ("evict the lowest").

How keepkv accumulates (compile-friendly, exact): the cache keeps a per-slot ``accumulated_attention`` buffer
(``accumulates_attention = True``) to which :meth:`~keepkv.cache.compressed.CompressedLayerCache.observe_queries`
adds the attention of every forward: the whole prefill chunk (eager; all prompt queries, not only the
observation window, which would miss most of a long chunk) and each decode token (inside the compiled step: a
fixed-shape in-place add, no host sync). The attention is recomputed from the cached keys with the same votes
and visibility as the model's own attention, costing one extra ``q·K`` per forward. Scores travel with their
slot through compaction, so the sums are exact whatever the compression schedule ``W``.

Defaults (the reference code's 50/50 split of heavy hitters and recent tokens): ``recent_fraction = 0.5`` of the
budget (at least ``window``), ``sinks = 0`` (H2O predates attention sinks; they are heavy hitters anyway),
``window = 1`` (the newest token is always kept). Ties are broken by position (older first). Compresses during
decoding (``W = 1`` is the paper's one-eviction-per-step schedule). Budget options (Ada-KV head budgets,
PyramidKV layer budgets) apply: accumulated attention is comparable across heads.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from keepkv.cache.budgets import BudgetOptions
from keepkv.cache.compressed import CompressedLayerCache
from keepkv.cache.policy import recent_entries
from keepkv.errors import KeepKVError


def accumulated_attention(cache: CompressedLayerCache, method_name: str) -> Tensor:
    """``[batch, kv_heads, capacity]`` attention each slot has received so far (see the module docstring)."""
    if not cache.accumulate_attention:
        raise KeepKVError(
            f"{method_name} needs a cache that accumulates attention (CompressedLayerCache(..., "
            "accumulate_attention=True); the cache manager does this for it)"
        )
    return cache.accumulated_attention


@dataclass
class H2O(BudgetOptions):
    """Options: ``recent_fraction`` (0.5), ``window`` (least recent entries kept, 1), ``sinks`` (0), plus the
    budget options."""

    name = "h2o"
    accumulates_attention = True
    sinks: int = 0
    window: int = 1
    recent_fraction: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= float(self.recent_fraction) <= 1.0:
            raise KeepKVError(f"{self.name}: recent_fraction must lie in [0, 1], got {self.recent_fraction}")

    def recent_window(self, budget: int | None) -> int:
        return recent_entries(budget, float(self.recent_fraction), self.window, self.sinks)

    def scores(self, cache: CompressedLayerCache, layer: int) -> Tensor:
        return accumulated_attention(cache, self.name)
