"""The cosine match's validity mask: masked_fill after the matmul (v0) against baddbmm's additive input (v1) and a
separate amax / argmax (v2), eager and compiled, then inductor's kernels of v0 and v1 (issue 15, docs/profile.md
section 23). SmolLM2's shapes at 4k, 10%: 3 KV heads, 2048 evicted x 410 kept keys. 2 threads.
Run: TORCHINDUCTOR_CACHE_DIR=/tmp/ind OMP_NUM_THREADS=2 python cosine_match_ab.py

(The shared gathers were folded into ``operands`` / ``masked_similarity`` after the run below; the same ops.)
Output on the Intel Xeon host (AMX), 2026-12-07 ("identical" compares with eager v0; compiled graphs round
differently from eager, so the second block compares compiled v1 with compiled v0):
    v0 eager     13.733 ms  identical=True
    v0 compiled   5.726 ms  identical=False
    v1 eager      4.093 ms  identical=True
    v1 compiled   4.279 ms  identical=False
    v2 eager      7.127 ms  identical=True
    v2 compiled   5.811 ms  identical=False
    v0 vs compiled v0 identical True True
      graph_0_cpp_fused_abs_bitwise_not_eq_gather_masked_f...  3.742 ms per call (the max/argmax with the gather inside)
      aten::bmm 2.093 ms
    v1 vs compiled v0 identical True True
      graph_1_cpp_fused_max_view_1 1.819 ms, aten::baddbmm 2.413 ms (of it the bias copy 0.616 ms)
"""
import time, torch, torch.nn.functional as F
import torch._inductor.config as _ic; _ic.cpp.enable_kernel_profile = True
torch.manual_seed(0)
B,H,C,D,K,E = 1,3,2458,64,410,2048
keys = torch.randn(B,H,C,D).to(torch.bfloat16)
lv = torch.randn(B,H,C); lv[..., ::7] = -float("inf")
perm = torch.argsort(torch.rand(B,H,C), -1)
kept, ev = perm[..., :K].contiguous(), perm[..., K:K+E].contiguous()

def operands(keys, lv, kept, ev):
    """(kept validity [B,H,K], normalised evicted keys [B,H,E,D], normalised kept keys [B,H,K,D]) in float32."""
    kv = torch.isfinite(lv.gather(2, kept))
    kk = keys.gather(2, kept[...,None].expand(-1,-1,-1,D)); ek = keys.gather(2, ev[...,None].expand(-1,-1,-1,D))
    return kv, F.normalize(ek.float(), dim=-1), F.normalize(kk.float(), dim=-1)

def masked_similarity(keys, lv, kept, ev):
    """The matmul, then the mask filled in (the form before the change)."""
    kv, e, k = operands(keys, lv, kept, ev)
    return torch.matmul(e, k.transpose(-1,-2)).masked_fill(~kv[:, :, None, :], -float("inf"))

def v0(keys, lv, kept, ev):
    return masked_similarity(keys, lv, kept, ev).max(dim=-1)

def v1(keys, lv, kept, ev):
    kv, e, k = operands(keys, lv, kept, ev)
    bias = torch.where(kv, 0.0, -float("inf"))[:, :, None, :].expand(B,H,E,K).reshape(B*H,E,K)
    s = torch.baddbmm(bias, e.reshape(B*H,E,D), k.reshape(B*H,K,D).transpose(-1,-2)).reshape(B,H,E,K)
    return s.max(dim=-1)

def v2(keys, lv, kept, ev):
    # max and argmax as two reductions
    s = masked_similarity(keys, lv, kept, ev)
    return s.amax(dim=-1), s.argmax(dim=-1)

with torch.inference_mode():
    ref = v0(keys, lv, kept, ev)
    for name, f in (("v0", v0), ("v1", v1), ("v2", v2)):
        for mode in ("eager", "compiled"):
            g = torch.compile(f, fullgraph=True, dynamic=False) if mode == "compiled" else f
            out = g(keys, lv, kept, ev)
            same = torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
            ts = []
            for _ in range(30):
                t = time.perf_counter(); g(keys, lv, kept, ev); ts.append(time.perf_counter() - t)
            ts.sort()
            print(f"{name} {mode:8s} {ts[len(ts)//2]*1e3:7.3f} ms  identical={same}")
import torch._inductor.config as ic
from torch.profiler import profile
with torch.inference_mode():
    c0 = torch.compile(v0, fullgraph=True, dynamic=False)(keys, lv, kept, ev)
    for name, f in (("v0", v0), ("v1", v1)):
        torch._dynamo.reset()
        g = torch.compile(f, fullgraph=True, dynamic=False)
        o = g(keys, lv, kept, ev)
        print(name, "vs compiled v0 identical", torch.equal(o[0], c0[0]), torch.equal(o[1], c0[1]))
        with profile() as p:
            for _ in range(10): g(keys, lv, kept, ev)
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
