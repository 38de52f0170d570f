"""Decode throughput of keepkv: full cache vs KeepKV at 10% / 20% budget, against context length.

Usage (each timed run under the CPU lock)::

    export OMP_NUM_THREADS=2 TORCHINDUCTOR_CACHE_DIR=/work/main/.cache/inductor KEEPKV_CACHE=/work/main/.cache/keepkv
    flock /tmp/keepkv-cpu.lock python tools/bench_decode.py decode --model SmolLM2-135M-Instruct --dtype float32 \
        --contexts 1024 4096 8192 16384 32768 --budgets full 0.1 0.2
    flock /tmp/keepkv-cpu.lock python tools/bench_decode.py attention  # flex, SDPA, packed, keepkv SDPA
    flock /tmp/keepkv-cpu.lock python tools/bench_decode.py compile        # cold / warm compile of the decode step
    flock /tmp/keepkv-cpu.lock python tools/bench_decode.py bandwidth      # copy and read bandwidth
    python tools/bench_decode.py plot && python tools/bench_decode.py --readme   # PNG + README block from JSON

**Synthetic context.** Decode speed at context ``L`` does not need a real ``L``-token prefill (minutes on this
machine): the caches are filled with a synthetic state of ``L`` entries (random keys / values, N(0, 1), positions
``0 .. L-1``; a compressed cache holds ``budget`` of them — the 4 sinks, the 32 newest and a sorted random sample
of the rest — plus a random observation window), exactly where a chunked prefill + ``end_prefill`` would leave
them. Then real decode steps run through the engine's compiled decode step (``GenerationEngine.decode_step``),
and KeepKV's decode-time compression (every ``W = decode_slack = 64`` steps, back to the budget; the library's
default variant and merge reference, recorded as ``method`` in the JSON; the whole compression compiled) runs
inside the timed steps. One *run* is 64 steps for a compressed cache (exactly one compression per run: the
amortised per-token time) and 16 steps for the full cache; reported tokens/s is ``steps / median(run time)``
over ``--runs`` (default 5) runs, after warm-up steps that include the compile and the first compression.
Contexts past a model's trained length (SmolLM2: 8k) extend positions beyond it: quality is irrelevant for
speed, and the override is explicit (``position_override`` in the JSON).

**Bandwidth bound.** Bytes a step must move = every weight once (tied embeddings once; an input embedding not
tied to the output head only for the row it looks up) + the KV buffers it reads (keys, values, log-votes,
positions of every slot of the fixed-capacity buffers). ``fraction of the bandwidth bound = bytes / step time /
copy bandwidth`` (:func:`bench_common.copy_bandwidth`).

Results: ``results/bench/decode_<model>_<dtype>.json`` (resumable: finished points are kept unless
``--force``), ``decode_attention.json``, ``compile.json``; ``decode_throughput.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import bench_common as bc

# ---- model-level decode benchmark (the measuring core lives in keepkv/bench.py) ---------------------------------
from keepkv.bench import (
    DECODE_SLACK, add_bandwidth_fields, budget_key, fill_synthetic, load_network, make_engine, run_point, weight_bytes,
    weight_bytes_read_per_token,
)


def keepkv_label() -> str:
    """What the compressed runs measure, from the library's defaults (e.g. ``"keepkv (minnorm, ema)"``)."""
    from keepkv.cache.methods.keepkv import KeepKV

    return f"keepkv ({KeepKV.variant}, {KeepKV.reference})"


