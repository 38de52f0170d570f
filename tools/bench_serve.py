"""Throughput at a fixed KV memory cap: the largest batch that fits, and the total decode tokens/s it reaches.

Usage (each measuring command under the CPU lock, one (model, context) per call, < 10 min each)::

    export OMP_NUM_THREADS=2 TORCHINDUCTOR_CACHE_DIR=/work/main/.cache/inductor KEEPKV_CACHE=/work/main/.cache/keepkv
    flock /tmp/keepkv-cpu.lock python tools/bench_serve.py measure --model SmolLM2-135M-Instruct --context 16384 \
        --cap-gib 2 --settings full 0.1 0.2
    python tools/bench_serve.py report     # PNG + the markdown table (results/bench/serve.md) from the JSON

**What fits.** For each setting (the full cache, KeepKV at 10% / 20% with the library's defaults and
``decode_slack = 64``) the engine's own cache manager sizes one row's buffers for a prompt of ``context`` tokens
and ``--new-tokens`` new ones, exactly as a generation allocates them (:meth:`GenerationEngine.prepare_caches`,
then ``end_prefill``); ``resident_bytes`` counts every buffer (keys, values, float32 log-votes, int32 positions,
the observation window and score state of a compressed cache, the decode slack). The bytes per row are the *peak*
of a generation: the full cache's one buffer; for a compressed cache its prefill buffer (``budget + chunk`` slots)
plus its decode buffer (``budget + W``), which both exist while ``end_prefill`` copies one into the other. Every
buffer has the batch as its leading dimension, so the largest batch that fits is ``floor(cap / peak bytes per
row)``. Temporaries of the attention and compression kernels are not counted (they do not grow with the cache
for the full cache's decode step, and are per layer for a compression).

**What it reaches.** At that batch the caches are filled with the synthetic state of ``tools/bench_decode.py``
(random keys / values, the positions a prefill of ``context`` tokens and ``end_prefill`` would leave, the same for
every row; a real ``context``-token prefill of the batch would take minutes per point on this CPU and does not
change the decode step), then real compiled decode steps run through :meth:`GenerationEngine.decode_step`, the
method's decode-time compression included (one run of a compressed cache is ``W = 64`` steps, so exactly one
compression per run, amortised; one run of the full cache is 16 steps). Total tokens/s = ``batch x steps /
median(run time)`` over ``--runs`` runs, after warm-up steps that include the compile and the first compression.
Contexts past a model's trained length (SmolLM2: 8k) extend the positions explicitly (``position_override``),
as in ``bench_decode.py``: speed only, quality is not measured here.

Results: ``results/bench/serve_<model>_<dtype>.json`` (resumable per point; ``--force`` re-measures),
``results/bench/serve_throughput.png`` and ``results/bench/serve.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import bench_common as bc
from keepkv.bench import (
    DECODE_SLACK, FULL_RUN_STEPS, fill_synthetic, kv_read_bytes, load_network, make_engine,
)

MODELS = ("SmolLM2-135M-Instruct", "Qwen2.5-Coder-0.5B-Instruct")


def setting_budget(setting: str) -> float | None:
    return None if setting == "full" else float(setting)


def setting_label(setting: str) -> str:
    return "full cache" if setting == "full" else f"keepkv {float(setting):.0%}"


# ---- sizing -------------------------------------------------------------------------------------------------------
def bytes_per_row(network, context: int, budget: float | None, new_tokens: int) -> dict:
    """One row's cache bytes as the engine allocates them (module docstring): prefill buffer, decode buffer, peak."""
    engine = make_engine(network, budget)
    engine.prepare_caches(1, context, new_tokens)
    prefill_bytes, prefill_capacity = engine.cache_bytes(), engine.caches[0].capacity
    manager = engine.cache_manager
    if budget is None:
        return {"prefill_bytes": prefill_bytes, "decode_bytes": prefill_bytes, "peak_bytes": prefill_bytes,
                "prefill_capacity": prefill_capacity, "decode_capacity": prefill_capacity, "budget_entries": None}
    fill_synthetic(engine, context, new_tokens, batch=1)  # runs end_prefill: the decode buffers really exist
    decode_bytes, decode_capacity = engine.cache_bytes(), engine.caches[0].capacity
    return {"prefill_bytes": prefill_bytes, "decode_bytes": decode_bytes, "peak_bytes": prefill_bytes + decode_bytes,
            "prefill_capacity": prefill_capacity, "decode_capacity": decode_capacity,
            "budget_entries": manager.budget}


