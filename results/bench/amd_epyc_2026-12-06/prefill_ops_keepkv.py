"""One full-cache prefill of keepkv's default engine: 3 timed runs, then torch.profiler by op and by input shape.
Writes the prompt ids the transformers script reads.

    python prefill_ops_keepkv.py MODEL DTYPE PROMPT_TOKENS
"""
import sys, time, json, statistics
from pathlib import Path
ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT)]
import torch
from torch.profiler import ProfilerActivity, profile
from bench_peers import prompt_ids, write_prompt_file
from keepkv.models import load
from pathlib import Path
name, dtype, ctx = sys.argv[1], sys.argv[2], int(sys.argv[3])
lm = load(name, dtype=dtype)
engine = lm.engine
ids = prompt_ids(lm.tokenizer, ctx)
write_prompt_file(Path(str(ROOT / ".cache" / "prefill_ops_ids.json")), ids)
input_ids = torch.tensor([ids]); valid = torch.ones_like(input_ids, dtype=torch.bool)
def prefill():
    engine.prepare_caches(1, len(ids), 1)
    with torch.inference_mode():
        out, _ = engine.prefill(input_ids, valid); engine.end_prefill()
    return out
for _ in range(2): prefill()
ts = []
for _ in range(3):
    t = time.perf_counter(); prefill(); ts.append(time.perf_counter() - t)
print("keepkv prefill", [round(x, 3) for x in ts], "median", statistics.median(ts), flush=True)
with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
    prefill()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=40))
