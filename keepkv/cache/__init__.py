"""The KV cache: fixed-capacity per-layer buffers that compression methods edit in place."""

from keepkv.cache.kv_cache import LayerKVCache, POSITION_DTYPE

__all__ = ["LayerKVCache", "POSITION_DTYPE"]
