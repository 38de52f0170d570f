"""D2O (Wan et al., "D2O: Dynamic Discriminative Operations for Efficient Long-Context Inference of Large
Language Models", ICLR 2025, arXiv 2406.13035): H2O eviction, per-layer budgets from attention density, and
evicted entries recalled into similar kept ones.

**Token level.** Selection is H2O's (:mod:`keepkv.cache.methods.h2o`): accumulated attention, heavy hitters plus
a recent window (``recent_fraction = 0.5`` of the budget), with ``sinks = 4`` protected (the reference code pins
the first 4 tokens). Each evicted entry ``e`` is matched to its most similar kept entry
``c* = argmax_c cos(k_e, k_c)``; with ``s_e = cos(k_e, k_c*)`` and a per-(batch row, KV head) threshold updated
by an exponential moving average at every compression,

    tau <- mean_e s_e                                   (first compression of a generation)
    tau <- beta tau + (1 - beta) mean_e s_e             (later ones; beta = threshold_decay = 0.5)

``e`` is merged when ``s_e >= tau`` (the updated tau), otherwise simply evicted. The merge is a similarity
weighted mean (D2O's weights ``w = exp(u) / (sum exp(u) + e)``, the kept entry counting with its self-similarity
``cos = 1``, i.e. weight ``e^1``):

    k_c <- (e k_c + sum_e exp(s_e) k_e) / (e + sum_e exp(s_e)),      v_c likewise

No vote bias (``log_votes`` untouched).

**Layer level** (``layer_budgets = "variance"``): at the first compression of a generation (the end of prefill
for prompts of at most ``B + chunk`` tokens) every layer's attention density is measured from its accumulated
attention (the prompt's column sums): ``var_l`` = the variance over live entries, averaged over batch rows and KV
heads. With ``v_l`` = ``var_l`` min-max normalised over the layers (in ``[0, 1]``) and ``R = B - P`` selectable
entries, layer ``l`` keeps ``P + L R softmax(-v)_l`` (largest-remainder rounding: the mean stays ``B``): layers
with flatter (denser) attention keep more, at most ``e`` times what the peakiest layer keeps. The budgets are
then fixed for the generation. This reads the device once (the budgets size the buffers), at that first
compression only. ``"uniform"`` disables it.

Deviations from the reference code, on purpose: it min-max normalises the variance over the heads *within* a
layer and then averages, which is always 0.5 for a model with 2 KV heads (Qwen2.5-0.5B) and so cannot tell
layers apart; keepkv normalises over layers. It also leaves layers 0, 1 and L-1 uncompressed; keepkv gives
every layer a budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from keepkv.cache.budgets import largest_remainder
from keepkv.cache.compressed import CompressedLayerCache
from keepkv.cache.methods.h2o import accumulated_attention
from keepkv.cache.policy import CompressionMethod, recent_entries
from keepkv.distributed.heads import head_mean
from keepkv.errors import KeepKVError
from keepkv.ops.scores import cosine_best_match

D2O_LAYER_BUDGETS = ("variance", "uniform")


def attention_variance(cache: CompressedLayerCache) -> Tensor:
    """Scalar: the variance over live entries of the accumulated attention (unbiased), averaged over batch rows
    and KV heads."""
    scores = accumulated_attention(cache, "d2o")
    live = torch.isfinite(cache.log_votes).float()
    count = live.sum(dim=-1)
    mean = (scores * live).sum(dim=-1) / count.clamp_min(1.0)
    variance = (((scores - mean[..., None]) ** 2) * live).sum(dim=-1) / (count - 1.0).clamp_min(1.0)
    return head_mean(variance, cache, dim=(0, 1), keepdim=False)  # every rank's heads under TP


def variance_layer_budgets(budget: int, protected: int, variances: Tensor) -> list[int]:
    """``protected + largest_remainder(L R softmax(-v))``, ``v`` = ``variances`` min-max normalised over layers,
    ``R = budget - protected``."""
    num_layers = variances.shape[0]
    selectable = budget - protected
    if selectable <= 0:
        return [budget] * num_layers
    variances = variances.double()
    low, high = variances.min(), variances.max()
    normalised = torch.where(high > low, (variances - low) / (high - low), torch.zeros_like(variances))
    shares = (torch.softmax(-normalised, dim=0) * (selectable * num_layers)).tolist()
    return [protected + r for r in largest_remainder(shares, selectable * num_layers)]


@dataclass
class D2O(CompressionMethod):
    """Options: ``recent_fraction`` (0.5), ``threshold_decay`` (beta = 0.5), ``layer_budgets`` (variance |
    uniform), ``sinks`` (4), ``window`` (least recent entries kept, 1)."""

    name = "d2o"
    accumulates_attention = True
    is_eviction_selector = False
    sinks: int = 4
    window: int = 1
    recent_fraction: float = 0.5
    threshold_decay: float = 0.5
    layer_budgets: str = "variance"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= float(self.recent_fraction) <= 1.0:
            raise KeepKVError(f"d2o: recent_fraction must lie in [0, 1], got {self.recent_fraction}")
        if not 0.0 <= float(self.threshold_decay) < 1.0:
            raise KeepKVError(f"d2o: threshold_decay must lie in [0, 1), got {self.threshold_decay}")
        if self.layer_budgets not in D2O_LAYER_BUDGETS:
            raise KeepKVError(f"d2o: unknown layer_budgets {self.layer_budgets!r}; allowed: "
                              f"{', '.join(D2O_LAYER_BUDGETS)}")
        self.thresholds: dict[int, Tensor] = {}

    def reset_state(self) -> None:
        self.thresholds = {}

    def recent_window(self, budget: int | None) -> int:
        return recent_entries(budget, float(self.recent_fraction), self.window, self.sinks)

    def measure_layer_budgets(self, budget: int, caches: Sequence[CompressedLayerCache]) -> list[int] | None:
        if self.layer_budgets != "variance":
            return None
        variances = torch.stack([attention_variance(cache) for cache in caches])
        return variance_layer_budgets(budget, self.protected_entries, variances)

    def scores(self, cache: CompressedLayerCache, layer: int) -> Tensor:
        return accumulated_attention(cache, self.name)

    def update_threshold(self, layer: int, max_similarity: Tensor, valid: Tensor) -> Tensor:
        """The EMA threshold ``[batch, kv_heads]`` after this compression (unchanged where nothing is evicted)."""
        count = valid.sum(dim=-1)
        mean = torch.where(valid, max_similarity, 0.0).sum(dim=-1) / count.clamp_min(1)
        previous = self.thresholds.get(layer)
        if previous is None or previous.shape != mean.shape:
            updated = torch.where(count > 0, mean, float("inf"))  # inf until a first eviction sets it
        else:
            beta = float(self.threshold_decay)
            first = ~torch.isfinite(previous)
            blended = torch.where(first, mean, beta * previous + (1.0 - beta) * mean)
            updated = torch.where(count > 0, blended, previous)
        self.thresholds[layer] = updated
        return updated

    def merge(self, cache: CompressedLayerCache, layer: int, kept_slots: Tensor, kept_valid: Tensor,
              evicted_slots: Tensor, evicted_valid: Tensor, compiled: bool = False) -> None:
        if evicted_slots.shape[-1] == 0:
            return
        dim = cache.keys.shape[-1]

        def index(slots: Tensor) -> Tensor:
            return slots[..., None].expand(-1, -1, -1, dim)

        evicted_keys = cache.keys.gather(2, index(evicted_slots)).float()
        best, max_similarity = cosine_best_match(evicted_keys, cache.keys.gather(2, index(kept_slots)), kept_valid)
        valid = evicted_valid & torch.isfinite(max_similarity)
        threshold = self.update_threshold(layer, max_similarity, valid)
        merging = valid & (max_similarity >= threshold[..., None])
        target = kept_slots.gather(2, best)
        weight = torch.where(merging, torch.exp(max_similarity.clamp(-1.0, 1.0)), 0.0)  # [B, H, E]
        weight_in = torch.zeros_like(cache.log_votes).scatter_add_(2, target, weight)  # [B, H, C]
        receives = weight_in > 0
        total = math.e + weight_in
        evicted_values = cache.values.gather(2, index(evicted_slots)).float()
        for buffer, evicted_rows in ((cache.keys, evicted_keys), (cache.values, evicted_values)):
            pulled = torch.zeros(buffer.shape, dtype=torch.float32, device=buffer.device)
            pulled.scatter_add_(2, index(target), weight[..., None] * evicted_rows)
            merged = (math.e * buffer.float() + pulled) / total[..., None]
            buffer.copy_(torch.where(receives[..., None], merged.to(buffer.dtype), buffer))