# ---- timing -------------------------------------------------------------------------------------------------------
def time_batch(network, context: int, budget: float | None, batch: int, runs: int, on_run=None) -> dict:
    """Decode ``runs`` runs at ``batch`` rows after warm-up; total tokens/s from the median run."""
    from torch._dynamo.utils import counters

    compressed = budget is not None
    run_steps = DECODE_SLACK if compressed else FULL_RUN_STEPS
    warmup = DECODE_SLACK + 6 if compressed else 8
    engine = make_engine(network, budget)
    fill_synthetic(engine, context, warmup + runs * run_steps + 8, batch=batch)
    token = torch.ones(batch, dtype=torch.long)
    position = torch.full((batch,), context, dtype=torch.long)

    def step() -> None:
        nonlocal token, position
        with torch.inference_mode():
            token = engine.decode_step(token, position).argmax(dim=-1)
        position = position + 1

    started = time.perf_counter()
    step()
    first_step = time.perf_counter() - started
    for _ in range(warmup - 1):
        step()
    graphs_before = counters["stats"]["unique_graphs"]
    run_seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        for _ in range(run_steps):
            step()
        run_seconds.append(time.perf_counter() - started)
        if on_run is not None:
            on_run()
    median = statistics.median(run_seconds)
    return {"batch": batch, "run_steps": run_steps, "runs": runs, "run_seconds": run_seconds,
            "first_step_seconds": first_step, "step_seconds": median / run_steps,
            "tokens_per_second_per_row": run_steps / median, "total_tokens_per_second": batch * run_steps / median,
            "measured_resident_bytes": engine.cache_bytes(), "kv_read_bytes_per_step": kv_read_bytes(engine),
            "compressions": engine.cache_manager.compressions,
            "new_graphs_during_timed_runs": counters["stats"]["unique_graphs"] - graphs_before}


def cmd_measure(args) -> None:
    from tqdm import tqdm

    torch.manual_seed(0)
    name = f"serve_{args.model}_{args.dtype}.json"
    existing = (bc.read_json(name) or {}) if not args.force else {}
    points = existing.get("points", {})
    cap = int(args.cap_gib * 2**30)
    network, override = load_network(args.model, args.dtype, args.context)
    payload = {
        "benchmark": "total decode throughput at a fixed KV memory cap (largest batch that fits)",
        "model": args.model, "dtype": args.dtype, "cap_bytes": cap, "new_tokens": args.new_tokens,
        "decode_slack": DECODE_SLACK, "prefill_chunk_size": 512, "synthetic_context": True,
        "position_override": override or existing.get("position_override"), "points": points,
    }
    todo = [s for s in args.settings if f"{args.context}/{s}" not in points]
    progress = tqdm(total=len(todo) * args.runs, desc=f"serve {args.model} L={args.context}", file=sys.stderr)
    for setting in todo:
        budget = setting_budget(setting)
        sizes = bytes_per_row(network, args.context, budget, args.new_tokens)
        batch = cap // sizes["peak_bytes"]
        point = {"context": args.context, "setting": setting, "label": setting_label(setting), **sizes,
                 "batch_that_fits": batch, "cap_bytes": cap}
        if batch < 1:
            point["note"] = "one row does not fit the cap"
        else:
            if args.max_batch and batch > args.max_batch:
                point["note"] = f"batch capped at --max-batch {args.max_batch} (fits {batch})"
                batch = args.max_batch
            point.update(time_batch(network, args.context, budget, batch, args.runs, on_run=lambda: progress.update(1)))
        points[f"{args.context}/{setting}"] = point
        payload["machine"] = bc.machine_facts()
        bc.write_json(name, payload)
        tqdm.write(f"{args.model} L={args.context} {setting}: {sizes['peak_bytes'] / 2**20:.1f} MiB/row -> batch "
                   f"{point['batch_that_fits']}, {point.get('total_tokens_per_second', 0):.1f} tok/s total",
                   file=sys.stderr)
    progress.close()


