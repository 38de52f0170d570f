"""keepkv's default engine and transformers' one forward, bf16 full-cache prefill of the same prompt, in one process
(run with .cache/peers/transformers/bin/python: transformers lives there), interleaved, ROUNDS rounds; minor page
faults per prefill (``getrusage``, added 2026-12-07); ``PROFILE=1`` then prints one torch.profiler table per engine
(by op, and by op and input shape).

    [PROFILE=1] python prefill_same_process.py MODEL GGUF DTYPE ROUNDS PROMPT_TOKENS
"""
import os, resource, sys, time, statistics
from pathlib import Path
ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT), str(ROOT / "tools"), str(ROOT / "tools" / "peers")]
import torch
torch.set_num_threads(2)
from peer_common import load_gguf, read_prompt_ids
from keepkv.models import load
name, gguf, dtype, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
lm = load(gguf, dtype=dtype)
engine = lm.engine
hf = load_gguf(gguf, dtype)
from bench_peers import prompt_ids
ids = prompt_ids(lm.tokenizer, int(sys.argv[5]))
input_ids = torch.tensor([ids]); valid = torch.ones_like(input_ids, dtype=torch.bool)
def kk():
    engine.prepare_caches(1, len(ids), 1)
    with torch.inference_mode():
        out, _ = engine.prefill(input_ids, valid); engine.end_prefill()
def tf():
    with torch.inference_mode():
        hf(input_ids, attention_mask=torch.ones_like(input_ids), logits_to_keep=1, use_cache=True)
kk(); tf(); kk(); tf()
engines = {"keepkv": kk, "hf": tf}
res = {k: [] for k in engines}; faults = {k: [] for k in engines}
for r in range(rounds):
    for k, f in engines.items():
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter(); f(); res[k].append(time.perf_counter() - t)
        faults[k].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
for k in res:
    print(k, round(statistics.median(res[k]), 3), [round(x, 3) for x in res[k]], "minflt", faults[k], flush=True)
print("paired hf/keepkv", [round(b / a, 3) for a, b in zip(res["keepkv"], res["hf"])])
if os.environ.get("PROFILE"):
    from torch.profiler import ProfilerActivity, profile
    for k, f in engines.items():
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            f()
        print("PROFILE", k)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=14))
