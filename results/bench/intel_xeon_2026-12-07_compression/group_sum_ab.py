"""segment_reduce against scatter_add_ / index_add_ for the merge's group sums (issue 15, docs/profile.md section 23).

Rows sorted by group as the merge sorts them: 3 KV heads, 2458 float32 rows with random group ids in [0, 410)
(10% of them dropped) and an output of 2048 groups; the merge itself reduces 4096 member rows at SmolLM2's 4k, 10%;
scalar rows and 64-wide rows; median of 50 calls, eager, 2 threads. Run: OMP_NUM_THREADS=2 python group_sum_ab.py

Output on the Intel Xeon host (AMX), 2026-12-07:
    None segment_reduce 0.046 ms identical True 0.0
    None scatter_add_ 0.011 ms identical True 0.0
    None index_add_ 0.025 ms identical True 0.0
    64 segment_reduce 1.899 ms identical True 0.0
    64 scatter_add_ 0.420 ms identical True 0.0
    64 index_add_ 0.253 ms identical True 0.0
"""
import time, torch
torch.manual_seed(0)
B,H,L,M = 1,3,2458,2048
def bench(f, *a):
    f(*a); ts=[]
    for _ in range(50):
        t=time.perf_counter(); f(*a); ts.append(time.perf_counter()-t)
    ts.sort(); return ts[len(ts)//2]*1e3
for D in (None, 64):
    shape = (B,H,L) if D is None else (B,H,L,D)
    vals = torch.randn(shape)
    member = torch.rand(B,H,L) < 0.9
    grp = torch.randint(0, 410, (B,H,L))
    key = torch.where(member, grp, torch.full_like(grp, M))
    skey, order = torch.sort(key, dim=-1, stable=True)
    vals = vals.gather(2, order if D is None else order[...,None].expand(-1,-1,-1,D)).contiguous()
    edges = torch.arange(M+2).expand(B,H,M+2).contiguous()
    bounds = torch.searchsorted(skey.contiguous(), edges); lengths = bounds[...,1:]-bounds[...,:-1]
    def seg(v): return torch.segment_reduce(v, "sum", lengths=lengths, axis=2, unsafe=True, initial=0.0)[:, :, :M]
    def sca(v):
        idx = skey if D is None else skey[...,None].expand_as(v)
        out = v.new_zeros((B,H,M+1) + (() if D is None else (D,)))
        return out.scatter_add_(2, idx, v)[:, :, :M]
    def iad(v):
        out = v.new_zeros((B,H,M+1) + (() if D is None else (D,)))
        # index_add over flattened (b,h,group)
        flat = (torch.arange(B*H).view(B,H,1)*(M+1) + skey).reshape(-1)
        return out.view(B*H*(M+1), *out.shape[3:]).index_add_(0, flat, v.reshape(B*H*L, *v.shape[3:])).view(out.shape)[:, :, :M]
    with torch.inference_mode():
        r = seg(vals)
        for n,f in (("segment_reduce",seg),("scatter_add_",sca),("index_add_",iad)):
            o=f(vals); print(D, n, f"{bench(f, vals):.3f} ms", "identical", torch.equal(o, r), (o-r).abs().max().item())
