"""The MLP alone at Qwen2.5-Coder-0.5B shapes in bf16: out of place vs SwiGLU in place; median ms per call and
minor page faults, 30 interleaved rounds. python mlp_faults.py ROWS"""
import time, statistics, torch, torch.nn.functional as F, resource
torch.set_num_threads(2)
torch.manual_seed(0)
D, I, T = 896, 4864, int(__import__("sys").argv[1])
dt = torch.bfloat16
Wg, Wu, Wd = (torch.randn(I, D, dtype=dt) * 0.03, torch.randn(I, D, dtype=dt) * 0.03, torch.randn(D, I, dtype=dt) * 0.03)
x = torch.randn(1, T, D, dtype=dt)
def old():
    return F.linear(F.silu(F.linear(x, Wg)) * F.linear(x, Wu), Wd)
def new():
    g = F.linear(x, Wg)
    return F.linear(F.silu(g, inplace=True).mul_(F.linear(x, Wu)), Wd)
with torch.inference_mode():
    assert torch.equal(old(), new())
    res = {"old": [], "new": []}; fl = {"old": 0, "new": 0}
    for r in range(30):
        for k, f in (("old", old), ("new", new)) if r % 2 else (("new", new), ("old", old)):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t = time.perf_counter(); f(); res[k].append(time.perf_counter() - t)
            fl[k] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
for k in res: print(T, k, "median ms", round(statistics.median(res[k][2:]) * 1e3, 2), "faults", fl[k])
