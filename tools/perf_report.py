"""Regenerate the README "Performance" block (between ``<!-- perf:begin`` and ``<!-- perf:end -->``) from the JSON
in ``results/bench/``. No measuring happens here.

    python tools/perf_report.py            # or: python tools/bench_decode.py --readme
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402

README = bc.ROOT / "README.md"
COMMAND = "python tools/perf_report.py"


def load(name: str) -> dict | None:
    return bc.read_json(name)


def decode_section(lines: list[str]) -> None:
    files = [json.loads(p.read_text()) for p in sorted(bc.RESULTS.glob("decode_*.json"))
             if p.name != "decode_attention.json"]
    if not files:
        return
    m = files[0]["machine"]
    lines += [
        f"Machine: {m['cpu']}, {m['torch_threads']} threads, {m['memory_gib']} GiB; torch {m['torch']}, "
        f"python {m['python']}; measured copy bandwidth (per benchmark process, the denominator of its `bw`): "
        + ", ".join(f"{d['dtype']} run {d['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s" for d in files)
        + ". Batch 1, compressed runs: "
        + "; ".join(sorted({f"{d['dtype']} `{d.get('method', 'keepkv')}`" for d in files}))
        + " (variant, merge reference; compiled merge op), decode slack W = 64: one timed run is 64 steps holding exactly one "
        "compression (its cost is included); full-cache runs are 16 steps; tokens/s = steps / median of 5 runs. "
        "**Synthetic context**: the cache is filled with L random entries (a compressed cache with its budget's "
        "worth, as a prefill would leave it) instead of a real L-token prefill; contexts past SmolLM2's trained 8k "
        "use an explicit position override (speed only). `bw` = bytes moved per token (weights + KV buffers "
        "read) / step time / copy bandwidth.",
        "",
        "| model | dtype | context | full tok/s | 10% tok/s | 10% / full | 20% tok/s | bw full | bw 10% | "
        "compression / step (10%) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for data in files:
        contexts = sorted({p["context"] for p in data["points"].values()})
        for c in contexts:
            get = lambda b: data["points"].get(f"{c}/{b}")  # noqa: E731
            full, ten, twenty = get("full"), get("0.1"), get("0.2")
            fmt = lambda r, k, f: (f.format(r[k]) if r and r.get(k) is not None else "–")  # noqa: E731
            ratio = f"{ten['tokens_per_second'] / full['tokens_per_second']:.2f}x" if full and ten else "–"
            lines.append(
                f"| {data['model']} | {data['dtype']} | {c} | {fmt(full, 'tokens_per_second', '{:.1f}')} | "
                f"{fmt(ten, 'tokens_per_second', '{:.1f}')} | {ratio} | {fmt(twenty, 'tokens_per_second', '{:.1f}')}"
                f" | {fmt(full, 'fraction_of_bandwidth_bound', '{:.0%}')} | "
                f"{fmt(ten, 'fraction_of_bandwidth_bound', '{:.0%}')} | "
                f"{fmt(ten, 'compression_fraction_of_step', '{:.1%}')} |"
            )
    lines.append("")
    for data in files:
        for key, full in sorted(data["points"].items()):
            ten = data["points"].get(key.replace("/full", "/0.1"))
            if key.endswith("/full") and ten:
                lines.append(f"- {data['model']} {data['dtype']} at {full['context']}: resident cache at 10% = "
                             f"{ten['cache_resident_bytes'] / 1e6:.1f} MB = "
                             f"{ten['cache_resident_bytes'] / full['cache_resident_bytes']:.1%} of the full cache's "
                             f"{full['cache_resident_bytes'] / 1e6:.1f} MB (votes, positions, window, W slack "
                             "included); first decode step incl. compile "
                             f"{ten['first_step_seconds']:.0f} s; new graphs during the timed runs: "
                             f"{full['new_graphs_during_timed_runs'] + ten['new_graphs_during_timed_runs']}.")
    lines += ["", "![decode tokens/s vs context](results/bench/decode_throughput.png)", ""]


def kernel_section(lines: list[str]) -> None:
    decode, prefill = load("decode_attention.json"), load("prefill_attention.json")
    if decode:
        lines += ["Attention kernels at decode (q_len = 1, one layer call, compiled, median):", "",
                  "| shapes | dtype | slots | flex µs | SDPA + bias µs | packed µs (used) | flex / SDPA |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in decode["rows"]:
            lines.append(f"| {r['model_shapes']} | {r['dtype']} | {r['capacity']} | {r['flex_us']:.0f} | "
                         f"{r['sdpa_additive_bias_us']:.0f} | {r['packed_us']:.0f} | {r['flex_over_sdpa']:.2f} |")
        lines.append("")
    if prefill:
        lines += ["Attention kernels for a prefill chunk (q_len = 512, compiled, median):", "",
                  "| dtype | slots | flex ms | SDPA + bias ms | flex / SDPA |", "|---|---:|---:|---:|---:|"]
        for r in prefill["rows"]:
            lines.append(f"| {r['dtype']} | {r['capacity']} | {r['flex_ms']:.1f} | "
                         f"{r['sdpa_additive_bias_ms']:.1f} | {r['flex_over_sdpa']:.2f} |")
        lines.append("")


def other_section(lines: list[str]) -> None:
    compile_ = load("compile.json")
    if compile_:
        for r in compile_["rows"]:
            lines.append(f"- Compile ({r['model']}, {r['dtype']}, 10% cache at {r['context']}): first decode step "
                         f"cold {r['cold_first_step_seconds']:.0f} s, warm (inductor cache) "
                         f"{r['warm_first_step_seconds']:.1f} s; recompiles over the next 99 steps: "
                         f"{r['cold_new_graphs_over_99_steps']}.")
    memory = load("prefill_memory.json")
    if memory:
        mb = lambda x: f"{x / 2**20:.0f} MiB"  # noqa: E731
        lines.append(
            f"- Memory, {memory['model']} {memory['dtype']}, {memory['context']}-token prompt, chunked prefill "
            f"(chunk {memory['chunk']}) at 10%: peak RSS - base = {mb(memory['peak_minus_base_bytes'])} vs bound "
            f"weights + 3 x budgeted cache + one chunk's activations = {mb(memory['bound_bytes'])} "
            f"({'met' if memory['within_bound'] else 'missed'}); prefill took "
            f"{memory['measured']['prefill_seconds']:.0f} s (eager, {memory['machine'].get('torch_threads')} "
            f"thread(s); RSS is the measurement here, not the time).")
    lines.append("- Profile of the decode step and what was changed: [docs/profile.md](docs/profile.md).")


def render() -> str:
    lines: list[str] = [f"Regenerate with `{COMMAND}` (from the JSON in `results/bench/`, written by "
                        "`tools/bench_decode.py` and `tools/bench_prefill.py`).", ""]
    decode_section(lines)
    kernel_section(lines)
    other_section(lines)
    return "\n".join(lines).rstrip() + "\n"


def write_readme() -> None:
    text = README.read_text()
    pattern = re.compile(r"(<!-- perf:begin[^\n]*-->\n)(.*?)(<!-- perf:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit("README.md has no <!-- perf:begin ... --> / <!-- perf:end --> block")
    body = render()
    README.write_text(pattern.sub(lambda m: m.group(1) + body + m.group(3), text, count=1))
    print(f"README.md Performance block regenerated ({len(body.splitlines())} lines)")


if __name__ == "__main__":
    write_readme()
