"""Whole-request cost of value_weighting="output" against the default KeepKV, side by side in one process.

Qwen2.5-Coder-0.5B float32, a 4096-token prompt (GPL-3 text), 10% budget, 128 greedy new tokens; each
configuration generated REPS times in rotation after one warm-up; prefill and decode seconds from
model.last_stats and the wall time (medians).

Run (2 threads, alone; the log beside this file)::

    OMP_NUM_THREADS=2 python results/bench/intel_xeon_2026-12-07_output_weighting/bench_output_weighting.py
"""
import json
import statistics
import sys
import time
from pathlib import Path

from keepkv.models import load

MODEL = sys.argv[1] if len(sys.argv) > 1 else "Qwen2.5-Coder-0.5B-Instruct"
REPS = 3
CONFIGS = {"default": {}, "head+output": {"selection": "head", "value_weighting": "output"},
           "layer+output": {"value_weighting": "output"}}
text = Path("/usr/share/common-licenses/GPL-3").read_text()
models = {name: load(MODEL, kv_budget=0.1, method="keepkv", **opts) for name, opts in CONFIGS.items()}
tok = next(iter(models.values())).tokenizer
ids = tok.encode(text)[:4096]
prompt = tok.decode(ids)
print("prompt tokens", len(tok.encode(prompt)), flush=True)
rows = {name: [] for name in CONFIGS}
for rep in range(REPS + 1):
    for name, model in models.items():
        t = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=128)
        wall = time.perf_counter() - t
        stats = dict(model.last_stats) if isinstance(model.last_stats, dict) else vars(model.last_stats)
        print(rep, name, round(wall, 2), {k: v for k, v in stats.items() if isinstance(v, (int, float))}, flush=True)
        if rep:
            rows[name].append((wall, stats))
summary = {}
for name, rs in rows.items():
    summary[name] = {"wall_s": statistics.median(r[0] for r in rs)}
    for key in rs[0][1]:
        if isinstance(rs[0][1][key], (int, float)):
            summary[name][key] = statistics.median(r[1][key] for r in rs)
print(json.dumps(summary, indent=1))
