"""Compile-cost controls: how many shape-specialised graphs keepkv's compiled functions may have in one process,
and which code is compiled once and stamped out (the decoder block)."""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

Function = TypeVar("Function", bound=Callable)

GRAPHS_PER_FUNCTION = 64
"""Default number of shapes a compiled function of keepkv may be compiled for in one process
(``RuntimeOptions.graphs_per_function``; see :func:`allow_graph_per_shape`)."""


def allow_graph_per_shape(limit: int = GRAPHS_PER_FUNCTION) -> None:
    """Raise dynamo's recompile limits (8 graphs per function by default) to ``limit``.

    keepkv compiles with ``dynamic=False``: the decode step, the prefill FlexAttention call and the compression
    get one graph per (batch, capacity, chunk, dtype, heads), by design (capacities are bucketed, so a long-lived
    process sees a few dozen). With ``fullgraph=True`` the ninth shape of a function would be a hard error. Only
    ever raises the limits (process-wide dynamo settings); called once when an engine is built to compile
    (with ``RuntimeOptions.graphs_per_function``) and once at the first call of the compiled FlexAttention
    kernel (:func:`keepkv.ops.attention.vote_attention_flex`), never per call."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, limit)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 16 * limit)


def repeated_region(fn: Function) -> Function:
    """Mark ``fn`` (a decoder block's forward) as a region ``torch.compile`` compiles once and reuses.

    ``torch.compiler.nested_compile_region``: while tracing a graph that calls ``fn`` N times (the decode step
    calls every block), dynamo and inductor compile the first call's subgraph and stamp it out for the next ones,
    instead of lowering and scheduling N copies. The region is recompiled when a call's inputs differ (shape,
    dtype, stride, globals such as a per-layer sliding window), so results do not change; only the graph boundary
    does (no fusion across blocks: the residual add of one block and the next block's RMSNorm stay two kernels;
    one more wrapper call per layer). It cuts the cold compile of the decode step by about three times
    (``docs/profile.md`` section 6).
    Eager calls: a no-op. Older torch: ``fn`` unchanged."""
    mark = getattr(torch.compiler, "nested_compile_region", None)
    return fn if mark is None else mark(fn)
