"""StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024,
arXiv 2309.17453): keep the first ``sinks`` tokens and the most recent ones, evict the middle. Query-agnostic.

Score of slot ``i``: its token position (newer = higher), so after the protected sinks the budget is filled with
the most recent entries. Defaults: 4 sinks (the paper's), recent window 32 (any value works: everything
recent is kept anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from keepkv.cache.compressed import CompressedLayerCache
from keepkv.cache.policy import CompressionMethod


@dataclass
class StreamingLLM(CompressionMethod):
    name = "streamingllm"

    def scores(self, cache: CompressedLayerCache, layer: int) -> Tensor:
        return cache.positions.float()
