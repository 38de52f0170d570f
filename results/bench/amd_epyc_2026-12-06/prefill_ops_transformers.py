"""transformers' one forward (logits_to_keep=1) on the ids prefill_ops_keepkv.py wrote: 3 timed runs, then
torch.profiler by op and by input shape (run with .cache/peers/transformers/bin/python).

    python prefill_ops_transformers.py GGUF DTYPE
"""
import sys, time, json, statistics
from pathlib import Path
ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tools" / "peers"))
import torch
torch.set_num_threads(2)
from torch.profiler import ProfilerActivity, profile
from peer_common import load_gguf, read_prompt_ids
gguf, dtype = sys.argv[1], sys.argv[2]
model = load_gguf(gguf, dtype)
ids = torch.tensor([read_prompt_ids(str(ROOT / ".cache" / "prefill_ops_ids.json"))])
def fwd():
    with torch.inference_mode():
        return model(ids, attention_mask=torch.ones_like(ids), logits_to_keep=1, use_cache=True)
for _ in range(2): fwd()
ts = []
for _ in range(3):
    t = time.perf_counter(); fwd(); ts.append(time.perf_counter() - t)
print("hf prefill", [round(x, 3) for x in ts], "median", statistics.median(ts), flush=True)
with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
    fwd()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=40))
