"""A/B in one process: float32 one-row projections through F.linear (the BLAS GEMV; the default before 2026-12-06)
vs the compiled reduction form (keepkv.ops.linear; the default since), decode step of load()'s compiled engine on a
synthetic context (keepkv.bench), full cache and KeepKV 10%, 3 rounds alternating. One JSON line per run on stdout.

    python results/bench/amd_epyc_2026-12-06/gemv_ab.py SmolLM2-135M-Instruct 8192 > gemv_ab_SmolLM2-135M-Instruct.jsonl
    python results/bench/amd_epyc_2026-12-06/gemv_ab.py Qwen2.5-Coder-0.5B-Instruct 4096 bfloat16   # a third argument:
        # the weights' dtype; "F.linear" then routes that dtype through F.linear
"""
import json
import sys

import torch

from keepkv.bench import DECODE_SLACK, fill_synthetic, time_decode
from keepkv.models import load
from keepkv.runtime import RuntimeOptions

model_name = sys.argv[1] if len(sys.argv) > 1 else "SmolLM2-135M-Instruct"
ctx = int(sys.argv[2]) if len(sys.argv) > 2 else 8192
dtype = sys.argv[3] if len(sys.argv) > 3 else "float32"  # the weights' dtype (added 2026-12-07)
every = (torch.bfloat16, torch.float16, torch.float32)
forms = {"F.linear": RuntimeOptions(reduction_dtypes=tuple(d for d in every if d != getattr(torch, dtype))),
         "reduction": RuntimeOptions(reduction_dtypes=every)}
models = {}
for name, rt in forms.items():
    for budget in (None, 0.1):
        kw = {} if budget is None else {"kv_budget": budget}
        models[name, budget] = load(model_name, dtype=dtype, runtime=rt, **kw)
rows = []
for rnd in range(3):
    for (name, budget), m in models.items():
        compressed = budget is not None
        fill_synthetic(m.engine, ctx, (DECODE_SLACK + 6 if compressed else 8) + 2 * (DECODE_SLACK if compressed else 16) + 8)
        r = time_decode(m.engine, ctx, 2, compressed)
        row = {"form": name, "budget": budget, "round": rnd, "tok_s": r["tokens_per_second"],
               "step_ms": 1e3 * r.get("median_step_seconds_without_compression", r["median_step_seconds"]),
               "new_graphs": r["new_graphs_during_timed_runs"]}
        rows.append(row); print(json.dumps(row), flush=True)
