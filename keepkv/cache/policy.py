"""The small interface every KV-compression method implements.

A method is a dataclass whose fields are its hyper-parameters (with the paper's defaults). The shared machinery
here does what every method needs:

1. :meth:`CompressionMethod.scores` — the only thing most methods write: ``[batch, kv_heads, capacity]`` float32,
   higher = keep (empty slots are excluded by the machinery);
2. :meth:`CompressionMethod.select` — protect attention sinks (``position < sinks``) and the recent window
   (the ``window`` newest positions, the newest token included), then keep the highest scores up to the budget.
   Ties are broken by slot = position order (a stable sort), so selection is deterministic;
3. :meth:`CompressionMethod.merge` — optional: fold evicted entries into kept ones (merging methods);
4. :meth:`CompressionMethod.compress` — select, merge, then compact the cache to the kept entries.

Compression runs per layer (all batch rows and heads at once, no Python loop over heads or tokens), at the end of
prefill and whenever the cache has no room left (see :mod:`keepkv.cache.manager`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from keepkv.cache.compressed import CompressedLayerCache
from keepkv.errors import KeepKVError


@dataclass
class CompressionMethod:
    """Base of all methods. ``sinks``: first positions always kept; ``window``: newest positions always kept
    (also the number of recent queries every cache remembers as its observation window)."""

    name: ClassVar[str] = "base"
    compresses_during_decode: ClassVar[bool] = True
    use_compiled_ops = False  # not an option: set when the model runs compiled (ops such as the merge compile too)
    sinks: int = 4
    window: int = 32

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(field.default, int) and not isinstance(field.default, bool):
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise KeepKVError(f"{self.name}: option {field.name} must be a non-negative integer, got {value!r}")

    @property
    def protected_entries(self) -> int:
        """Entries a budget must at least hold: sinks + recent window (which includes the newest token)."""
        return self.sinks + max(self.window, 1)

    # ---- what a method defines --------------------------------------------------------------------------------
    def scores(self, cache: CompressedLayerCache, layer: int) -> Tensor:
        """``[batch, kv_heads, capacity]`` float32 importance of each slot (higher = keep)."""
        raise KeepKVError(f"method {self.name!r} defines no scores")

    def merge(self, cache: CompressedLayerCache, layer: int, kept_slots: Tensor, kept_valid: Tensor,
              evicted_slots: Tensor, evicted_valid: Tensor) -> None:
        """Fold evicted entries into kept ones, in place (default: nothing, i.e. plain eviction)."""

    # ---- shared machinery -------------------------------------------------------------------------------------
    def protected_mask(self, cache: CompressedLayerCache) -> Tensor:
        """``[batch, kv_heads, capacity]``: sinks and the recent window of each row (live slots only)."""
        live = torch.isfinite(cache.log_votes)
        newest = cache.positions.masked_fill(~live, -1).amax(dim=(1, 2), keepdim=True)
        recent = cache.positions > newest - max(self.window, 1)
        return live & ((cache.positions < self.sinks) | recent)

    def select(self, cache: CompressedLayerCache, layer: int, budget: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(kept_slots, kept_valid, evicted_slots, evicted_valid)``, each ``[batch, kv_heads, n]``."""
        live = torch.isfinite(cache.log_votes)
        ranking = self.scores(cache, layer).float().nan_to_num(nan=-torch.finfo(torch.float32).max)
        ranking = ranking.clamp(-torch.finfo(torch.float32).max, torch.finfo(torch.float32).max)
        ranking = torch.where(self.protected_mask(cache), float("inf"), ranking)
        ranking = torch.where(live, ranking, -float("inf"))
        order = torch.sort(ranking, dim=-1, descending=True, stable=True).indices
        kept_slots, evicted_slots = order[..., :budget], order[..., budget:]
        return kept_slots, live.gather(2, kept_slots), evicted_slots, live.gather(2, evicted_slots)

    def compress(self, cache: CompressedLayerCache, layer: int, budget: int) -> None:
        """Shrink ``cache`` to at most ``budget`` live entries per (batch row, KV head)."""
        kept_slots, kept_valid, evicted_slots, evicted_valid = self.select(cache, layer, budget)
        self.merge(cache, layer, kept_slots, kept_valid, evicted_slots, evicted_valid)
        cache.compact(kept_slots, kept_valid)

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
