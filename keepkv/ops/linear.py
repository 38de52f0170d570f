"""``y = x W^T + b`` for the model's projections, with a decode-time GEMV form for 16-bit weights.

Batch-1 decode multiplies one row by every weight matrix of the model: a matrix-vector product (GEMV) whose cost
is reading ``W`` once. The BLAS GEMV behind ``F.linear`` is the right call in float32, but for bfloat16 / float16
weights on CPU it runs at about half the bandwidth of the float32 one (same elements per second, half the bytes).
Written as a reduction,

    y_o = sum_i float32(x_i) * float32(W_{o,i})        (+ b_o, then cast back to x.dtype)

``torch.compile`` emits one vectorised, memory-bound kernel that reads ``W`` in its own dtype, converts in
registers and accumulates in float32 (the same accumulation a BLAS GEMV does), and fuses it with the ops around
it (RMSNorm, residual adds, SwiGLU, RoPE).

Measured (``tools/bench_decode.py``; torch 2.13 CPU, 2 threads, SmolLM2-135M bf16, 16k context, 10% budget): the
decode step without compression 32.3 ms -> 26.0 ms; in isolation (20 weights of one shape out of cache, bf16)
15-23 GB/s -> 26-40 GB/s. In float32 the two forms measured the same (22.8 vs 23.3 tok/s at 4k), so float32 keeps
``F.linear``; so does every multi-row input (prefill chunks, batches > 1: a GEMM) and every eager call (the
reduction would materialise ``x * W`` there).

Device-agnostic: plain tensor ops; on a GPU inductor turns the same reduction into one Triton kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REDUCTION_DTYPES = (torch.bfloat16, torch.float16)
"""Weight dtypes whose single-row products use the reduction form inside a compiled graph."""


def uses_reduction_gemv(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`linear` takes the reduction form: compiled, one input row, a 16-bit weight."""
    return torch.compiler.is_compiling() and x.shape[:-1].numel() == 1 and weight.dtype in REDUCTION_DTYPES


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``; one row of 16-bit weights inside ``torch.compile``: the reduction form above."""
    if not uses_reduction_gemv(x, weight):
        return F.linear(x, weight, bias)
    out = (x.reshape(1, -1).float() * weight.float()).sum(dim=-1)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and names, so checkpoints load unchanged) computing through :func:`linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
