"""TOVA (Oren et al., "Transformers are Multi-State RNNs", arXiv 2401.06104): Token Omission Via Attention.

A fixed-size cache; at each step the entry with the lowest attention from the *current* query is dropped:

    score_i = (1/H) sum_{h=1..H} A_h[t, i]      (all H query heads of the layer, t = the newest query)

One score per layer and batch row, so every KV head drops the same token (the paper's layer-wise policy; with
GQA the mean runs over all query heads, not per group). All KV heads therefore hold the same positions in the
same slots, and the score is computed per slot.

keepkv's schedule: with ``decode_slack W = 1`` the decode buffer holds ``B + 1`` entries and each compression
evicts exactly the one lowest-attention entry for the previous step's query, which is the paper's algorithm
(that query attended over those ``B + 1`` entries). With ``W > 1`` the ``W`` lowest entries for the newest query
go at once (cheaper; not the paper's). At the end of prefill the prompt is cut to ``B`` by the last prompt
query's attention (the reference implementation applies the same rule to the prompt).

Defaults: ``sinks = 0`` and ``window = 1`` (TOVA protects nothing but the newest token). Ties by position.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from keepkv.cache.compressed import CompressedLayerCache
from keepkv.cache.policy import CompressionMethod
from keepkv.distributed.heads import head_mean


@dataclass
class TOVA(CompressionMethod):
    """Options: ``sinks`` (0), ``window`` (1)."""

    name = "tova"
    sinks: int = 0
    window: int = 1

    def scores(self, cache: CompressedLayerCache, layer: int) -> Tensor:
        attention = cache.newest_query_attention()  # [B, Hkv, G, C]
        layer_mean = head_mean(attention, cache, dim=(1, 2))[:, :, 0]  # [B, 1, C]; every rank's heads under TP
        return layer_mean.expand(-1, cache.keys.shape[1], -1)
