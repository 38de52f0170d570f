"""The whole request, side by side in one run: time to first token, total time for ``prompt + N`` new tokens and
prefill tokens/s, for keepkv (full cache, KeepKV 10%, SnapKV 10%), Hugging Face ``transformers`` ``generate()``
(full cache) and NVIDIA ``kvpress`` (SnapKV press at the same budget).

Per grid point ``(model, dtype, context)`` every engine generates ``max(--new-tokens)`` greedy tokens (end of
sequence ignored) from the same prompt ids and stamps the wall clock when each new token is known; so one run
gives every ``N`` of ``--new-tokens``:

- ``ttft`` = start -> first new token (the prompt's forward pass, plus the first sampling);
- ``total(N)`` = start -> the ``N``-th new token (what a user waiting for ``N`` tokens waits);
- ``prefill tokens/s`` = prompt tokens / ``ttft``.

Rounds are interleaved (keepkv full, transformers, keepkv KeepKV, keepkv SnapKV, kvpress) after one untimed
warm-up round (keepkv compiles there); medians of ``--runs`` rounds. The peers run as ``--serve`` workers in
their own venvs (``tools/peers/setup.py``; ``tools/peers/README.md``); keepkv never imports them. Prompt: the first
``context`` tokens of the Jargon File test text (keepkv's tokenizer -> ids -> the peers), as ``bench_peers.py``.

Targets (issue 15), reported PASS / FAIL per grid point:
  keepkv full prefill tok/s >= 1.0x transformers; keepkv 10% (KeepKV) prefill tok/s >= 1.0x kvpress 10%;
  total(256) at 10% (KeepKV) >= 1.5x faster than transformers full and >= 1.3x faster than kvpress 10%.

The grid is big for 2 cores; choose it by flags and run it in pieces (results accumulate in the JSON, a grid point
is replaced when re-run)::

    flock /tmp/keepkv-cpu.lock .venv/bin/python tools/bench_request.py --model SmolLM2-135M-Instruct \\
        --dtype float32 --context 4096 --new-tokens 64 256 --runs 5
    .venv/bin/python tools/bench_request.py --report --readme   # table + PNG (+ README) from the JSON, nothing run

``keepkv_full`` and the compressed engines are ``load()``'s default (automatic prefill chunks,
``prefill_chunk_size=None``: long chunks, ``keepkv.generate.automatic_long_chunk``; a compressed cache's prefill
buffer holds ``budget + long chunk`` slots).
``--full-chunk-sizes 512 4096`` adds keepkv full-cache engines with explicit prefill chunk sizes (the full cache's
results do not depend on the chunk); ``--compressed-chunk-sizes 512`` adds each compressed engine with an explicit
chunk (it then compresses whenever ``budget + 512`` slots fill, as before automatic chunks reached compressed
caches, and so keeps other entries than the default's ``budget + long chunk`` schedule).

Writes ``results/bench/request.json`` and ``results/bench/request.png``; prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from bench_common import RESULTS, ROOT, machine_facts, record_round, save_figure, write_json
from bench_peers import ASSETS, PROMPTS, PeerWorker, prompt_ids, write_prompt_file

OUT = "request"
TARGETS = {"full_prefill_vs_transformers": 1.0, "budget_prefill_vs_kvpress": 1.0,
           "budget_total_vs_transformers": 1.5, "budget_total_vs_kvpress": 1.3}
TOTAL_AT = 256  # the N of the whole-request targets


def keepkv_request(model, ids: list[int], new_tokens: int) -> dict:
    """One greedy request through keepkv's engine (stop tokens ignored): when each new token was known."""
    import torch

    from keepkv.generate import GenerationStats
    from keepkv.sampling import SamplingConfig

    stats = GenerationStats()
    input_ids = torch.tensor([ids], dtype=torch.long, device=model.device)
    valid = torch.ones_like(input_ids, dtype=torch.bool)
    stamps, tokens = [], []
    started = time.perf_counter()
    for token in model.engine.generate_tokens(input_ids, valid, new_tokens, SamplingConfig(), (), stats):
        tokens.append(int(token[0]))  # host read: the token is known here
        stamps.append(time.perf_counter() - started)
    return {"prompt_tokens": len(ids), "new_tokens": len(tokens), "token_seconds": stamps, "tokens": tokens,
            "cache_capacity": stats.cache_capacity}


