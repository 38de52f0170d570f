"""Median prefill time and minor page faults per prefill, one engine per process (keepkv MODEL DTYPE TOKENS from
.venv; tf GGUF DTYPE from .cache/peers/transformers, reading the ids prefill_ops.py wrote). Run with and without
MALLOC_TRIM_THRESHOLD_ / MALLOC_MMAP_THRESHOLD_ for prefill_workspace_ab.txt."""
import os, resource, statistics, sys, time
from pathlib import Path
import torch
ROOT = Path(__file__).resolve().parents[3]
IDS = ROOT / ".cache" / "prefill_ops_ids.json"
side = sys.argv[1]
torch.set_num_threads(2)
if side == "keepkv":
    sys.path[:0] = [str(ROOT / "tools"), str(ROOT)]
    from bench_peers import prompt_ids
    from keepkv.models import load
    if os.environ.get("INPLACE"):
        import keepkv.models.transformer as tr
        import torch.nn.functional as F
        def fwd(self, x):
            if torch.compiler.is_compiling() or torch.is_grad_enabled():
                return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
            h = F.silu(self.gate_proj(x), inplace=True)
            return self.down_proj(h.mul_(self.up_proj(x)))
        tr.MLP.forward = fwd
    engine = (lm := load(sys.argv[2], dtype=sys.argv[3])).engine
    ids = prompt_ids(lm.tokenizer, int(sys.argv[4]))
    input_ids = torch.tensor([ids]); valid = torch.ones_like(input_ids, dtype=torch.bool)
    def prefill():
        engine.prepare_caches(1, len(ids), 1)
        with torch.inference_mode():
            engine.prefill(input_ids, valid); engine.end_prefill()
else:
    sys.path.insert(0, str(ROOT / "tools" / "peers"))
    from peer_common import load_gguf, read_prompt_ids
    model = load_gguf(sys.argv[2], sys.argv[3])
    ids = torch.tensor([read_prompt_ids(str(IDS))])
    def prefill():
        with torch.inference_mode():
            model(ids, attention_mask=torch.ones_like(ids), logits_to_keep=1, use_cache=True)
for _ in range(2): prefill()
secs, flts = [], []
for _ in range(int(os.environ.get("RUNS", "4"))):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; t = time.perf_counter()
    prefill()
    secs.append(time.perf_counter() - t); flts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(side, os.environ.get("TAG", ""), "median", round(statistics.median(secs), 3), [round(s, 3) for s in secs], "minflt", flts, flush=True)
