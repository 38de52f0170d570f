"""The full cache as a method: keeps every entry, never compresses.

``make_method("full")`` (and every budget that keeps the whole prompt, ``kv_budget=None`` or ``1.0``) gives a
:class:`FullCache`; the cache manager (:class:`keepkv.cache.manager.CacheManager`) then sizes one buffer per layer
for the prompt and every new token and never calls :meth:`compress`.

``observe_window`` / ``accumulate_attention`` make it the shared prefill of an evaluation: its caches also record
the last ``observe_window`` queries and per-slot accumulated attention, the score state that the compressing
methods of a comparison read when they start from that prefill (:meth:`CacheManager.start_from_prefill`). With
both off (the default) its caches hold keys, values, votes and positions only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from keepkv.cache.compressed import CompressedLayerCache
from keepkv.cache.policy import CompressionMethod
from keepkv.errors import KeepKVError


@dataclass
class FullCache(CompressionMethod):
    """Every entry kept (``sinks``/``window`` protect nothing here: they are 0)."""

    name = "full"
    keeps_everything: ClassVar[bool] = True
    compresses_during_decode: ClassVar[bool] = False
    is_eviction_selector: ClassVar[bool] = False
    sinks: int = 0
    window: int = 0
    observe_window: int = 0
    accumulate_attention: bool = False

    @property
    def query_window(self) -> int:
        """Rows of the observation window its caches record (0: none)."""
        return self.observe_window

    def compress(self, cache: CompressedLayerCache, layer: int, budget: int, compiled: bool = False) -> None:
        raise KeepKVError("the full cache keeps every entry; it is never compressed")

    @property
    def needs_accumulated_attention(self) -> bool:
        """Whether its caches accumulate per-slot attention (the shared prefill of a comparison with H2O)."""
        return self.accumulate_attention
