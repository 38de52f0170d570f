"""When and into what the caches are sized and compressed (host-side bookkeeping, no device syncs).

- :class:`FullCacheManager`: one buffer per layer big enough for the prompt and every new token; never
  compresses. ``kv_budget=None`` or ``1.0``.
- :class:`CompressedCacheManager`: a budget ``B`` (entries per KV head, from ``kv_budget`` and the prompt
  length) and a method.

  * Prefill runs in chunks into a buffer of ``B + chunk`` slots; whenever the next chunk would not fit, the
    method compresses every layer to ``B``. At the end of prefill the cache is compressed to ``B`` (for prompts of
    at most ``B + chunk`` tokens this is the only compression: the papers' "compress once after prefill").
  * Decoding then continues in a buffer of ``B + W`` slots (``W = decode_slack``); when it is full the method
    compresses back to ``B``: ``W = 1`` is the every-step schedule of H2O / TOVA / the KeepKV paper, a larger
    ``W`` amortises the compression over ``W`` steps. Methods that compress only once (SnapKV, PyramidKV) let
    the cache grow by the new tokens instead.

  Peak cache memory is therefore ``max(B + chunk, B + W)`` slots per head, whatever the prompt length.
"""

from __future__ import annotations

import torch
from torch import Tensor

from keepkv.cache.budget import entries_for_budget
from keepkv.cache.compressed import CompressedLayerCache
from keepkv.cache.kv_cache import LayerKVCache
from keepkv.cache.policy import CompressionMethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from keepkv.models.config import ModelConfig

CAPACITY_QUANTUM = 256


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class FullCacheManager:
    """Capacity = prompt (rounded up to whole chunks) + new tokens, rounded up to ``CAPACITY_QUANTUM`` so that
    prompts of similar lengths share one compiled decode graph."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        self.config, self.dtype, self.device = config, dtype, device
        self.caches: list[LayerKVCache] = []
        self.filled = 0

    def capacity_for(self, padded_prompt_tokens: int, max_new_tokens: int) -> int:
        return round_up(padded_prompt_tokens + max_new_tokens, CAPACITY_QUANTUM)

    def allocate(self, batch_size: int, padded_prompt_tokens: int, max_new_tokens: int, chunk: int,
                 prompt_tokens: int | None = None) -> list[LayerKVCache]:
        """Caches for a batch whose prompt takes ``padded_prompt_tokens`` slots (chunk padding included)."""
        capacity = self.capacity_for(padded_prompt_tokens, max_new_tokens)
        c = self.config
        if self.caches and self.caches[0].keys.shape[0] == batch_size and self.caches[0].capacity == capacity:
            for cache in self.caches:
                cache.reset()
        else:
            self.caches = [
                LayerKVCache(batch_size, c.num_kv_heads, capacity, c.head_dim, self.dtype, self.device)
                for _ in range(c.num_layers)
            ]
        self.filled = 0
        return self.caches

    def make_room(self, new_tokens: int) -> bool:
        """Ensure ``new_tokens`` more fit; returns True when the caches were replaced (re-attach them)."""
        if self.filled + new_tokens > self.caches[0].capacity:
            raise RuntimeError(f"cache overflow: {self.filled} + {new_tokens} > {self.caches[0].capacity} slots")
        return False

    def wrote(self, new_tokens: int) -> None:
        self.filled += new_tokens

    def end_prefill(self) -> bool:
        return False

    def entries_per_head(self) -> Tensor:
        """``[layers, batch, kv_heads]`` live entries (reads the device: for reports, not the hot path)."""
        return torch.stack([cache.live_entries() for cache in self.caches])

    def resident_bytes(self) -> int:
        return sum(cache.resident_bytes() for cache in self.caches)


class CompressedCacheManager(FullCacheManager):
    """Budgeted caches driven by a :class:`CompressionMethod` (see the module docstring for the schedule)."""

    def __init__(
        self, config: ModelConfig, dtype: torch.dtype, device: torch.device, method: CompressionMethod,
        kv_budget: float | int, decode_slack: int = 64,
    ) -> None:
        super().__init__(config, dtype, device)
        if decode_slack < 1:
            raise ValueError(f"decode_slack must be >= 1, got {decode_slack}")
        self.method, self.kv_budget, self.decode_slack = method, kv_budget, decode_slack
        self.budget = 0
        self.compressions = 0

    def _new_caches(self, batch_size: int, capacity: int) -> list[CompressedLayerCache]:
        c = self.config
        return [
            CompressedLayerCache(
                batch_size, c.num_kv_heads, capacity, c.head_dim, self.dtype, self.device, num_heads=c.num_heads,
                window=max(self.method.window, 1), sliding_window=c.sliding_window,
            )
            for _ in range(c.num_layers)
        ]

    def allocate(self, batch_size: int, padded_prompt_tokens: int, max_new_tokens: int, chunk: int,
                 prompt_tokens: int | None = None) -> list[LayerKVCache]:
        prompt_tokens = padded_prompt_tokens if prompt_tokens is None else prompt_tokens
        self.budget = entries_for_budget(self.kv_budget, prompt_tokens, self.method.protected_entries)
        self.max_new_tokens = max_new_tokens
        self.caches = self._new_caches(batch_size, self.budget + chunk)
        self.filled = 0
        self.compressions = 0
        return self.caches

    def compress_all(self) -> None:
        with torch.inference_mode():
            for layer, cache in enumerate(self.caches):
                self.method.compress(cache, layer, self.budget)
        self.filled = min(self.filled, self.budget)
        self.compressions += 1

    def make_room(self, new_tokens: int) -> bool:
        """Compress to the budget when ``new_tokens`` would not fit; the buffers stay the same objects."""
        if self.filled + new_tokens > self.caches[0].capacity:
            self.compress_all()
            if self.filled + new_tokens > self.caches[0].capacity:
                raise RuntimeError(f"cache overflow after compression: {self.filled} + {new_tokens} slots")
        return False

    def end_prefill(self) -> bool:
        """Compress to the budget and move into the decode buffer (``B + W`` slots, or ``B + max_new`` for
        methods that compress only once). Returns True: the caches were replaced."""
        if self.filled > self.budget:
            self.compress_all()
        slack = self.decode_slack if self.method.compresses_during_decode else max(self.max_new_tokens, 1)
        decode_caches = self._new_caches(self.caches[0].keys.shape[0], self.budget + slack)
        for old, new in zip(self.caches, decode_caches):
            kept = min(old.capacity, new.capacity)
            for name in ("keys", "values", "log_votes", "positions"):
                getattr(new, name)[:, :, :kept] = getattr(old, name)[:, :, :kept]
            new.window_queries.copy_(old.window_queries)
            new.window_positions.copy_(old.window_positions)
            new.cursor.copy_(old.cursor.clamp_max(new.capacity))
        self.caches = decode_caches
        return True
