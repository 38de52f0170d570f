"""Prefill benchmarks of keepkv: attention kernels for prefill chunks, and peak memory of a long chunked prefill.

Usage (under the CPU lock)::

    flock /tmp/keepkv-cpu.lock python tools/bench_prefill.py attention   # flex vs SDPA (+bias), q_len = chunk
    flock /tmp/keepkv-cpu.lock python tools/bench_prefill.py memory      # 32k-token prompt, 10% budget, RSS

**attention**: one prefill chunk (``q_len = 512``) against caches of several capacities, FlexAttention with the
vote ``score_mod`` vs ``scaled_dot_product_attention`` with the equivalent additive float bias (``ln p`` or
``-inf``), both compiled; median of runs; max error against the dense reference.

**memory**: a child process loads the model, then runs a chunked prefill of a ``--context``-token prompt
(random token ids: memory does not depend on the text) at ``kv_budget = 0.1`` with KeepKV (the engine compresses
each time a chunk would not fit: ``B + chunk`` slots per head), and records RSS: ``base`` (torch + keepkv imported,
nothing loaded), after load, and the peak (``VmHWM``). The bound checked is::

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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import bench_common as bc  # noqa: E402
from bench_decode import SHAPES, attention_case, sdpa_additive, time_kernel  # noqa: E402


def cmd_attention(args) -> None:
    from keepkv.ops.attention import vote_attention_flex, vote_attention_reference

    sdpa = torch.compile(sdpa_additive, fullgraph=True, dynamic=False)
    rows = []
    for model in args.models:
        for dtype_name in args.dtypes:
            dtype = bc.dtype_of(dtype_name)
            for capacity in args.capacities:
                case = attention_case(SHAPES[model], capacity, args.chunk, dtype)
                row = {"model_shapes": model, "dtype": dtype_name, "capacity": capacity, "q_len": args.chunk}
                reference = vote_attention_reference(*case).float() if capacity <= 4096 else None
                for kernel, fn in (("flex", vote_attention_flex), ("sdpa_additive_bias", sdpa)):
                    out = fn(*case)
                    if reference is not None:
                        row[f"{kernel}_max_abs_error"] = (out.float() - reference).abs().max().item()
                    row[f"{kernel}_ms"] = time_kernel(lambda: fn(*case), inner=2, runs=args.runs) * 1e3
                row["flex_over_sdpa"] = row["flex_ms"] / row["sdpa_additive_bias_ms"]
                rows.append(row)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}),
                      flush=True)
    bc.write_json("prefill_attention.json", {
        "benchmark": "attention kernels for one prefill chunk, compiled, per layer call",
        "machine": bc.machine_facts(), "runs": args.runs, "rows": rows,
    })


MEMORY_CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, {tools!r}); sys.path.insert(0, {root!r})
import bench_common as bc
import keepkv.models, keepkv.generate
base = bc.rss_bytes()
from keepkv.models import load
lm = load({model!r}, kv_budget=0.1, method="keepkv", dtype={dtype!r}, compile=False, prefill_chunk_size={chunk})
engine = lm.engine
engine.network.config = engine.network.config.replace(
    max_position_embeddings=max(engine.network.config.max_position_embeddings, {context}))
after_load = bc.rss_bytes()
bc.reset_peak_rss()
g = torch.Generator().manual_seed(0)
ids = torch.randint(100, 10000, (1, {context}), generator=g)
valid = torch.ones_like(ids, dtype=torch.bool)
t0 = time.perf_counter()
engine.prepare_caches(1, {context}, 1)
with torch.inference_mode():
    engine.prefill(ids, valid)
    engine.end_prefill()
seconds = time.perf_counter() - t0
c = engine.config
manager = engine.cache_manager
print(json.dumps({{"base_rss": base, "after_load_rss": after_load, "peak_rss": bc.peak_rss_since_reset(),
    "prefill_seconds": seconds, "budget_entries": manager.budget, "compressions": manager.compressions,
    "layers": c.num_layers, "kv_heads": c.num_kv_heads, "heads": c.num_heads, "head_dim": c.head_dim,
    "hidden": c.hidden_size, "intermediate": c.intermediate_size,
    "weight_bytes": sum(p.numel() * p.element_size() for p in {{p.data_ptr(): p for p in engine.network.parameters()}}.values()),
    "decode_cache_resident_bytes": engine.cache_bytes()}}))
"""


def cmd_memory(args) -> None:
    tools, root = str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])
    code = MEMORY_CHILD.format(tools=tools, root=root, model=args.model, dtype=args.dtype, context=args.context,
                               chunk=args.chunk)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
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
    args = parser.parse_args(argv)
    {"attention": cmd_attention, "memory": cmd_memory}[args.command](args)


if __name__ == "__main__":
    main()
