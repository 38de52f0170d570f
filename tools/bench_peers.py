"""keepkv side by side with its peers: Hugging Face ``transformers`` ``generate()`` and NVIDIA ``kvpress``.

One command, one process run, interleaved (keepkv, transformers, keepkv, kvpress, ...) so drift hits every engine:

(a) full-cache decode tokens/s: keepkv (``load(name, compile=True)``, compiled decode step) vs transformers
    ``generate()`` on the same GGUF weights (transformers dequantizes them), the same dtype, threads and prompt
    token ids (keepkv's tokenizer -> ids -> JSON file -> peer);
(b) compressed decode tokens/s: keepkv at ``kv_budget=0.1`` (KeepKV, compiled) vs kvpress at
    ``compression_ratio=0.9`` (SnapKV press: prefill under the press, then the pipeline's greedy decode loop).

Decode tokens/s excludes the first decode step on every engine (keepkv's holds the compile): ``(N - 2) / time of
steps 2..N-1``; end-of-sequence is ignored so every run makes exactly N tokens. Medians of ``--runs`` rounds after
one untimed warm-up round. The peers run in their own venvs (``tools/peers/setup.py``) as ``--serve`` workers that
keep the model loaded; keepkv never imports them.

Issue-5 targets (reported as pass/fail): keepkv full >= 1.5x transformers; keepkv@10% >= 1.5x kvpress@10%.

    flock /tmp/keepkv-cpu.lock .venv/bin/python tools/bench_peers.py            # both models, 4k, fp32
    ... tools/bench_peers.py --model SmolLM2-135M-Instruct --context 4096 --dtype float32 --runs 5

Writes ``results/bench/peers.json`` and ``results/bench/peers.png``; prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_common import RESULTS, ROOT, machine_facts, record_round, save_figure, write_json

PEERS = ROOT / "tools" / "peers"
VENVS = ROOT / ".cache" / "peers"
PROMPTS = ROOT / ".cache" / "peers" / "prompts"
TEXT = ROOT / "tests" / "data" / "jargon_ch4-6.txt"
ASSETS = {"SmolLM2-135M-Instruct": "smollm2", "Qwen2.5-Coder-0.5B-Instruct": "qwen2.5-coder"}
TARGET = 1.5


# ---- prompt ids ----------------------------------------------------------------------------------------------
def prompt_ids(tokenizer, context: int, text_path: Path = TEXT) -> list[int]:
    """The first ``context`` token ids of the Jargon File test text (repeated if it is shorter)."""
    ids = tokenizer.encode(text_path.read_text())
    if not ids:
        raise SystemExit(f"{text_path} tokenized to nothing")
    while len(ids) < context:
        ids = ids + ids
    return ids[:context]


def write_prompt_file(path: Path, ids: list[int], **meta) -> Path:
    """``{"input_ids": [...], **meta}`` — what ``tools/peers/*.py`` read with ``read_prompt_ids``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"input_ids": list(map(int, ids)), **meta}))
    return path


def read_prompt_file(path: Path) -> list[int]:
    return json.loads(Path(path).read_text())["input_ids"]


# ---- peer workers --------------------------------------------------------------------------------------------
class PeerWorker:
    """A peer script in ``--serve`` mode inside its venv: one JSON request line in, one JSON line out."""

    def __init__(self, venv: str, argv: list[str], log: Path) -> None:
        python = VENVS / venv / "bin" / "python"
        if not python.exists():
            raise SystemExit(f"peer venv {python.parent.parent} is missing: run `python tools/peers/setup.py`")
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log.open("w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([str(python), *argv], cwd=PEERS, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env)
        self.info = self._read()
        if not self.info.get("ready"):
            raise SystemExit(f"peer worker failed to start: {self.info} (log: {log})")

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise SystemExit(f"peer worker exited (code {self.proc.poll()}); see {self.log.name}")
            if line.startswith("{"):
                return json.loads(line)

    def run(self, **request) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": "run", **request}) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise SystemExit(f"peer worker: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        self.log.close()


# ---- keepkv runs ---------------------------------------------------------------------------------------------
def keepkv_run(model, ids: list[int], new_tokens: int) -> dict:
    """One greedy generation of exactly ``new_tokens`` tokens through keepkv's engine (stop tokens ignored)."""
    import torch

    from keepkv.generate import GenerationStats
    from keepkv.sampling import SamplingConfig

    stats = GenerationStats()
    input_ids = torch.tensor([ids], dtype=torch.long, device=model.device)
    valid = torch.ones_like(input_ids, dtype=torch.bool)
    tokens = [int(t[0]) for t in model.engine.generate_tokens(input_ids, valid, new_tokens, SamplingConfig(), (), stats)]
    return {
        "prompt_tokens": stats.prompt_tokens, "new_tokens": stats.new_tokens,
        "prefill_seconds": stats.prefill_seconds, "first_step_seconds": stats.first_step_seconds,
        "decode_seconds": stats.decode_seconds, "decode_steps": stats.decode_steps,
        "decode_tokens_per_second": stats.decode_tokens_per_second, "cache_capacity": stats.cache_capacity,
        "tokens": tokens,
    }


def agreement(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two greedy continuations (a sanity check that both ran the same model)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def bench_model(name: str, args: argparse.Namespace, log_dir: Path) -> dict:
    from keepkv import assets
    from keepkv.models import load

    gguf = assets.offline_asset_path(ASSETS[name])
    if gguf is None:
        raise SystemExit(f"{name}: offline GGUF not installed; run `keepkv download --offline-assets all`")
    dtype = args.dtype
    print(f"== {name} ({gguf.name}), {args.context} prompt tokens, {args.new_tokens} new, {dtype}", flush=True)
    full = load(name, dtype=dtype, compile=True)
    budget = load(name, kv_budget=args.budget, method=args.method, dtype=dtype, compile=True)
    ids = prompt_ids(full.tokenizer, args.context)
    ids_file = write_prompt_file(PROMPTS / f"{name}-{args.context}.json", ids, model=name, tokenizer="keepkv")
    hf = PeerWorker("transformers", ["hf_decode.py", "--gguf", str(gguf), "--prompt-ids", str(ids_file),
                                     "--dtype", dtype, "--threads", str(args.threads), "--serve"],
                    log_dir / f"hf-{name}.log")
    kvp = PeerWorker("kvpress", ["kvpress_eval.py", "bench", "--gguf", str(gguf), "--prompt-ids", str(ids_file),
                                 "--dtype", dtype, "--press", args.press, "--compression-ratio",
                                 str(round(1 - args.budget, 6)), "--threads", str(args.threads), "--serve"],
                     log_dir / f"kvpress-{name}.log")
    engines = {
        "keepkv_full": lambda: keepkv_run(full, ids, args.new_tokens),
        "transformers_full": lambda: hf.run(dtype=dtype, new_tokens=args.new_tokens),
        f"keepkv_{args.method}_{args.budget}": lambda: keepkv_run(budget, ids, args.new_tokens),
        f"kvpress_{args.press}_{args.budget}": lambda: kvp.run(dtype=dtype, new_tokens=args.new_tokens),
    }
    runs: dict[str, list[dict]] = {k: [] for k in engines}
    try:
        for round_index in range(args.runs + 1):  # round 0: warm-up (keepkv compiles here), not counted
            for key, fn in engines.items():
                started = time.perf_counter()
                result = fn()
                record_round(runs, key, round_index, args.runs, result,
                             f"decode {result['decode_tokens_per_second']:7.2f} tok/s  prefill "
                             f"{result['prefill_seconds']:6.2f}s  ({time.perf_counter() - started:.0f}s)")
    finally:
        hf.close()
        kvp.close()
    summary = {}
    for key, rows in runs.items():
        tps = [r["decode_tokens_per_second"] for r in rows]
        summary[key] = {
            "decode_tokens_per_second": statistics.median(tps), "decode_tokens_per_second_all": tps,
            "loadavg_1m_after_all": [r["loadavg_1m_after"] for r in rows],
            "prefill_seconds": statistics.median(r["prefill_seconds"] for r in rows),
            "cache_capacity": rows[-1].get("cache_capacity"),  # keepkv: slots of the decode buffer
            "kept_entries_mean": rows[-1].get("kept_entries_mean"),  # kvpress: entries left after the press
            "tokens": rows[-1]["tokens"],
        }
    keys = list(engines)
    full_ratio = summary[keys[0]]["decode_tokens_per_second"] / summary[keys[1]]["decode_tokens_per_second"]
    budget_ratio = summary[keys[2]]["decode_tokens_per_second"] / summary[keys[3]]["decode_tokens_per_second"]
    return {
        "model": name, "gguf": str(gguf), "dtype": dtype, "prompt_tokens": len(ids), "new_tokens": args.new_tokens,
        "budget": args.budget, "keepkv_method": args.method, "kvpress_press": args.press,
        "kvpress_compression_ratio": round(1 - args.budget, 6),
        "keepkv_cache_report": _report_summary(budget.cache_report()),
        "engines": summary,
        "greedy_agreement_keepkv_vs_transformers": agreement(summary[keys[0]]["tokens"], summary[keys[1]]["tokens"]),
        "full_speedup_vs_transformers": full_ratio, "full_target_met": full_ratio >= TARGET,
        "budget_speedup_vs_kvpress": budget_ratio, "budget_target_met": budget_ratio >= TARGET,
        "peer_versions": {"transformers_venv": _versions(hf.info), "kvpress_venv": _versions(kvp.info)},
        "hf_attn_implementation": hf.info.get("attn_implementation"),
    }


def _report_summary(report: dict) -> dict:
    """keepkv's cache report without the per-layer-and-head matrix (what was actually kept, after the last run)."""
    return {k: v for k, v in report.items() if k not in ("entries_per_layer_and_head", "capacity_per_layer")}


def _versions(info: dict) -> dict:
    return {k: v for k, v in info.items() if k.endswith("_version")}


# ---- report --------------------------------------------------------------------------------------------------
def table(results: list[dict]) -> str:
    lines = [f"{'model':30s} {'engine':28s} {'tok/s':>8s} {'prefill s':>9s} {'slots/kept':>10s}"]
    for res in results:
        for key, row in res["engines"].items():
            kept = row["cache_capacity"] or row["kept_entries_mean"]
            lines.append(f"{res['model']:30s} {key:28s} {row['decode_tokens_per_second']:8.2f} "
                         f"{row['prefill_seconds']:9.2f} {'' if kept is None else int(kept):>10}")
        lines.append(f"{'':30s} keepkv full / transformers = {res['full_speedup_vs_transformers']:.2f}x "
                     f"(target {TARGET}x: {'PASS' if res['full_target_met'] else 'FAIL'}); keepkv@{res['budget']} / "
                     f"kvpress@{res['budget']} = {res['budget_speedup_vs_kvpress']:.2f}x "
                     f"({'PASS' if res['budget_target_met'] else 'FAIL'}); greedy prefix agreement "
                     f"{res['greedy_agreement_keepkv_vs_transformers']}/{res['new_tokens']}")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]
    for ax, res in zip(axes[0], results):
        keys = list(res["engines"])
        values = [res["engines"][k]["decode_tokens_per_second"] for k in keys]
        bars = ax.bar(range(len(keys)), values, color=colors[: len(keys)])
        ax.bar_label(bars, fmt="%.1f")
        ax.set_xticks(range(len(keys)), [k.replace("_", "\n", 1) for k in keys], fontsize=8)
        ax.set_ylabel("decode tokens/s (median)")
        ax.set_title(f"{res['model']}\n{res['prompt_tokens']} prompt tokens, {res['dtype']}", fontsize=9)
    fig.suptitle("keepkv vs transformers generate() (full cache) and kvpress (10% budget)", fontsize=10)
    save_figure(fig, path, dpi=120)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", choices=sorted(ASSETS), help="repeatable; default both")
    p.add_argument("--context", type=int, default=4096, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run (>= 3)")
    p.add_argument("--runs", type=int, default=5, help="timed rounds (median reported) after one warm-up round")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--budget", type=float, default=0.1, help="kept fraction for (b)")
    p.add_argument("--method", default="keepkv", help="keepkv method for (b)")
    p.add_argument("--press", default="snapkv", help="kvpress press for (b)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 2))
    p.add_argument("--out", default="peers", help="results/bench/<out>.json and .png")
    p.add_argument("--fresh", action="store_true",
                   help="drop earlier results of models not re-run (default: keep them, same dtype and context)")
    args = p.parse_args(argv)
    args.model = args.model or list(ASSETS)
    if args.context < 16 or args.new_tokens < 3 or args.runs < 1 or not 0 < args.budget < 1 or args.threads < 1:
        p.error("need --context >= 16, --new-tokens >= 3, --runs >= 1, 0 < --budget < 1, --threads >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    log_dir = ROOT / ".cache" / "peers" / "logs"
    results = []
    for name in args.model:
        result = bench_model(name, args, log_dir)
        result["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        results.append(result)
    previous = RESULTS / f"{args.out}.json"
    if previous.exists() and not args.fresh:  # keep the other models' earlier results (each row has its date)
        old = json.loads(previous.read_text()).get("results", [])
        results = [r for r in old if r["model"] not in args.model and r.get("dtype") == args.dtype
                   and r.get("prompt_tokens") == args.context] + results
    payload = {"machine": machine_facts(), "threads": args.threads, "dtype": args.dtype, "context": args.context,
               "new_tokens": args.new_tokens, "runs": args.runs, "target_speedup": TARGET, "results": results,
               "command": " ".join(["tools/bench_peers.py", *(argv if argv is not None else sys.argv[1:])])}
    path = write_json(f"{args.out}.json", payload)
    plot(results, RESULTS / f"{args.out}.png")
    print(table(results))
    print(f"wrote {path} and {RESULTS / (args.out + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