# ---- report -------------------------------------------------------------------------------------------------------
def load_points(dtype: str) -> list[dict]:
    rows = []
    for model in MODELS:
        data = bc.read_json(f"serve_{model}_{dtype}.json")
        if data:
            rows += [{"model": model, "cap_bytes": data["cap_bytes"], **p} for p in data["points"].values()]
    return rows


def markdown_table(rows: list[dict]) -> str:
    full = {(r["model"], r["context"]): r.get("total_tokens_per_second") for r in rows if r["setting"] == "full"}
    lines = ["| model | context | cache | MiB per row (peak) | batch that fits | total decode tok/s | vs full |",
             "|---|---:|---|---:|---:|---:|---:|"]
    order = {"full": 0}
    for r in sorted(rows, key=lambda r: (r["model"], r["context"], order.get(r["setting"], 1), r["setting"])):
        tps = r.get("total_tokens_per_second")
        base = full.get((r["model"], r["context"]))
        ratio = f"{tps / base:.2f}x" if tps and base else "-"
        lines.append(f"| {r['model']} | {r['context']} | {r['label']} | {r['peak_bytes'] / 2**20:.1f} | "
                     f"{r['batch_that_fits']} | {tps:.1f} | {ratio} |" if tps else
                     f"| {r['model']} | {r['context']} | {r['label']} | {r['peak_bytes'] / 2**20:.1f} | "
                     f"{r['batch_that_fits']} | - | - |")
    return "\n".join(lines)


def cmd_report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load_points(args.dtype)
    if not rows:
        raise SystemExit("no results/bench/serve_*.json yet: run `measure` first")
    caps = sorted({r["cap_bytes"] for r in rows})
    table = markdown_table(rows)
    cap_text = ", ".join(f"{c / 2**30:g} GiB" for c in caps)
    text = (f"Total decode throughput at a fixed KV memory cap of {cap_text} ({args.dtype}, 2 CPU threads, "
            f"synthetic context; `tools/bench_serve.py`):\n\n{table}\n")
    (bc.RESULTS / "serve.md").write_text(text)
    print(text)
    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        contexts = sorted({r["context"] for r in mine})
        settings = sorted({r["setting"] for r in mine}, key=lambda s: (s != "full", s))
        width = 0.8 / len(settings)
        for i, setting in enumerate(settings):
            values = [next((r.get("total_tokens_per_second") or 0 for r in mine
                            if r["context"] == c and r["setting"] == setting), 0) for c in contexts]
            batches = [next((r["batch_that_fits"] for r in mine if r["context"] == c and r["setting"] == setting), 0)
                       for c in contexts]
            xs = [j + i * width for j in range(len(contexts))]
            bars = ax.bar(xs, values, width, label=setting_label(setting))
            for bar, b in zip(bars, batches):
                ax.annotate(f"B={b}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                            va="bottom", fontsize=8)
        ax.set_xticks([j + width * (len(settings) - 1) / 2 for j in range(len(contexts))],
                      [f"{c // 1024}k" for c in contexts])
        ax.set_xlabel("context (tokens, synthetic cache)")
        ax.set_ylabel("total decode tokens/s")
        ax.set_title(f"{model}, KV cap {cap_text}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(bc.RESULTS / "serve_throughput.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    m = commands.add_parser("measure", help="size and time the settings at one (model, context)")
    m.add_argument("--model", default="SmolLM2-135M-Instruct")
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    m.add_argument("--context", type=int, default=16384)
    m.add_argument("--cap-gib", type=float, default=2.0, help="KV memory cap in GiB (default 2)")
    m.add_argument("--settings", nargs="+", default=["full", "0.1", "0.2"], help="'full' and/or budget fractions")
    m.add_argument("--new-tokens", type=int, default=256, help="new tokens each row may generate (sizes the full "
                   "cache; default 256)")
    m.add_argument("--runs", type=int, default=3, help="timed runs per point (median; default 3)")
    m.add_argument("--max-batch", type=int, default=0, help="measure at most this batch (0 = what fits)")
    m.add_argument("--force", action="store_true", help="re-measure points already in the JSON")
    m.set_defaults(run=cmd_measure)
    r = commands.add_parser("report", help="PNG + markdown table from the JSON")
    r.add_argument("--dtype", default="float32")
    r.set_defaults(run=cmd_report)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
