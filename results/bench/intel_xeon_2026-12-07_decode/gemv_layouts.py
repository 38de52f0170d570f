"""bfloat16 one-row products of one weight shape in other weight layouts: [O, I] (the reduction), four rows at once,
blocked [O/B, I, B] (B = 16, 32, 64, vectorised along the output), and the bf16 read alone (sum).

    python gemv_layouts.py 151936 896 ; python gemv_layouts.py 9728 896
"""
import sys
import time

import torch

torch.set_num_threads(2)
outputs, inputs = int(sys.argv[1]), int(sys.argv[2])
w = torch.randn(outputs, inputs).to(torch.bfloat16)
x = torch.randn(1, inputs).to(torch.bfloat16)
reference = x.float() @ w.float().t()


def reduction(x, w):
    return (x.reshape(1, -1).float() * w.float()).sum(-1).to(x.dtype)


def blocked(x, wb):  # wb: [O/B, I, B]
    return (x.reshape(1, -1, 1).float() * wb.float()).sum(1).reshape(-1).to(x.dtype)


def rows4(x, w):
    return (x.reshape(1, 1, -1).float() * w.view(-1, 4, w.shape[1]).float()).sum(-1).reshape(-1).to(x.dtype)


def read_only(x, w):
    return w.float().sum(-1).to(x.dtype)


candidates = {"reduction": (reduction, w), "rows4": (rows4, w), "sum_only": (read_only, w)}
for block in (16, 32, 64):
    candidates[f"blocked{block}"] = (blocked, w.reshape(outputs // block, block, inputs).permute(0, 2, 1).contiguous())
for name, (fn, weight) in candidates.items():
    run = torch.compile(fn, dynamic=False)
    y = run(x, weight)
    err = 0 if name == "sum_only" else (y.float().reshape(-1) - reference.reshape(-1)).abs().max().item()
    for _ in range(3):
        run(x, weight)
    times = []
    for _ in range(9):
        repeats = max(1, int(4e8 // weight.nbytes))
        start = time.perf_counter()
        for _ in range(repeats):
            run(x, weight)
        times.append((time.perf_counter() - start) / repeats)
    t = sorted(times)[4]
    print(f"{outputs}x{inputs} {name} {t * 1e3:.3f}ms {weight.nbytes / t / 1e9:.1f}GB/s err{err:.2g}", flush=True)
