"""Cold and warm compile cost of every method on the default path (``load(..., compile=True)``), one process each.

For each method spec a child process (this script with ``--child``) loads the model with that method and budget
from a fresh ``TORCHINDUCTOR_CACHE_DIR`` (cold) and generates from a real prompt; the first ``generate()``
includes every compile (prefill attention, decode step, compression), the second one in the same process is the
warm run. ``compile_seconds = first - second``. Then a second child reuses the same inductor directory (warm
start in a new process, what a user sees on the next run). Dynamo's recompile counter is recorded: a method
whose layers differ in budget must not recompile per layer.

Usage (under ``flock /tmp/keepkv-cpu.lock`` with ``OMP_NUM_THREADS=2``)::

    python tools/bench_compile_methods.py --methods keepkv pyramidkv d2o adakv-pyramidkv snapkv@pyramid
    python tools/bench_compile_methods.py --table    # print the markdown table of results/bench/compile_methods.json

Writes ``results/bench/compile_methods.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import bench_common as bc

PROMPT_FILE = "tests/data/jargon_ch4-6.txt"


def method_arguments(spec: str, budget: float) -> dict:
    """``name[@pyramid]`` -> ``load()`` keyword arguments (``@pyramid`` = ``layer_budgets="pyramid"``)."""
    name, _, suffix = spec.partition("@")
    if name == "full":
        return {}
    options = {"layer_budgets": "pyramid"} if suffix == "pyramid" else {}
    return dict(kv_budget=budget, method=name, **options)


def child(args) -> None:
    import torch
    from torch._dynamo.utils import counters

    from keepkv.models import load

    text = (bc.ROOT / PROMPT_FILE).read_text()
    model = load(args.model, **method_arguments(args.spec, args.budget))
    prompt = model.tokenizer.decode(model.tokenizer.encode(text)[: args.prompt_tokens])
    timings = []
    for _ in range(2):
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=args.new_tokens)
        timings.append(time.perf_counter() - start)
    print(json.dumps({"first_seconds": timings[0], "second_seconds": timings[1],
                      "unique_graphs": counters["stats"]["unique_graphs"],
                      "recompiles": sum(counters["recompiles"].values()) if "recompiles" in counters else 0,
                      "torch": torch.__version__}))


def measure(args, spec: str, cache_dir: str) -> dict:
    command = [sys.executable, __file__, "--child", "--spec", spec, "--model", args.model, "--budget",
               str(args.budget), "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
    out = subprocess.run(command, env=dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir), capture_output=True,
                         text=True, cwd=bc.ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{spec}: child failed\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| method | cold: first generate | compile (cold - steady) | new process, warm cache | graphs |",
             "|---|---:|---:|---:|---:|"]
    for row in rows:
        cold, warm = row["cold"], row["warm"]
        lines.append(f"| {row['spec']} | {cold['first_seconds']:.1f} s | "
                     f"{cold['first_seconds'] - cold['second_seconds']:.1f} s | {warm['first_seconds']:.1f} s | "
                     f"{cold['unique_graphs']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["full", "keepkv", "snapkv", "pyramidkv", "d2o",
                                                         "adakv-pyramidkv", "snapkv@pyramid", "pyramidkv+keepkv"])
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--table", action="store_true", help="print the table of the stored results and exit")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    path = bc.RESULTS / "compile_methods.json"
    if args.table:
        print(table(json.loads(path.read_text())["rows"]))
        return
    rows = []
    for spec in args.methods:
        cache_dir = tempfile.mkdtemp(prefix="keepkv-inductor-")
        row = {"spec": spec, "cold": measure(args, spec, cache_dir)}
        row["warm"] = measure(args, spec, cache_dir)
        rows.append(row)
        print(spec, json.dumps(row), flush=True)
    bc.write_json(path.name, {
        "benchmark": "compile cost per method on load()'s default compiled path: a fresh inductor cache (cold) "
                     "and the same cache in a new process (warm); first vs second generate() in one process",
        "model": args.model, "budget": args.budget, "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "machine": bc.machine_facts(), "rows": rows,
    })
    print(table(rows))


if __name__ == "__main__":
    main()
