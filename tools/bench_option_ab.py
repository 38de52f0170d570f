"""Decode speed of KeepKV under two values of one option, side by side in one process, beside the full cache.

Usage (alone on the machine; about 3 min per point and round on an AMD EPYC at 2 threads)::

    export OMP_NUM_THREADS=2 TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor KEEPKV_CACHE=$PWD/.cache/keepkv
    python tools/bench_option_ab.py --model SmolLM2-135M-Instruct --option value_norm_power --values 0 1 \\
        --points float32:8192 bfloat16:16384 --rounds 2 --out results/bench/value_norm_ab.json

A default or option change must keep the decode targets of the performance issue (10% / full at 8k and 16k):
this measures the candidate against the current value on the same synthetic caches as ``tools/bench_decode.py``
(:func:`keepkv.bench.run_point`: KeepKV's decode-time compression every 64 steps inside the timed steps), each
round running every value and the full cache in turn (in reverse order on odd rounds, so no engine always runs
first), so the ratios are paired. One JSON row per (point, round, value), the file rewritten after each row:
tokens/s, the median compression in ms, the median step without compression in ms, and the graphs compiled
during timed runs (expected 0).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import median

from keepkv.bench import load_network, run_point
from keepkv.eval.results import parse_option_value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--option", required=True, help="a KeepKV option (keepkv.cache.methods.keepkv.KeepKV)")
    parser.add_argument("--values", nargs="+", required=True, help="two or more values, the current one first")
    parser.add_argument("--points", nargs="+", default=["float32:8192", "bfloat16:16384"], help="dtype:context")
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per engine (tools/bench_decode.py)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    values = [parse_option_value(text) for text in args.values]
    rows = []
    for point in args.points:
        dtype, _, context_text = point.partition(":")
        context = int(context_text)
        network, _ = load_network(args.model, dtype, context)
        for round_index in range(args.rounds):
            engines = [*values, None]  # None: the full cache
            for value in engines if round_index % 2 == 0 else engines[::-1]:
                budget = None if value is None else args.budget
                options = None if value is None else {args.option: value}
                result = run_point(network, context, budget, args.runs, method_options=options)
                row = {"model": args.model, "dtype": dtype, "context": context, "round": round_index,
                       "budget": 1.0 if value is None else args.budget, "option": args.option,
                       "value": "full" if value is None else value,
                       "tokens_per_second": result["tokens_per_second"],
                       "compression_ms": 1000 * (result.get("compression_seconds_median") or 0.0),
                       "step_ms": 1000 * result.get("median_step_seconds_without_compression",
                                                    result["median_step_seconds"]),
                       "new_graphs": result["new_graphs_during_timed_runs"]}
                print(json.dumps(row), flush=True)
                rows.append(row)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(rows, indent=1) + "\n")  # a stopped run keeps its rows
    print(summary(rows))
    return 0


def summary(rows: list[dict]) -> str:
    """A markdown table: per point and value, the median tokens/s and compression ms over rounds, and the median
    of the per-round ratios to the full cache."""
    lines = ["| model, dtype, context | value | tok/s | compression ms | / full (per-round median) |",
             "|---|---|---:|---:|---:|"]
    keys = sorted({(r["model"], r["dtype"], r["context"]) for r in rows}, key=lambda k: (k[0], k[2], k[1]))
    for key in keys:
        here = [r for r in rows if (r["model"], r["dtype"], r["context"]) == key]
        full = {r["round"]: r["tokens_per_second"] for r in here if r["value"] == "full"}
        for value in dict.fromkeys(r["value"] for r in here):
            mine = [r for r in here if r["value"] == value]
            ratios = [r["tokens_per_second"] / full[r["round"]] for r in mine if r["round"] in full]
            ratio = f"{median(ratios):.2f}x" if ratios else "–"  # a round without its full cache pairs nothing
            speed, compression = (median(r[name] for r in mine) for name in ("tokens_per_second", "compression_ms"))
            lines.append(f"| {key[0]}, {key[1]}, {key[2]} | {value} | {speed:.1f} | {compression:.1f} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
