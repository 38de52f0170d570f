"""How many shape-specialised graphs keepkv's compiled functions may have in one process."""

from __future__ import annotations

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
