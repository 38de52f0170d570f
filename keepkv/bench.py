"""Decode-throughput measuring on a synthetic cache state: the core of ``keepkv bench`` (:mod:`keepkv.cli.bench`),
``tools/bench_decode.py`` and ``tools/bench_serve.py``.

**Synthetic context.** Decode speed at context ``L`` does not need a real ``L``-token prefill: the caches are
filled with a synthetic state of ``L`` entries (random keys / values N(0, 1), positions ``0 .. L-1``; a
compressed cache holds ``budget`` of them — the 4 sinks, the 32 newest and a sorted random sample of the rest —
plus a random observation window), exactly where a chunked prefill and ``end_prefill`` would leave them. Then real
decode steps run through the engine's compiled decode step, and the method's decode-time compression (every
``W = decode_slack`` steps) runs inside the timed steps: one run of a compressed cache is ``W`` steps, so each run
holds exactly one compression and its cost is amortised per token. Contexts past the model's trained length are
allowed by an explicit override of ``max_position_embeddings`` (speed only; quality is not measured here).

torch and the model are imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import statistics
import time

DECODE_SLACK = 64
FULL_RUN_STEPS = 16


def load_network(model: str, dtype: str, max_context: int):
    """``(network, override)``: the model's :class:`Transformer` (weights in ``dtype``) and, when ``max_context``
    exceeds its trained context, the explicit ``max_position_embeddings`` override applied (else ``None``)."""
    from keepkv.compile_limits import allow_graph_per_shape
    from keepkv.models import load

    allow_graph_per_shape(256)  # one process benchmarks many (capacity, budget) points: a graph each
    lm = load(model, dtype=dtype, compile=False)
    network = lm.engine.network
    trained = network.config.max_position_embeddings
    override = None
    if max_context + 1024 > trained:  # explicit: positions past the trained context (speed only)
        override = {"max_position_embeddings": [trained, max_context + 1024]}
        network.config = network.config.replace(max_position_embeddings=max_context + 1024)
    return network, override


def make_engine(network, budget: float | None, method_options: dict | None = None):
    """A compiled :class:`GenerationEngine` over ``network``: full cache (``budget=None``) or KeepKV (default
    variant, or with ``method_options``; its whole compression compiled, see ``CompressionMethod.compress``) at
    ``kv_budget=budget`` with ``decode_slack = DECODE_SLACK``."""
    from keepkv.cache.manager import CacheManager
    from keepkv.cache.methods import make_method
    from keepkv.generate import GenerationEngine

    if budget is None:
        return GenerationEngine(network, compile=True)
    dtype = network.model.embed_tokens.weight.dtype
    method = make_method("keepkv", **(method_options or {}))
    manager = CacheManager(network.config, dtype, network.inv_freq.device, method, budget, DECODE_SLACK,
                           compiled_ops=True)
    return GenerationEngine(network, compile=True, cache_manager=manager)


def synthetic_positions(context: int, keep: int, generator):
    """``keep`` sorted positions out of ``0 .. context-1``: sinks 0..3, the 32 newest, a random sample between."""
    import torch

    if keep >= context:
        return torch.arange(context)
    sinks, recent = torch.arange(4), torch.arange(context - 32, context)
    middle = 4 + torch.randperm(context - 36, generator=generator)[: keep - 36].sort().values
    return torch.cat((sinks, middle, recent))


def fill_synthetic(engine, context: int, new_tokens: int, seed: int = 0, batch: int = 1) -> None:
    """Caches as a prefill of ``context`` tokens (then ``end_prefill``) would leave them (see module doc); with
    ``batch`` rows every row holds the same synthetic state."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    engine.prepare_caches(batch, context, new_tokens)
    manager = engine.cache_manager
    compressed = not manager.keeps_everything
    with torch.inference_mode():
        for layer, cache in enumerate(engine.caches):
            keep = manager.layer_budgets[layer] if compressed else context
            positions = synthetic_positions(context, keep, generator)
            n = positions.numel()
            shape = (1, cache.keys.shape[1], n, cache.keys.shape[3])
            cache.keys[:, :, :n] = torch.randn(shape, generator=generator).to(cache.keys.dtype)
            cache.values[:, :, :n] = torch.randn(shape, generator=generator).to(cache.values.dtype)
            cache.log_votes[:, :, :n] = 0.0
            cache.positions[:, :, :n] = positions.to(cache.positions.dtype)
            cache.cursor.fill_(n)
            if compressed:
                window = cache.window_queries.shape[2]
                cache.window_queries.copy_(torch.randn(cache.window_queries.shape[1:], generator=generator)
                                           .expand_as(cache.window_queries))
                cache.window_positions.copy_(torch.arange(context - window, context).expand(batch, window))
    manager.cursors = [int(cache.cursor.item()) for cache in engine.caches]
    manager.filled = max(manager.cursors)
    engine.end_prefill()