def cmd_bandwidth(args) -> None:
    """Copy and read bandwidth of this machine at this thread count (``bandwidth.json``)."""
    copy = [bc.copy_bandwidth() for _ in range(args.repeats)]
    read = [bc.read_bandwidth() for _ in range(args.repeats)]
    payload = {"benchmark": "memory bandwidth (copy: 2 x 512 MB / t of copy_; read: 512 MB / t of sum)",
               "machine": bc.machine_facts(), "copy_bytes_per_s": sorted(copy)[len(copy) // 2],
               "read_bytes_per_s": sorted(read)[len(read) // 2], "copy_all": copy, "read_all": read}
    bc.write_json("bandwidth.json", payload)
    print(f"copy {payload['copy_bytes_per_s'] / 1e9:.1f} GB/s, read {payload['read_bytes_per_s'] / 1e9:.1f} GB/s")


def cmd_decode(args) -> None:
    from tqdm import tqdm

    torch.manual_seed(0)
    name = f"decode_{args.model}_{args.dtype}.json"
    existing = (bc.read_json(name) or {}) if not args.force else {}
    points = existing.get("points", {})
    bandwidth = existing.get("copy_bandwidth_bytes_per_s") or bc.copy_bandwidth()
    network, override = load_network(args.model, args.dtype, max(args.contexts))
    weights, weights_read = weight_bytes(network), weight_bytes_read_per_token(network)

    def derive_bandwidth_fields(point: dict) -> None:  # from what was measured: KV bytes read, step time
        add_bandwidth_fields(point, weights_read, bandwidth)

    for point in points.values():  # stored points follow the current definition too
        derive_bandwidth_fields(point)
    budgets = [None if b == "full" else float(b) for b in args.budgets]
    todo = [(c, b) for c in args.contexts for b in budgets if f"{c}/{budget_key(b)}" not in points]
    progress = tqdm(total=len(todo) * args.runs, desc=f"decode {args.model} {args.dtype}", file=sys.stderr)
    payload = {
        "benchmark": "decode", "model": args.model, "dtype": args.dtype, "batch": 1, "method": keepkv_label(),
        "decode_slack": DECODE_SLACK, "synthetic_context": True, "position_override": override,
        # the machine (and commit) of the last measured point: a run that measures nothing keeps it
        "machine": bc.machine_facts() if todo else existing.get("machine", bc.machine_facts()),
        "copy_bandwidth_bytes_per_s": bandwidth, "weight_bytes": weights,
        "weight_bytes_read_per_token": weights_read,
        "points": points,
    }
    for context, budget in todo:
        result = run_point(network, context, budget, args.runs, on_run=lambda: progress.update(1))
        derive_bandwidth_fields(result)
        points[f"{context}/{budget_key(budget)}"] = result
        payload["machine"] = bc.machine_facts()
        bc.write_json(name, payload)
        tqdm.write(f"{args.model} {args.dtype} L={context} {budget_key(budget)}: "
                   f"{result['tokens_per_second']:.2f} tok/s, first step {result['first_step_seconds']:.1f}s, "
                   f"bw {result['fraction_of_bandwidth_bound']:.0%}, new graphs "
                   f"{result['new_graphs_during_timed_runs']}"
                   + (f", compress {result['compression_seconds_median'] * 1e3:.1f} ms "
                      f"({result.get('compression_fraction_of_step', 0):.1%} of a step)" if budget else ""),
                   file=sys.stderr)
    progress.close()
    bc.write_json(name, payload)


# ---- attention kernels at decode (q_len = 1) -------------------------------------------------------------------
def sdpa_additive(q, keys, values, log_votes, kv_positions, q_positions, sliding_window=None):
    """The yardstick: ``scaled_dot_product_attention`` with the equivalent additive bias in the query's dtype, as
    a user would pass it (``keepkv.ops.attention.additive_vote_bias``; keepkv's own decode call keeps it float32)."""
    import torch.nn.functional as F

    from keepkv.ops.attention import additive_vote_bias

    group = q.shape[1] // keys.shape[1]
    bias = additive_vote_bias(log_votes, kv_positions, q_positions, group, sliding_window).to(q.dtype)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, enable_gqa=group > 1)


def attention_case(shape: dict, capacity: int, q_len: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, h, hkv, d = 1, shape["heads"], shape["kv_heads"], shape["head_dim"]
    q = torch.randn(b, h, q_len, d, generator=g).to(dtype)
    keys = torch.randn(b, hkv, capacity, d, generator=g).to(dtype)
    values = torch.randn(b, hkv, capacity, d, generator=g).to(dtype)
    log_votes = torch.zeros(b, hkv, capacity)
    log_votes[..., : capacity // 10] = math.log(3.0)
    log_votes[..., -16:] = -float("inf")  # empty tail slots, as in a fixed-capacity buffer
    kv_positions = torch.arange(capacity, dtype=torch.int32).expand(b, hkv, capacity).contiguous()
    q_positions = (capacity - 16 - q_len + torch.arange(q_len)).expand(b, q_len).contiguous()
    return q, keys, values, log_votes, kv_positions, q_positions


SHAPES = {"SmolLM2-135M-Instruct": {"heads": 9, "kv_heads": 3, "head_dim": 64},
          "Qwen2.5-Coder-0.5B-Instruct": {"heads": 14, "kv_heads": 2, "head_dim": 64}}


def time_kernel(fn, inner: int, runs: int) -> float:
    def batch():
        for _ in range(inner):
            fn()

    seconds, _ = bc.median_time(batch, runs=runs, warmup=1)
    return seconds / inner


def attention_points(args, q_len: int):
    """``(case, row)`` for every model shape x dtype x capacity of ``args``: the kernels' inputs
    (:func:`attention_case`) and the start of that point's result row."""
    for model in args.models:
        for dtype_name in args.dtypes:
            for capacity in args.capacities:
                case = attention_case(SHAPES[model], capacity, q_len, bc.dtype_of(dtype_name))
                yield case, {"model_shapes": model, "dtype": dtype_name, "capacity": capacity, "q_len": q_len}


def cmd_attention(args) -> None:
    from keepkv.ops.attention import (
        decode_kernel_for, vote_attention_flex, vote_attention_packed, vote_attention_reference, vote_attention_sdpa,
    )

    sdpa = torch.compile(sdpa_additive, fullgraph=True, dynamic=False)
    packed = torch.compile(vote_attention_packed, fullgraph=True, dynamic=False)
    sdpa_kernel = torch.compile(vote_attention_sdpa, fullgraph=True, dynamic=False)
    rows = []
    for case, row in attention_points(args, q_len=1):
        reference = vote_attention_reference(*case).float()
        for kernel, fn in (("flex", vote_attention_flex), ("sdpa_additive_bias", sdpa),
                           ("packed", packed), ("sdpa_kernel", sdpa_kernel)):
            out = fn(*case)
            row[f"{kernel}_max_abs_error"] = (out.float() - reference).abs().max().item()
            row[f"{kernel}_us"] = time_kernel(lambda: fn(*case), inner=20, runs=args.runs) * 1e6
        row["flex_over_sdpa"] = row["flex_us"] / row["sdpa_additive_bias_us"]
        row["flex_over_packed"] = row["flex_us"] / row["packed_us"]
        # what keepkv's decode step runs here (RuntimeOptions.decode_kernel = "auto"): packed or keepkv's SDPA call
        row["decode_kernel"] = decode_kernel_for(case[0].dtype, row["capacity"], device=case[0].device)
        row["decode_us"] = row["packed_us" if row["decode_kernel"] == "packed" else "sdpa_kernel_us"]
        rows.append(row)
        bc.print_row(row, digits=3)
    bc.write_rows("decode_attention.json", "attention kernels, decode (q_len = 1), compiled, per layer call",
                  args.runs, rows)


# ---- compile cost ----------------------------------------------------------------------------------------------
def compile_worker(args) -> None:
    """One phase of ``compile`` in this fresh process (``--worker``): the first decode step of a KeepKV engine at
    ``args.budget`` on a synthetic ``args.context`` (compile included), then 99 more steps in which a recompile is
    an error; prints one JSON line."""
    from torch._dynamo.utils import counters

    (model,), (dtype,) = args.models, args.dtypes
    network, _ = load_network(model, dtype, args.context)
    engine = make_engine(network, args.budget)
    fill_synthetic(engine, args.context, 200)
    token, pos = torch.tensor([1]), torch.tensor([args.context])
    started = time.perf_counter()
    with torch.inference_mode():
        engine.decode_step(token, pos)
    first = time.perf_counter() - started
    graphs = counters["stats"]["unique_graphs"]
    recompiled = False
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):  # a graph compiled once may never compile again
            for i in range(1, 100):
                with torch.inference_mode():
                    engine.decode_step(token, pos + i)
    except torch._dynamo.exc.RecompileError:
        recompiled = True
    print(json.dumps({"first_step_seconds": first, "graphs_after_first_step": graphs,
                      "new_graphs_over_99_steps": counters["stats"]["unique_graphs"] - graphs,
                      "recompiled": recompiled, "compressions": engine.cache_manager.compressions}))


def cmd_compile(args) -> None:
    if args.worker:
        compile_worker(args)
        return
    rows = []
    for model in args.models:
        for dtype in args.dtypes:
            cache_dir = tempfile.mkdtemp(prefix="keepkv-inductor-")
            row = {"model": model, "dtype": dtype, "context": args.context, "budget": args.budget}
            for phase in ("cold", "warm"):
                env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
                command = [sys.executable, str(Path(__file__).resolve()), "compile", "--models", model, "--dtypes",
                           dtype, "--context", str(args.context), "--budget", repr(args.budget), "--worker"]
                out = subprocess.run(command, env=env, capture_output=True, text=True)
                if out.returncode != 0:
                    raise SystemExit(out.stderr[-3000:])
                measured = json.loads(out.stdout.strip().splitlines()[-1])
                row[f"{phase}_first_step_seconds"] = measured["first_step_seconds"]
                row[f"{phase}_graphs"] = measured["graphs_after_first_step"]
                row[f"{phase}_new_graphs_over_99_steps"] = measured["new_graphs_over_99_steps"]
                row[f"{phase}_recompiled"] = measured["recompiled"]
                row[f"{phase}_compressions"] = measured["compressions"]
                print(model, dtype, phase, measured, flush=True)
            rows.append(row)
    bc.write_json("compile.json", {
        "benchmark": "compile cost of the decode step (first decode step incl. compile; fresh "
                     "TORCHINDUCTOR_CACHE_DIR = cold, same dir again in a new process = warm); over the next 99 "
                     "steps (which hold a compression: its graph is the new one) recompilation is an error",
        "machine": bc.machine_facts(), "rows": rows,
    })


# ---- profile ---------------------------------------------------------------------------------------------------
def cmd_profile(args) -> None:
    """torch.profiler over decode steps (one of them compresses) for each budget; tables to a text file."""
    from torch.profiler import ProfilerActivity, profile

    W = DECODE_SLACK
    network, _ = load_network(args.model, args.dtype, args.context)
    report = []
    for budget in [None if b == "full" else float(b) for b in args.budgets]:
        engine = make_engine(network, budget)
        fill_synthetic(engine, args.context, 3 * W + 16)
        token, position = torch.tensor([1]), torch.tensor([args.context])
        steps = W + 4 if budget is not None else 16
        with torch.inference_mode():
            for i in range(W + 2 if budget is not None else 4):  # compile + first compression outside the profile
                engine.decode_step(token, position + i)
            with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
                for i in range(steps):
                    engine.decode_step(token, position + W + 2 + i)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
        report.append(f"## {args.model} {args.dtype} L={args.context} budget={budget_key(budget)}: "
                      f"{steps} decode steps" + (" (one compression)" if budget is not None else "") + "\n\n"
                      + table)
        print(report[-1], flush=True)
    bc.RESULTS.mkdir(parents=True, exist_ok=True)
    (bc.RESULTS / f"profile_{args.model}_{args.dtype}_{args.context}.txt").write_text(
        "\n\n".join(report) + f"\n\nmachine: {json.dumps(bc.machine_facts())}\n")


# ---- plot + README ---------------------------------------------------------------------------------------------
def decode_files() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(bc.RESULTS.glob("decode_*_*.json"))
            if p.name != "decode_attention.json"]


def cmd_plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = decode_files()
    fig, axes = plt.subplots(1, len(files), figsize=(5 * len(files), 4), squeeze=False)
    for ax, data in zip(axes[0], files):
        for budget, style in (("full", "o-"), ("0.1", "s-"), ("0.2", "^-")):
            pts = sorted((p["context"], p["tokens_per_second"]) for p in data["points"].values()
                         if p["budget"] == budget)
            if pts:
                label = "full cache" if budget == "full" else f"keepkv {float(budget):.0%}"
                ax.plot([c for c, _ in pts], [t for _, t in pts], style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("context (tokens, synthetic cache)")
        ax.set_ylabel("decode tokens/s (batch 1)")
        ax.set_title(f"{data['model']} {data['dtype']}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    m = files[0]["machine"] if files else {}
    fig.suptitle(f"keepkv decode, {m.get('torch_threads')} threads, {m.get('cpu', '')}, torch {m.get('torch')}",
                 fontsize=9)
    fig.tight_layout()
    bc.RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(bc.RESULTS / "decode_throughput.png", dpi=110)
    print(bc.RESULTS / "decode_throughput.png")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", action="store_true", help="regenerate the README Performance block and exit")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("decode")
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192, 16384, 32768])
    p.add_argument("--budgets", nargs="+", default=["full", "0.1", "0.2"])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--force", action="store_true", help="re-measure points already in the JSON")
    p = sub.add_parser("attention")
    p.add_argument("--models", nargs="+", default=list(SHAPES))
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--capacities", type=int, nargs="+", default=[1792, 4096, 16384])
    p.add_argument("--runs", type=int, default=7)
    p = sub.add_parser("compile")
    p.add_argument("--models", nargs="+", default=["SmolLM2-135M-Instruct"])
    p.add_argument("--dtypes", nargs="+", default=["float32"])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one phase, in a fresh process
    p = sub.add_parser("profile")
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--budgets", nargs="+", default=["full", "0.1"])
    sub.add_parser("plot")
    p = sub.add_parser("bandwidth")
    p.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.readme:
        from perf_report import write_readme

        write_readme()
        return
    {"decode": cmd_decode, "attention": cmd_attention, "compile": cmd_compile, "profile": cmd_profile,
     "plot": cmd_plot, "bandwidth": cmd_bandwidth}[args.command](args)


if __name__ == "__main__":
    main()
