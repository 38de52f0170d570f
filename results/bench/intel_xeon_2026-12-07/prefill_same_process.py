"""keepkv's default engine and transformers' one forward, full-cache prefill of the same prompt, in one process
(run with .cache/peers/transformers/bin/python), interleaved; minor page faults per prefill; PROFILE=1 adds one
torch.profiler table per engine.

    PROFILE=1 python prefill_same_process.py NAME GGUF DTYPE ROUNDS PROMPT_TOKENS
"""
import os, resource, sys, time, statistics
from pathlib import Path
ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT), str(ROOT / "tools"), str(ROOT / "tools" / "peers")]
import torch
import torch.nn.functional as F
torch.set_num_threads(2)
from peer_common import load_gguf
from keepkv.models import load
import keepkv.models.transformer as tr
new = tr.MLP.forward
def old(self, x):
    return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
name, gguf, dtype, rounds, ctx = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
lm = load(gguf, dtype=dtype)
engine = lm.engine
hf = load_gguf(gguf, dtype)
from bench_peers import prompt_ids
ids = prompt_ids(lm.tokenizer, ctx)
input_ids = torch.tensor([ids]); valid = torch.ones_like(input_ids, dtype=torch.bool)
def kk():
    engine.prepare_caches(1, len(ids), 1)
    with torch.inference_mode():
        out, _ = engine.prefill(input_ids, valid); engine.end_prefill()
def tf():
    with torch.inference_mode():
        hf(input_ids, attention_mask=torch.ones_like(input_ids), logits_to_keep=1, use_cache=True)
def with_mlp(fwd):
    def run():
        tr.MLP.forward = fwd; kk()
    return run
variants = {"keepkv_new": with_mlp(new), "hf": tf}
for f in variants.values(): f(); f()
res = {k: [] for k in variants}; flt = {k: [] for k in variants}
for r in range(rounds):
    for k, f in variants.items():
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter(); f(); res[k].append(time.perf_counter() - t)
        flt[k].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
for k in res:
    print(k, round(statistics.median(res[k]), 3), [round(x, 3) for x in res[k]], "minflt", flt[k], flush=True)
for k in ("keepkv_new",):
    print(f"paired hf/{k}", [round(b / a, 3) for a, b in zip(res[k], res["hf"])])
if os.environ.get("PROFILE"):
    from torch.profiler import ProfilerActivity, profile
    for k in ("keepkv_new", "hf"):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            variants[k]()
        print("PROFILE", k)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=14))
