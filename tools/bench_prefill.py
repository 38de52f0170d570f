"""Prefill benchmarks of keepkv: attention kernels for prefill chunks, and peak memory of a long chunked prefill.

Usage (under the CPU lock)::

    flock /tmp/keepkv-cpu.lock python tools/bench_prefill.py attention   # flex vs SDPA (+bias), q_len = chunk
    flock /tmp/keepkv-cpu.lock python tools/bench_prefill.py memory      # 32k-token prompt, 10% budget, RSS
    flock /tmp/keepkv-cpu.lock python tools/bench_prefill.py profile     # per-chunk split vs transformers
    flock /tmp/keepkv-cpu.lock python tools/bench_prefill.py chunks      # full cache at chunk 512/2048/4096/auto
    flock /tmp/keepkv-cpu.lock python tools/bench_prefill.py methods     # KeepKV vs SnapKV compressed prefill

**chunks** and **methods** are described in their functions' docstrings (:func:`cmd_chunks`, :func:`cmd_methods`);
results ``results/bench/prefill_chunks_<model>_<context>.json`` and ``prefill_methods_<model>_<context>.json``.

**attention**: one prefill chunk (``q_len = 512``) against caches of several capacities, FlexAttention with the
vote ``score_mod`` vs ``scaled_dot_product_attention`` with the equivalent additive float bias (``ln p`` or
``-inf``), both compiled; median of runs; max error against the dense reference.

**memory**: a fresh process (this script's ``memory --worker``) loads the model, then runs a chunked prefill of a
``--context``-token prompt (random token ids: memory does not depend on the text) at ``kv_budget = 0.1`` with
KeepKV (the engine compresses each time a chunk would not fit: ``B + chunk`` slots per head), and records RSS:
``base`` (torch + keepkv imported, nothing loaded), after load, and the peak (``VmHWM``). The bound checked is::

    peak - base <= weights + 3 x budgeted cache + one chunk's activations
    budgeted cache   = layers x kv_heads x (B + chunk) x (2 d x dtype bytes + 4 + 4)  (+ observation window)
    chunk activations = chunk x (6 hidden + 3 intermediate) x 4 B             (residual, norms, q/k/v/o, MLP)
                      + 4 x heads x chunk x (B + chunk) x 4 B                (eager score matrices: logits, mask,
                                                                             exp, weights in float32)

Results: ``results/bench/prefill_attention.json``, ``results/bench/prefill_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import bench_common as bc
from bench_decode import attention_points, sdpa_additive, time_kernel


def cmd_attention(args) -> None:
    from keepkv.ops.attention import vote_attention_flex, vote_attention_reference

    sdpa = torch.compile(sdpa_additive, fullgraph=True, dynamic=False)
    rows = []
    for case, row in attention_points(args, q_len=args.chunk):
        reference = vote_attention_reference(*case).float() if row["capacity"] <= 4096 else None
        for kernel, fn in (("flex", vote_attention_flex), ("sdpa_additive_bias", sdpa)):
            out = fn(*case)
            if reference is not None:
                row[f"{kernel}_max_abs_error"] = (out.float() - reference).abs().max().item()
            row[f"{kernel}_ms"] = time_kernel(lambda: fn(*case), inner=2, runs=args.runs) * 1e3
        row["flex_over_sdpa"] = row["flex_ms"] / row["sdpa_additive_bias_ms"]
        rows.append(row)
        bc.print_row(row, digits=4)
    bc.write_rows("prefill_attention.json", "attention kernels for one prefill chunk, compiled, per layer call",
                  args.runs, rows)


def memory_worker(args) -> dict:
    """The measuring half of ``memory``, run in a fresh process (``--worker``) so that RSS counts only this
    prefill: RSS with torch and keepkv imported (base), after loading, and the peak of the chunked prefill."""
    import keepkv.generate  # noqa: F401  (counted in the base RSS, with torch)
    from keepkv.models import load

    base = bc.rss_bytes()
    lm = load(args.model, kv_budget=0.1, method="keepkv", dtype=args.dtype, compile=False,
              prefill_chunk_size=args.chunk)
    engine = lm.engine
    engine.network.config = engine.network.config.replace(
        max_position_embeddings=max(engine.network.config.max_position_embeddings, args.context))
    after_load = bc.rss_bytes()
    bc.reset_peak_rss()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 10000, (1, args.context), generator=g)
    valid = torch.ones_like(ids, dtype=torch.bool)
    started = time.perf_counter()
    engine.prepare_caches(1, args.context, 1)
    with torch.inference_mode():
        engine.prefill(ids, valid)
        engine.end_prefill()
    seconds = time.perf_counter() - started
    c = engine.config
    manager = engine.cache_manager
    parameters = {p.data_ptr(): p for p in engine.network.parameters()}.values()
    return {"base_rss": base, "after_load_rss": after_load, "peak_rss": bc.peak_rss_since_reset(),
            "prefill_seconds": seconds, "budget_entries": manager.budget, "compressions": manager.compressions,
            "layers": c.num_layers, "kv_heads": c.num_kv_heads, "heads": c.num_heads, "head_dim": c.head_dim,
            "hidden": c.hidden_size, "intermediate": c.intermediate_size,
            "weight_bytes": sum(p.numel() * p.element_size() for p in parameters),
            "decode_cache_resident_bytes": engine.cache_bytes()}


def cmd_memory(args) -> None:
    if args.worker:
        print(json.dumps(memory_worker(args)))
        return
    command = [sys.executable, str(Path(__file__).resolve()), "memory", "--model", args.model, "--dtype", args.dtype,
               "--context", str(args.context), "--chunk", str(args.chunk), "--worker"]
    out = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    m = json.loads(out.stdout.strip().splitlines()[-1])
    elem = bc.dtype_of(args.dtype).itemsize
    slots = m["budget_entries"] + args.chunk
    cache = m["layers"] * m["kv_heads"] * slots * (2 * m["head_dim"] * elem + 8)
    window = m["layers"] * m["heads"] * 32 * m["head_dim"] * elem
    budgeted_cache = cache + window
    activations = args.chunk * (6 * m["hidden"] + 3 * m["intermediate"]) * 4 \
        + 4 * m["heads"] * args.chunk * slots * 4
    bound = m["weight_bytes"] + 3 * budgeted_cache + activations
    used = m["peak_rss"] - m["base_rss"]
    result = {
        "benchmark": "peak RSS of a chunked prefill at kv_budget=0.1 (keepkv, eager)", "model": args.model,
        "dtype": args.dtype, "context": args.context, "chunk": args.chunk, "machine": bc.machine_facts(),
        "measured": m, "budgeted_cache_bytes": budgeted_cache, "chunk_activation_bytes": activations,
        "bound_bytes": bound, "peak_minus_base_bytes": used, "within_bound": used <= bound,
        "formula": "peak - base <= weights + 3 x budgeted cache + one chunk's activations (see tools/bench_prefill.py)",
    }
    bc.write_json("prefill_memory.json", result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine",)}, indent=1, default=str))


# ---- profile: where a prefill's time goes ----------------------------------------------------------------------
class _Timer:
    """Accumulates wall-clock seconds of the wrapped callables, per label and per prefill chunk."""

    def __init__(self) -> None:
        self.chunk: dict[str, float] = {}
        self.chunks: list[dict[str, float]] = []

    def wrap(self, label: str, fn):
        def timed(*a, **k):
            started = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.chunk[label] = self.chunk.get(label, 0.0) + time.perf_counter() - started
        return timed

    def end_chunk(self) -> None:
        self.chunks.append(self.chunk)
        self.chunk = {}


def profile_keepkv(model: str, dtype: str, ids: list[int], kv_budget, method, runs: int, chunk: int | None,
                   prefill_kernel: str = "auto") -> dict:
    """Prefill ``ids`` through keepkv's default compiled path; per chunk: attention kernel, query observation
    (score state), compression (``make_room``), cache writes, the rest of the layers, and the LM head."""
    import statistics

    import keepkv.models.transformer as tr
    from keepkv.models import load

    from keepkv.runtime import RuntimeOptions

    kwargs = {"prefill_chunk_size": chunk} if chunk else {}
    lm = load(model, kv_budget=kv_budget, method=method, dtype=bc.dtype_of(dtype),
              runtime=RuntimeOptions(prefill_kernel=prefill_kernel), **kwargs)
    engine = lm.engine
    timer = _Timer()
    originals = (tr.vote_attention, tr.vote_attention_chunk)
    tr.vote_attention = timer.wrap("attention", originals[0])
    tr.vote_attention_chunk = timer.wrap("attention", originals[1])
    manager = engine.cache_manager
    manager.make_room = timer.wrap("compression", manager.make_room)
    forward_chunk = engine._forward_chunk

    def chunk_fn(*a):
        for cache in engine.caches:  # caches may be replaced by make_room: wrap the current ones per chunk
            if "observe_queries" not in cache.__dict__:
                cache.observe_queries = timer.wrap("observe_queries", cache.observe_queries)
                cache.write = timer.wrap("cache_write", cache.write)
        started = time.perf_counter()
        out = forward_chunk(*a)
        timer.chunk["chunk_total"] = time.perf_counter() - started
        timer.end_chunk()
        return out

    engine._forward_chunk = chunk_fn
    input_ids = torch.tensor([ids])
    valid = torch.ones_like(input_ids, dtype=torch.bool)
    totals = []
    try:
        for run in range(runs + 1):  # run 0 compiles
            timer.chunks = []
            engine.prepare_caches(1, len(ids), 1)
            started = time.perf_counter()
            with torch.inference_mode():
                engine.prefill(input_ids, valid)
                engine.end_prefill()
            totals.append((time.perf_counter() - started, timer.chunks))
    finally:
        tr.vote_attention, tr.vote_attention_chunk = originals
    timed = totals[1:]
    best = sorted(timed, key=lambda t: t[0])[len(timed) // 2]  # the median run
    per_chunk = []
    for c in best[1]:
        inner = sum(v for k, v in c.items() if k in ("attention", "observe_queries", "compression", "cache_write"))
        per_chunk.append({**{k: round(v * 1e3, 2) for k, v in c.items()},
                          "rest_of_layers": round((c["chunk_total"] - inner) * 1e3, 2)})
    keys = ("chunk_total", "attention", "observe_queries", "compression", "cache_write", "rest_of_layers")
    summed = {k: round(sum(c.get(k, 0.0) for c in per_chunk) / 1e3, 3) for k in keys}
    return {"engine": "keepkv", "kv_budget": kv_budget, "method": method or ("keepkv" if kv_budget else "full"),
            "chunk": engine.prefill_chunk_size, "prefill_seconds": statistics.median(t[0] for t in timed),
            "prefill_seconds_all": [t[0] for t in timed], "seconds_by_part": summed, "per_chunk_ms": per_chunk}


def profile_transformers(gguf: str, dtype: str, ids: list[int], runs: int) -> dict:
    """transformers' prefill (one forward of the whole prompt, SDPA, logits of the last token only) on the same
    GGUF weights, with its SDPA calls timed apart."""
    import statistics

    import torch.nn.functional as F

    from peers.peer_common import load_gguf

    model = load_gguf(gguf, dtype)
    timer = _Timer()
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = timer.wrap("attention", original)
    input_ids = torch.tensor([ids])
    seconds, parts = [], []
    try:
        for run in range(runs + 1):
            started = time.perf_counter()
            with torch.inference_mode():
                model(input_ids, attention_mask=torch.ones_like(input_ids), logits_to_keep=1, use_cache=True)
            seconds.append(time.perf_counter() - started)
            parts.append(timer.chunk)
            timer.chunk = {}
    finally:
        F.scaled_dot_product_attention = original
    import transformers

    mid = sorted(range(1, runs + 1), key=lambda i: seconds[i])[runs // 2]
    return {"engine": "transformers", "version": transformers.__version__, "prefill_seconds":
            statistics.median(seconds[1:]), "prefill_seconds_all": seconds[1:],
            "seconds_by_part": {"total": round(seconds[mid], 3), "attention": round(parts[mid]["attention"], 3),
                                "rest": round(seconds[mid] - parts[mid]["attention"], 3)}}


def cmd_profile(args) -> None:
    from bench_peers import ASSETS, prompt_ids
    from keepkv import assets
    from keepkv.models import load

    tokenizer = load(args.model, compile=False).tokenizer
    ids = prompt_ids(tokenizer, args.context)
    rows = []
    for dtype in args.dtypes:
        torch.set_default_dtype(torch.float32)
        for budget in args.budgets:
            kv_budget = None if budget >= 1.0 else budget
            row = profile_keepkv(args.model, dtype, ids, kv_budget, args.method, args.runs, args.chunk,
                                 args.prefill_kernel)
            row["dtype"], row["prefill_kernel"] = dtype, args.prefill_kernel
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "per_chunk_ms"}), flush=True)
        if not args.no_transformers:
            row = profile_transformers(str(assets.offline_asset_path(ASSETS[args.model])), dtype, ids, args.runs)
            row["dtype"] = dtype
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = args.out or f"prefill_profile_{args.model}_{args.context}.json"
    bc.write_json(out, {"benchmark": "where a prefill's time goes (keepkv per chunk; transformers whole prompt)",
                        "model": args.model, "context": args.context, "runs": args.runs,
                        "machine": bc.machine_facts(), "rows": rows})


# ---- chunks: the full-cache prefill at several chunk sizes (issue 15) -------------------------------------------
def _chunk_label(chunk: int | None) -> str:
    return "auto" if chunk is None else str(chunk)


def cmd_chunks(args) -> None:
    """Full-cache prefill of one prompt at explicit chunk sizes and with ``prefill_chunk_size=None`` (automatic),
    per dtype, in one process: one model per dtype, one engine per chunk sharing its network (the default
    compiled engine of ``load()``), one untimed warm-up round (compiles), then ``--runs`` rounds interleaving
    every (dtype, chunk); medians. Per run also the peak RSS above the RSS before it (the prefill's transient
    memory: activations plus allocator slack; the caches are allocated before the timer) and the last-token
    logits' max abs difference from the first chunk size of the same dtype."""
    import statistics

    from bench_peers import prompt_ids
    from keepkv.generate import GenerationEngine, activation_bytes_per_token, uncompressed_long_chunk
    from keepkv.models import load

    chunks = [None if c == "auto" else int(c) for c in args.chunks]
    engines: dict[tuple[str, str], GenerationEngine] = {}
    ids = None
    for dtype in args.dtypes:
        lm = load(args.model, dtype=dtype)
        ids = ids or prompt_ids(lm.tokenizer, args.context)
        for chunk in chunks:
            engines[dtype, _chunk_label(chunk)] = GenerationEngine(
                lm.engine.network, compile=True, prefill_chunk_size=chunk, runtime=lm.engine.runtime)
    input_ids = torch.tensor([ids])
    valid = torch.ones_like(input_ids, dtype=torch.bool)
    runs = {key: [] for key in engines}
    logits: dict[tuple[str, str], torch.Tensor] = {}
    widths: dict[tuple[str, str], list[int]] = {}
    for round_index in range(args.runs + 1):  # round 0: warm-up (compiles), not counted
        for key, engine in engines.items():
            engine.prepare_caches(1, len(ids), 1)
            seen: list[int] = []
            forward = engine._forward_chunk
            engine._forward_chunk = lambda i, p, v, f=forward, s=seen: s.append(i.shape[1]) or f(i, p, v)
            before = bc.rss_bytes()
            reset = bc.reset_peak_rss()
            started = time.perf_counter()
            with torch.inference_mode():
                out, _ = engine.prefill(input_ids, valid)
                engine.end_prefill()
            seconds = time.perf_counter() - started
            del engine._forward_chunk  # back to the class method
            peak = bc.peak_rss_since_reset() - before if reset else None
            logits[key], widths[key] = out[0].float().clone(), seen
            tag = "warm-up" if round_index == 0 else f"run {round_index}/{args.runs}"
            print(f"  [{tag}] {key[0]:9s} chunk {key[1]:>5s}: {seconds:7.3f} s  peak +{(peak or 0) / 2**20:6.0f} MiB"
                  f"  widths {seen}", flush=True)
            if round_index:
                runs[key].append({"seconds": seconds, "peak_rss_above_before": peak})
    rows = []
    for (dtype, label), rs in runs.items():
        engine = engines[dtype, label]
        reference = logits[dtype, _chunk_label(chunks[0])]
        seconds = [r["seconds"] for r in rs]
        peaks = [r["peak_rss_above_before"] for r in rs if r["peak_rss_above_before"] is not None]
        long_chunk = max(widths[dtype, label])
        per_token = activation_bytes_per_token(engine.config, engine.dtype)
        rows.append({
            "dtype": dtype, "chunk": label, "widths": widths[dtype, label],
            "prefill_seconds": statistics.median(seconds),
            "prefill_seconds_all": seconds, "tokens_per_second": len(ids) / statistics.median(seconds),
            "peak_rss_above_before_bytes": max(peaks) if peaks else None,
            "estimated_activation_bytes": per_token * long_chunk,
            "automatic_long_chunk": uncompressed_long_chunk(engine.config, engine.dtype, 1, 512, engine.runtime,
                                                            len(ids)),
            "activation_bound_bytes": engine.runtime.prefill_activation_bytes,
            "last_logits_max_abs_diff_vs_first": (logits[dtype, label] - reference).abs().max().item(),
            "last_logits_argmax_same": int(logits[dtype, label].argmax()) == int(reference.argmax()),
        })
    for dtype in args.dtypes:  # speed-up against the first chunk size, per dtype
        base = next(r for r in rows if r["dtype"] == dtype and r["chunk"] == _chunk_label(chunks[0]))
        for r in rows:
            if r["dtype"] == dtype:
                r["speedup_vs_first"] = base["prefill_seconds"] / r["prefill_seconds"]
                bc.print_row({k: v for k, v in r.items() if k != "prefill_seconds_all"})
    out = args.out or f"prefill_chunks_{args.model}_{args.context}.json"
    bc.write_json(out, {"benchmark": "full-cache prefill (compiled, load() default path) at several chunk sizes",
                        "model": args.model, "context": args.context, "runs": args.runs,
                        "command": " ".join(["tools/bench_prefill.py", *sys.argv[1:]]),
                        "machine": bc.machine_facts(), "rows": rows})
    print(chunks_markdown(rows))


