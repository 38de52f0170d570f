"""``keepkv bench``: a quick decode-throughput table, full cache vs KeepKV at a few budgets, on a synthetic cache
state (the measuring itself: :mod:`keepkv.bench`; full benchmarks: ``tools/bench_decode.py``)."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> None:
    """Register ``keepkv bench`` on the CLI's sub-parsers."""
    p = subparsers.add_parser(
        "bench", help="quick decode-throughput table: full cache vs compressed (synthetic context)",
        description="Decode tokens/s at a few context lengths, full cache vs KeepKV at the given budgets, on a "
        "synthetic cache state (see keepkv/bench.py). Full benchmarks: tools/bench_decode.py.",
    )
    p.add_argument("model", nargs="?", default="SmolLM2-135M-Instruct")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--contexts", type=int, nargs="+", default=[4096], help="context lengths (default 4096)")
    p.add_argument("--budgets", nargs="+", default=["full", "0.1"], help="'full' and/or fractions (default: "
                   "full 0.1)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per point (median; default 3)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from keepkv.bench import load_network, run_point
    from keepkv.errors import KeepKVError

    budgets = []
    for b in args.budgets:
        try:
            budgets.append(None if b == "full" else float(b))
        except ValueError:
            raise KeepKVError(f"--budgets takes 'full' or fractions in (0, 1], got {b!r}") from None
    if args.runs < 1 or any(c < 64 for c in args.contexts):
        raise KeepKVError("--runs must be >= 1 and every context >= 64 tokens")
    network, _ = load_network(args.model, args.dtype, max(args.contexts))
    rows = []
    print(f"{args.model} {args.dtype}, batch 1, {torch.get_num_threads()} threads, synthetic context; "
          "first point of each kind includes compile time", file=sys.stderr)
    for context in args.contexts:
        for budget in budgets:
            r = run_point(network, context, budget, args.runs)
            rows.append(r)
            print(f"  L={context} {r['budget']}: {r['tokens_per_second']:.1f} tok/s", file=sys.stderr)
    full = {r["context"]: r["tokens_per_second"] for r in rows if r["budget"] == "full"}
    print(f"{'context':>8} {'cache':>6} {'tok/s':>8} {'vs full':>8} {'MB/token':>9} {'cache MB':>9}")
    for r in rows:
        # no full-cache point at this context (not asked for): nothing to compare with
        ratio = f"{r['tokens_per_second'] / full[r['context']]:.2f}x" if r["context"] in full else "-"
        print(f"{r['context']:>8} {r['budget']:>6} {r['tokens_per_second']:>8.1f} {ratio:>8} "
              f"{r['bytes_per_token'] / 1e6:>9.1f} {r['cache_resident_bytes'] / 1e6:>9.1f}")
    return 0