def weight_bytes(network) -> int:
    """Resident bytes of the parameters (a tied embedding counted once)."""
    seen, total = set(), 0
    for p in network.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def weight_bytes_read_per_token(network) -> int:
    """Parameter bytes one decode step reads: every weight, except that an input embedding *not* shared with
    the output head contributes only the one row it looks up (a tied table is read whole by the head)."""
    embedding = network.model.embed_tokens.weight
    if embedding.data_ptr() == network.lm_head.weight.data_ptr():
        return weight_bytes(network)
    row = embedding.shape[1] * embedding.element_size()
    return weight_bytes(network) - embedding.numel() * embedding.element_size() + row


def kv_read_bytes(engine) -> int:
    """Bytes of the KV buffers one decode step reads (keys, values, log-votes, positions; every slot)."""
    total = 0
    for cache in engine.caches:
        total += sum(t.numel() * t.element_size() for t in (cache.keys, cache.values, cache.log_votes,
                                                              cache.positions))
    return total


def time_decode(engine, context: int, runs: int, compressed: bool, on_run=None) -> dict:
    """Warm up (compile + first compression), then ``runs`` timed runs; returns the measured numbers."""
    import torch
    from torch._dynamo.utils import counters

    run_steps = DECODE_SLACK if compressed else FULL_RUN_STEPS
    warmup = DECODE_SLACK + 6 if compressed else 8
    manager = engine.cache_manager
    compress_times: list[float] = []
    if compressed:
        original = manager.compress_all

        def timed_compress_all(*args, **kwargs):
            started = time.perf_counter()
            original(*args, **kwargs)
            compress_times.append(time.perf_counter() - started)

        manager.compress_all = timed_compress_all
    token = torch.tensor([1])
    position = torch.tensor([context])
    step_times: list[float] = []

    def step():
        nonlocal token, position
        started = time.perf_counter()
        with torch.inference_mode():
            logits = engine.decode_step(token, position)
            token = logits.argmax(dim=-1)
        position = position + 1
        step_times.append(time.perf_counter() - started)

    started = time.perf_counter()
    step()
    first_step = time.perf_counter() - started
    for _ in range(warmup - 1):
        step()
    compress_times.clear()
    graphs_before = counters["stats"]["unique_graphs"]
    kv_bytes = kv_read_bytes(engine)
    resident = engine.cache_bytes()
    run_times = []
    for _ in range(runs):
        first = len(step_times)
        for _ in range(run_steps):
            step()
        run_times.append(sum(step_times[first:]))
        if on_run is not None:
            on_run()
    timed_steps = step_times[warmup:]
    plain = sorted(timed_steps)[: len(timed_steps) - len(compress_times)] if compress_times else timed_steps
    median_run = statistics.median(run_times)
    result = {
        "context": context,
        "first_step_seconds": first_step,
        "run_steps": run_steps,
        "runs": runs,
        "run_seconds": run_times,
        "tokens_per_second": run_steps / median_run,
        "seconds_per_token": median_run / run_steps,
        "median_step_seconds": statistics.median(timed_steps),
        "new_graphs_during_timed_runs": counters["stats"]["unique_graphs"] - graphs_before,
        "kv_read_bytes": kv_bytes,
        "cache_resident_bytes": resident,
        "capacity": engine.caches[0].capacity,
    }
    if compressed:
        result["compressions_timed"] = len(compress_times)
        result["compression_seconds_median"] = statistics.median(compress_times) if compress_times else None
        result["budget_entries"] = manager.budget
        step_plain = statistics.median(plain)
        result["median_step_seconds_without_compression"] = step_plain
        if compress_times:
            result["compression_fraction_of_step"] = statistics.median(compress_times) / DECODE_SLACK / step_plain
        manager.compress_all = original
    return result


def budget_key(budget: float | None) -> str:
    return "full" if budget is None else f"{budget:g}"


def run_point(network, context: int, budget: float | None, runs: int, on_run=None,
              method_options: dict | None = None) -> dict:
    """Build an engine (KeepKV with ``method_options`` when compressed), fill it with a synthetic ``context``,
    time it; adds bytes moved per token."""
    engine = make_engine(network, budget, method_options)
    compressed = budget is not None
    method = engine.cache_manager.method if compressed else None
    run_steps = DECODE_SLACK if compressed else FULL_RUN_STEPS
    new_tokens = (DECODE_SLACK + 6 if compressed else 8) + runs * run_steps + 8
    fill_synthetic(engine, context, new_tokens)
    result = time_decode(engine, context, runs, compressed, on_run)
    result["budget"] = budget_key(budget)
    if method is not None:
        result["method_options"] = method.options()  # what ran (JSON-ready: the options of the registry name)
    add_bandwidth_fields(result, weight_bytes_read_per_token(network))
    return result


def add_bandwidth_fields(point: dict, weights_read: int, copy_bandwidth: float | None = None) -> None:
    """``bytes_per_token`` = weight bytes a step reads + the KV bytes it read (``kv_read_bytes``); with the
    machine's ``copy_bandwidth`` (bytes/s) also ``fraction_of_bandwidth_bound`` = bytes per token / seconds per
    token / copy bandwidth. The one definition of both (stored points are re-derived with it)."""
    point["bytes_per_token"] = weights_read + point["kv_read_bytes"]
    if copy_bandwidth is not None:
        point["fraction_of_bandwidth_bound"] = point["bytes_per_token"] / point["seconds_per_token"] / copy_bandwidth