def request_metrics(run: dict, new_tokens: list[int]) -> dict:
    """``ttft``, ``prefill_tokens_per_second`` and ``total_seconds_at_<N>`` of one run's token stamps."""
    stamps = run["token_seconds"]
    if len(stamps) < max(new_tokens):
        raise SystemExit(f"a run produced {len(stamps)} tokens, expected {max(new_tokens)}")
    out = {"ttft_seconds": stamps[0], "prefill_tokens_per_second": run["prompt_tokens"] / stamps[0]}
    for n in new_tokens:
        out[f"total_seconds_at_{n}"] = stamps[n - 1]
    return out


def bench_point(name: str, dtype: str, context: int, args: argparse.Namespace) -> dict:
    from keepkv import assets
    from keepkv.models import load

    gguf = assets.offline_asset_path(ASSETS[name])
    if gguf is None:
        raise SystemExit(f"{name}: offline GGUF not installed; run `keepkv download --offline-assets all`")
    n_max = max(args.new_tokens)
    print(f"== {name} {dtype} {context} prompt tokens, N = {args.new_tokens}, {args.runs} runs", flush=True)
    keepkv_models = {"keepkv_full": load(name, dtype=dtype)}
    for chunk in args.full_chunk_sizes:  # the full cache with other prefill chunks (same results, other speed)
        keepkv_models[f"keepkv_full_chunk{chunk}"] = load(name, dtype=dtype, prefill_chunk_size=chunk)
    for method in args.methods:
        keepkv_models[f"keepkv_{method}_{args.budget}"] = load(name, kv_budget=args.budget, method=method,
                                                                dtype=dtype)
        for chunk in args.compressed_chunk_sizes:  # a compressed prefill with explicit chunks (other results)
            keepkv_models[f"keepkv_{method}_{args.budget}_chunk{chunk}"] = load(
                name, kv_budget=args.budget, method=method, dtype=dtype, prefill_chunk_size=chunk)
    first = next(iter(keepkv_models.values()))
    if context > first.config.max_position_embeddings:
        raise SystemExit(f"{name}: context {context} > its {first.config.max_position_embeddings} positions")
    ids = prompt_ids(first.tokenizer, context)
    ids_file = write_prompt_file(PROMPTS / f"{name}-{context}.json", ids, model=name, tokenizer="keepkv")
    log_dir = ROOT / ".cache" / "peers" / "logs"
    workers, engines = [], {}
    for key, model in keepkv_models.items():
        engines[key] = (lambda m: lambda: keepkv_request(m, ids, n_max))(model)
    try:
        if not args.no_peers:
            hf = PeerWorker("transformers", ["hf_decode.py", "--gguf", str(gguf), "--prompt-ids", str(ids_file),
                                             "--dtype", dtype, "--threads", str(args.threads), "--serve"],
                            log_dir / f"request-hf-{name}.log")
            workers.append(hf)
            kvp = PeerWorker("kvpress", ["kvpress_eval.py", "bench", "--gguf", str(gguf), "--prompt-ids",
                                         str(ids_file), "--dtype", dtype, "--press", "snapkv",
                                         "--compression-ratio", str(round(1 - args.budget, 6)), "--threads",
                                         str(args.threads), "--serve"], log_dir / f"request-kvpress-{name}.log")
            workers.append(kvp)
            engines["transformers_full"] = lambda: hf.run(dtype=dtype, new_tokens=n_max)
            engines[f"kvpress_snapkv_{args.budget}"] = lambda: kvp.run(dtype=dtype, new_tokens=n_max)
        order = ["keepkv_full", "transformers_full", *[k for k in engines if k.startswith("keepkv_") and
                                                        k != "keepkv_full"], f"kvpress_snapkv_{args.budget}"]
        order = list(dict.fromkeys(order))
        order = [k for k in order if k in engines]
        runs: dict[str, list[dict]] = {k: [] for k in order}
        for round_index in range(args.runs + 1):  # round 0: warm-up (compiles), not counted
            for key in order:
                result = engines[key]()
                metrics = request_metrics(result, args.new_tokens)
                metrics["tokens"] = result["tokens"][:16]
                record_round(runs, key, round_index, args.runs, metrics,
                             f"ttft {metrics['ttft_seconds']:6.2f}s  total({n_max}) "
                             f"{metrics[f'total_seconds_at_{n_max}']:6.2f}s")
    finally:
        for worker in workers:
            worker.close()
    engines_summary = {}
    for key, rows in runs.items():
        summary = {m: statistics.median(r[m] for r in rows) for m in rows[0] if m not in ("tokens",)}
        summary.update({f"{m}_all": [r[m] for r in rows] for m in rows[0] if m not in ("tokens",)})
        summary["first_tokens"] = rows[-1]["tokens"]
        engines_summary[key] = summary
    return {"model": name, "dtype": dtype, "context": context, "prompt_tokens": len(ids),
            "new_tokens": args.new_tokens, "budget": args.budget, "runs": args.runs, "engines": engines_summary,
            "targets": targets(engines_summary, args.budget),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def targets(engines: dict, budget: float) -> dict:
    """The issue-15 ratios (higher = keepkv better) and whether each meets its target."""
    full, hf = engines.get("keepkv_full"), engines.get("transformers_full")
    keep, kvp = engines.get(f"keepkv_keepkv_{budget}"), engines.get(f"kvpress_snapkv_{budget}")
    out = {}

    def put(key: str, ours: dict | None, peer: dict | None, metric: str, faster_is_higher: bool) -> None:
        """Ratio of the medians (higher = keepkv better), and the per-round paired ratios' range (rounds are
        interleaved, so round i of every engine ran under the same machine load)."""
        if not ours or not peer or metric not in ours or metric not in peer:
            return
        def ratio(a: float, b: float) -> float:
            return a / b if faster_is_higher else b / a
        paired = [ratio(a, b) for a, b in zip(ours[f"{metric}_all"], peer[f"{metric}_all"])]
        value = ratio(ours[metric], peer[metric])
        out[key] = {"ratio": value, "paired_min": min(paired), "paired_median": statistics.median(paired),
                    "paired_max": max(paired), "target": TARGETS[key], "met": value >= TARGETS[key]}

    total = f"total_seconds_at_{TOTAL_AT}"
    put("full_prefill_vs_transformers", full, hf, "prefill_tokens_per_second", True)
    put("budget_prefill_vs_kvpress", keep, kvp, "prefill_tokens_per_second", True)
    put("budget_total_vs_transformers", keep, hf, total, False)
    put("budget_total_vs_kvpress", keep, kvp, total, False)
    return out


def markdown(points: list[dict]) -> str:
    lines = ["| model | dtype | prompt | engine | TTFT s (min-max) | prefill tok/s | " + " | ".join(
        f"total N={n} s" for n in sorted({n for p in points for n in p["new_tokens"]})) + " | runs |"]
    ns = sorted({n for p in points for n in p["new_tokens"]})
    lines.append("|" + "---|" * 4 + "---:|" * (3 + len(ns)))
    for p in points:
        for key, e in p["engines"].items():
            totals = " | ".join(f"{e[f'total_seconds_at_{n}']:.2f}" if f"total_seconds_at_{n}" in e else "–"
                                for n in ns)
            ttft_all = e["ttft_seconds_all"]
            lines.append(f"| {p['model']} | {p['dtype']} | {p['prompt_tokens']} | {key} | {e['ttft_seconds']:.2f} "
                         f"({min(ttft_all):.2f}-{max(ttft_all):.2f}) | {e['prefill_tokens_per_second']:.0f} | "
                         f"{totals} | {p['runs']} |")
    lines += ["", "| model | dtype | prompt | target | ratio of medians | paired per round (min-max) | goal | met "
                  "| measured |", "|---|---|---|---|---:|---:|---:|---|---|"]
    for p in points:
        for key, t in p["targets"].items():
            spread = (f"{t['paired_min']:.2f}-{t['paired_max']:.2f}" if "paired_min" in t else "–")
            lines.append(f"| {p['model']} | {p['dtype']} | {p['prompt_tokens']} | {key} | {t['ratio']:.2f}x | "
                         f"{spread} | >= {t['target']}x | {'PASS' if t['met'] else 'FAIL'} | "
                         f"{p.get('date', '')[:10]} |")
    return "\n".join(lines)


README_BEGIN = "<!-- request:begin (issue 15; regenerated by `python tools/bench_request.py --report --readme`) -->"
README_END = "<!-- request:end -->"


def machine_label(machine: dict) -> str:
    """``"AMD EPYC (torch CPU capability AVX2; AVX-512 no, AVX-512 BF16 no, AMX no)"``: the CPU's name and the
    vector ISA its kernels can use (the name alone does not tell hosts apart); the name alone for files written
    before the ISA was recorded, "flags unknown" where ``/proc/cpuinfo`` could not be read."""
    if "torch_cpu_capability" not in machine:
        return machine["cpu"]
    flags = machine.get("avx512_amx_flags")
    if flags is None:
        return f"{machine['cpu']} (torch CPU capability {machine['torch_cpu_capability']}; flags unknown)"
    has = {name: any(f.startswith(prefix) for f in flags)
           for name, prefix in (("AVX-512", "avx512f"), ("AVX-512 BF16", "avx512_bf16"), ("AMX", "amx"))}
    isa = ", ".join(f"{name} {'yes' if present else 'no'}" for name, present in has.items())
    return f"{machine['cpu']} (torch CPU capability {machine['torch_cpu_capability']}; {isa})"


def machines_label(data: dict) -> str:
    """The machine(s) a results file's points ran on: each point's own record where it has one (a file can
    gather points of several runs), else the file's; distinct labels joined by " and "."""
    labels = [machine_label(p.get("machine", data["machine"])) for p in data.get("points", [])]
    return " and ".join(dict.fromkeys(labels)) or machine_label(data["machine"])


def write_readme(table: str, machine: str, source: str, readme: Path = ROOT / "README.md") -> None:
    """Put ``table`` between the whole-request markers of README's Performance section (added after the
    ``perf:end`` marker the first time; ``tools/perf_report.py`` owns the block before it); ``machine``: the CPU
    the JSON was measured on (``machine_label``); ``source``: the JSON's path in the repository."""
    text = readme.read_text()
    body = (f"{README_BEGIN}\n### Whole request (issue 15)\n\n`tools/bench_request.py` on {machine}, `{source}` "
            f"(greedy, 2 threads, the Jargon File prompt; medians of the timed rounds, engines interleaved per round; "
            f"*paired* = the ratio within each round; `keepkv_full` and the compressed engines are `load()`'s "
            f"defaults, automatic prefill chunks; `_chunk512`: the same method with 512-token prefill chunks, the "
            f"compressed schedule before 2026-12-05; *measured*: the day the point ran). Profile and history: "
            f"[docs/profile.md](docs/profile.md) sections 9, 12, 14-16 and 25.\n\n"
            f"{table}\n{README_END}")
    if README_BEGIN in text:
        head, rest = text.split(README_BEGIN, 1)
        text = head + body + rest.split(README_END, 1)[1]
    elif "<!-- perf:end -->" in text:
        text = text.replace("<!-- perf:end -->", "<!-- perf:end -->\n\n" + body, 1)
    else:
        raise SystemExit("README.md has no <!-- perf:end --> marker to put the whole-request table after")
    readme.write_text(text)


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not points:
        return
    columns = min(4, len(points))  # a grid, so that seven or more points stay readable
    rows = -(-len(points) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.8 * columns, 4.4 * rows), squeeze=False)
    for ax in axes.flat[len(points):]:
        ax.set_visible(False)
    for ax, p in zip(axes.flat, points):
        keys = list(p["engines"])
        ttft = [p["engines"][k]["ttft_seconds"] for k in keys]
        total = [p["engines"][k].get(f"total_seconds_at_{max(p['new_tokens'])}", 0) for k in keys]
        xs = range(len(keys))
        ax.bar(xs, total, color="#9ecae1", label=f"total, N = {max(p['new_tokens'])}")
        bars = ax.bar(xs, ttft, color="#3182bd", label="time to first token")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(list(xs), [k.replace("_", "\n") for k in keys], fontsize=7)
        ax.set_ylabel("seconds (median)")
        ax.set_title(f"{p['model']} {p['dtype']}\n{p['prompt_tokens']} prompt tokens", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("whole request: keepkv vs transformers (full)\nand kvpress (SnapKV, 10%)", fontsize=10)
    save_figure(fig, path, dpi=110)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", choices=sorted(ASSETS), help="repeatable; default SmolLM2")
    p.add_argument("--dtype", action="append", choices=("float32", "bfloat16"), help="repeatable; default float32")
    p.add_argument("--context", type=int, action="append", help="prompt tokens, repeatable; default 4096")
    p.add_argument("--new-tokens", type=int, nargs="+", default=[64, 256], help="the N read from each run")
    p.add_argument("--runs", type=int, default=5, help="timed rounds (median) after one warm-up round")
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--methods", nargs="+", default=["keepkv", "snapkv"], help="keepkv methods at --budget")
    p.add_argument("--full-chunk-sizes", type=int, nargs="*", default=[],
                   help="extra keepkv full-cache engines with these explicit prefill chunk sizes (default: automatic)")
    p.add_argument("--compressed-chunk-sizes", type=int, nargs="*", default=[],
                   help="also each --methods engine with these explicit prefill chunk sizes (512: the schedule "
                        "before automatic chunks reached compressed caches; it keeps other entries)")
    p.add_argument("--no-peers", action="store_true", help="keepkv only (no transformers / kvpress workers)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 2))
    p.add_argument("--out", default=OUT, help="results/bench/<out>.json and .png")
    p.add_argument("--report", action="store_true", help="only print the table and redraw the PNG from the JSON")
    p.add_argument("--readme", action="store_true", help="also write the table into README's Performance section")
    args = p.parse_args(argv)
    args.model = args.model or ["SmolLM2-135M-Instruct"]
    args.dtype = args.dtype or ["float32"]
    args.context = args.context or [4096]
    if min(args.new_tokens) < 3 or args.runs < 1 or not 0 < args.budget < 1 or min(args.context) < 16:
        p.error("need --new-tokens >= 3, --runs >= 1, 0 < --budget < 1, --context >= 16")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = RESULTS / f"{args.out}.json"
    previous = json.loads(path.read_text()).get("points", []) if path.exists() else []
    if not args.report:
        import torch

        torch.set_num_threads(args.threads)
        for name in args.model:
            for dtype in args.dtype:
                for context in args.context:
                    point = bench_point(name, dtype, context, args)
                    point["machine"] = machine_facts()  # per point: a file can gather points of several runs
                    point["command"] = " ".join(["tools/bench_request.py", *(argv if argv is not None
                                                                               else sys.argv[1:])])
                    previous = [p for p in previous if (p["model"], p["dtype"], p["context"])
                                != (name, dtype, context)] + [point]
                    write_json(f"{args.out}.json", {"benchmark": __doc__.split("\n\n")[0], "machine":
                                                    machine_facts(), "targets": TARGETS, "points": previous})
    previous.sort(key=lambda p: (p["model"], p["dtype"], p["context"]))
    if previous:
        plot(previous, RESULTS / f"{args.out}.png")
        table = markdown(previous)
        print(table)
        if args.readme:
            source = Path(os.path.relpath(path, ROOT)).as_posix()
            write_readme(table, machines_label(json.loads(path.read_text())), source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
