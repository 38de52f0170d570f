"""Compile-cost controls: how many shape-specialised graphs keepkv's compiled functions may have in one process,
and which code is compiled once and stamped out (the decoder block)."""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

Function = TypeVar("Function", bound=Callable)

GRAPHS_PER_FUNCTION = 64
"""Shapes a compiled function of keepkv may be compiled for in one process (see :func:`allow_graph_per_shape`)."""


def allow_graph_per_shape(limit: int = GRAPHS_PER_FUNCTION) -> None:
    """Raise dynamo's recompile limits (8 graphs per function by default) to ``limit``.

    keepkv compiles with ``dynamic=False``: the decode step, the prefill FlexAttention call and the compression
    get one graph per (batch, capacity, chunk, dtype, heads), by design (capacities are bucketed, so a long-lived
    process sees a few dozen). With ``fullgraph=True`` the ninth shape of a function would be a hard error. Only
    ever raises the limits; called when an engine compiles and by the compiled FlexAttention call."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, limit)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 16 * limit)


def repeated_region(fn: Function) -> Function:
    """Mark ``fn`` (a decoder block's forward) as a region ``torch.compile`` compiles once and reuses.

    ``torch.compiler.nested_compile_region`` (measured with torch 2.13): while tracing a graph that calls ``fn``
    N times (the decode step calls every block: 30 for SmolLM2, 24 for Qwen2.5), dynamo and inductor compile the
    first call's subgraph and stamp it out for the next ones, instead of lowering and scheduling N copies. The region is
    recompiled when a call's inputs differ (shape, dtype, stride, globals such as a per-layer sliding window), so
    results do not change; only the graph boundary does (no fusion across blocks: the residual add of one block
    and the next block's RMSNorm stay two kernels; one more wrapper call per layer). Measured
    (``tools/bench_decode.py compile`` / ``decode``, torch 2.13 CPU, 2 threads, SmolLM2): cold compile of the
    decode step 50 s -> 18 s (float32), 61 s -> 17 s (bfloat16); full-cache steps 0-6% faster at 4k-32k, 10%-cache
    steps 2-3% slower (a fixed cost per step); ``docs/profile.md`` section 6.
    Eager calls: a no-op. Older torch: ``fn`` unchanged."""
    mark = getattr(torch.compiler, "nested_compile_region", None)
    return fn if mark is None else mark(fn)