def chunks_markdown(rows: list[dict]) -> str:
    lines = ["| dtype | chunk | forward widths | prefill s (median; min-max) | tok/s | vs first | peak RSS above "
             "before, MiB | activation estimate, MiB | max abs last-logit diff vs first |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        w = r["widths"]
        shown_widths = " + ".join(f"{w.count(x)}x{x}" for x in sorted(set(w), reverse=True))
        peak = r["peak_rss_above_before_bytes"]
        lines.append(f"| {r['dtype']} | {r['chunk']} | {shown_widths} | {r['prefill_seconds']:.2f} "
                     f"({min(r['prefill_seconds_all']):.2f}-{max(r['prefill_seconds_all']):.2f}) | "
                     f"{r['tokens_per_second']:.0f} | {r['speedup_vs_first']:.2f}x | "
                     f"{'–' if peak is None else f'{peak / 2**20:.0f}'} | "
                     f"{r['estimated_activation_bytes'] / 2**20:.0f} | {r['last_logits_max_abs_diff_vs_first']:.2e} |")
    return "\n".join(lines)


# ---- methods: where a compressed prefill's extra time goes (torch.profiler) -------------------------------------
def cmd_methods(args) -> None:
    """One compressed prefill per method (same prompt, budget and chunks; the default compiled ``load()``), after
    ``--warmup`` untimed prefills: the median wall time of ``--runs`` prefills, the time inside the compressions
    (``make_room`` + the end-of-prefill compression), dynamo's recompile / graph counters across the timed runs,
    then one prefill under ``torch.profiler`` whose ops are listed by self CPU time."""
    import statistics

    from torch._dynamo.utils import counters
    from torch.profiler import ProfilerActivity, profile

    from bench_peers import prompt_ids
    from keepkv.models import load

    report = {"model": args.model, "context": args.context, "budget": args.budget, "runs": args.runs,
              "command": " ".join(["tools/bench_prefill.py", *sys.argv[1:]]), "machine": bc.machine_facts(),
              "rows": []}
    for dtype in args.dtypes:
        for method in args.methods:
            lm = load(args.model, kv_budget=args.budget, method=method, dtype=dtype)
            engine = lm.engine
            ids = prompt_ids(lm.tokenizer, args.context)
            input_ids = torch.tensor([ids])
            valid = torch.ones_like(input_ids, dtype=torch.bool)
            manager = engine.cache_manager
            manager.prefill_buffer_budgets = args.prefill_buffer_budgets
            spent = {"compress": 0.0}
            compress_all = manager.compress_all

            def timed_compress(*a, _f=compress_all, **k):
                started = time.perf_counter()
                try:
                    return _f(*a, **k)
                finally:
                    spent["compress"] += time.perf_counter() - started

            manager.compress_all = timed_compress

            def prefill():
                engine.prepare_caches(1, len(ids), 1)
                with torch.inference_mode():
                    out, _ = engine.prefill(input_ids, valid)
                    engine.end_prefill()
                return out

            for _ in range(args.warmup):
                prefill()
            counters.clear()
            seconds, compress = [], []
            for _ in range(args.runs):
                spent["compress"] = 0.0
                started = time.perf_counter()
                prefill()
                seconds.append(time.perf_counter() - started)
                compress.append(spent["compress"])
            dynamo = {group: dict(values) for group, values in counters.items() if values}
            if args.dump:  # the compressed caches of the last timed prefill (to compare code versions)
                torch.save({"logits": prefill().float(), "caches": [
                    {name: getattr(c, name).clone() for name in ("keys", "values", "log_votes", "positions")}
                    for c in engine.caches]}, f"{args.dump}_{dtype}_{method}.pt")
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                prefill()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
            events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[: args.rows]
            row = {"dtype": dtype, "method": method, "compressions": manager.compressions,
                   "prefill_buffer_budgets": args.prefill_buffer_budgets,
                   "prefill_seconds": statistics.median(seconds), "prefill_seconds_all": seconds,
                   "compression_seconds": statistics.median(compress), "compression_seconds_all": compress,
                   "dynamo_counters_timed_runs": dynamo,
                   "profile_self_cpu_ms": {e.key: round(e.self_cpu_time_total / 1e3, 2) for e in events},
                   "profile_calls": {e.key: e.count for e in events}}
            report["rows"].append(row)
            print(f"== {dtype} {method}: prefill {row['prefill_seconds']:.3f} s, compressions "
                  f"{row['compression_seconds']:.3f} s ({manager.compressions} per prefill), dynamo {dynamo}",
                  flush=True)
            print(table, flush=True)
            del lm, engine, manager
    bc.write_json(args.out or f"prefill_methods_{args.model}_{args.context}.json", report)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("attention")
    p.add_argument("--models", nargs="+", default=["SmolLM2-135M-Instruct"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--capacities", type=int, nargs="+", default=[2176, 4096, 16384])
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--runs", type=int, default=5)
    p = sub.add_parser("memory")
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # the measuring, in a fresh process
    p = sub.add_parser("profile", help="per-chunk split of a prefill (keepkv) beside transformers' prefill")
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.1], help="1.0 = full cache")
    p.add_argument("--method", default=None, help="compression method (default: KeepKV)")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=None, help="prefill chunk (default: keepkv's)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--prefill-kernel", default="auto", help="RuntimeOptions.prefill_kernel for this run (auto, split, flex)")
    p.add_argument("--out", default=None, help="file name under results/bench/")
    p = sub.add_parser("chunks", help="full-cache prefill at several chunk sizes, automatic included")
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--chunks", nargs="+", default=["512", "2048", "4096", "auto"],
                   help="prefill_chunk_size values; 'auto' = None (the first is the reference)")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", default=None, help="file name under results/bench/")
    p = sub.add_parser("methods", help="compressed prefill per method: time, compressions, recompiles, profile")
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--dtypes", nargs="+", default=["float32"])
    p.add_argument("--methods", nargs="+", default=["keepkv", "snapkv"])
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rows", type=int, default=30, help="profiler rows shown")
    p.add_argument("--prefill-buffer-budgets", type=int, default=1,
                   help="CacheManager.prefill_buffer_budgets (k: compress when k budgets + a chunk fill)")
    p.add_argument("--dump", default=None, help="save the compressed caches to <dump>_<dtype>_<method>.pt")
    p.add_argument("--out", default=None, help="file name under results/bench/")
    args = parser.parse_args(argv)
    {"attention": cmd_attention, "memory": cmd_memory, "profile": cmd_profile,
     "chunks": cmd_chunks, "methods": cmd_methods}[args.command](args)


if __name__ == "__main__":
    main()
