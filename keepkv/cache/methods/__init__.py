"""The registry of KV-compression methods: one file per method, one line here.

``make_method(name, **options)`` builds a method from its name and hyper-parameters; ``"full"`` is the
uncompressed cache and has no method object.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from keepkv.cache.policy import CompressionMethod
from keepkv.cache.methods.keepkv import KeepKV
from keepkv.cache.methods.streamingllm import StreamingLLM
from keepkv.errors import KeepKVError, suggest

METHODS: dict[str, type[CompressionMethod]] = {
    "streamingllm": StreamingLLM,
    "keepkv": KeepKV,
}
FULL = "full"


def available_methods() -> list[str]:
    return [FULL, *METHODS]


def make_method(name: str, **options: Any) -> CompressionMethod | None:
    """The method called ``name`` with ``options`` (its dataclass fields); ``None`` for ``"full"``."""
    key = name.lower()
    if key == FULL:
        if options:
            raise KeepKVError(f"method 'full' takes no options, got {', '.join(sorted(options))}")
        return None
    if key not in METHODS:
        raise KeepKVError(
            f"unknown method {name!r}; available: {', '.join(available_methods())}.{suggest(name, available_methods())}"
        )
    method_class = METHODS[key]
    allowed = {field.name for field in dataclasses.fields(method_class)}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise KeepKVError(
            f"method {key!r} does not take option(s) {', '.join(unknown)}; its options are: {', '.join(sorted(allowed))}"
        )
    return method_class(**options)
