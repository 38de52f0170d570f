"""keepkv: long-context LLM inference with a compressed KV cache (KeepKV and the methods it is compared with)."""

__version__ = "0.1.0"
