"""One-row bfloat16 / float32 products y = x W^T in several compiled forms, alone (no model): the reduction keepkv
uses, an int32 bit-twiddled bf16 pair form ("bits"), the reduction split in 16-wide pieces, and eager F.linear.

    python gemv_forms.py bfloat16 ; python gemv_forms.py float32
"""
import sys
import time

import torch

torch.set_num_threads(2)
SHAPES = {"qkv": (1152, 896), "o": (896, 896), "gate_up": (9728, 896), "down": (896, 4864),
          "lm_head": (151936, 896)}  # Qwen2.5-Coder-0.5B's (out, in)
dtype = getattr(torch, sys.argv[1] if len(sys.argv) > 1 else "bfloat16")


def reduction(x, w):
    return (x.reshape(1, -1).float() * w.float()).sum(-1).to(x.dtype)


def bits(x, w):
    """Two bf16 per int32 word: the low half is element 2j, the high half element 2j+1 (little endian)."""
    words = w.view(torch.int32)
    low = (words << 16).view(torch.float32)
    high = (words & -65536).view(torch.float32)
    xf = x.reshape(1, -1).float()
    return ((xf[:, 0::2] * low) + (xf[:, 1::2] * high)).sum(-1).to(x.dtype)


def split16(x, w):
    outputs, inputs = w.shape
    pieces = x.reshape(1, inputs // 16, 16).float() * w.reshape(outputs, inputs // 16, 16).float()
    return pieces.sum(-1).sum(-1).to(x.dtype)


def eager_linear(x, w):
    return torch.nn.functional.linear(x, w)


FORMS = {"reduction": reduction, "bits": bits, "split16": split16, "F.linear(eager)": eager_linear}
for name, (outputs, inputs) in SHAPES.items():
    w = torch.randn(outputs, inputs).to(dtype)
    x = torch.randn(1, inputs).to(dtype)
    reference = eager_linear(x.float(), w.float())
    line = []
    for form, fn in FORMS.items():
        if form == "bits" and dtype != torch.bfloat16:
            continue
        run = fn if "eager" in form else torch.compile(fn, dynamic=False)
        err = (run(x, w).float() - reference).abs().max().item()
        for _ in range(3):
            run(x, w)
        times = []
        for _ in range(7):
            repeats = max(1, int(2e8 // w.nbytes))
            start = time.perf_counter()
            for _ in range(repeats):
                run(x, w)
            times.append((time.perf_counter() - start) / repeats)
        t = sorted(times)[3]
        line.append(f"{form} {t * 1e3:.3f}ms {w.nbytes / t / 1e9:.1f}GB/s err{err:.2g}")
    print(name, outputs, inputs, " | ".join(line), flush=True)
