"""PyramidKV (Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
arXiv 2406.02069): SnapKV's scores with budgets that shrink linearly with depth.

Lower layers attend broadly, upper layers to a few tokens, so with ``R = B - w`` selectable entries per head
(``w`` = protected entries: SnapKV's observation window, plus sinks if any) layer ``l`` of ``L`` keeps

    w + R_l,   R_l = max - (max - min) * l / (L - 1),   min = R / beta,   max = 2 R - min,   beta = 20

(paper Sec. 3.3 / reference code), whose mean over layers is ``R``: the average budget is the requested ``B``.
keepkv rounds by largest remainder so the integer budgets average to exactly ``B``
(:func:`keepkv.cache.budgets.pyramid_layer_budgets`). Scoring, pooling and defaults are SnapKV's
(:mod:`keepkv.cache.methods.snapkv`: window 32, kernel 7, maxpool, no sinks); compresses once after prefill.
The same schedule is available on any scorer as ``layer_budgets="pyramid"``.
"""

from __future__ import annotations

from dataclasses import dataclass

from keepkv.cache.methods.snapkv import SnapKV


@dataclass
class PyramidKV(SnapKV):
    """SnapKV with ``layer_budgets = "pyramid"`` (``pyramid_beta = 20``) by default."""

    name = "pyramidkv"
    layer_budgets: str = "pyramid"
