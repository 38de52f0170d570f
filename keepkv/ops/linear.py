"""``y = x W^T + b`` for the model's projections, with a decode-time GEMV form for single-row products.

Batch-1 decode multiplies one row by every weight matrix of the model: a matrix-vector product (GEMV) whose cost
is reading ``W`` once. Written as a reduction,

    y_o = sum_i float32(x_i) * float32(W_{o,i})        (+ b_o, then cast back to x.dtype)

``torch.compile`` emits one vectorised, memory-bound kernel that reads ``W`` in its own dtype, converts in
registers and accumulates in float32 (the same accumulation a BLAS GEMV does), and fuses it with the ops around
it (RMSNorm, residual adds, SwiGLU, RoPE). On a CPU the BLAS GEMV behind ``F.linear`` streams bfloat16 / float16
weights at about half the bandwidth of float32 ones, and on some CPUs its float32 GEMV is itself far below the
memory bandwidth; the reduction was faster than the BLAS GEMV or level with it wherever it was measured. Which
dtypes take the form is
``RuntimeOptions.reduction_dtypes`` (default: bfloat16, float16 and float32).

Every multi-row input (prefill chunks, batches > 1: a GEMM) and every eager call (the reduction would materialise
``x * W`` there) keep ``F.linear``. Measurements: ``docs/profile.md``, "Measurements behind the code's choices".

Device-agnostic: plain tensor ops; on a GPU inductor turns the same reduction into one Triton kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keepkv.runtime import DEFAULT_RUNTIME


def uses_reduction_gemv(x: Tensor, weight: Tensor,
                        reduction_dtypes: tuple[torch.dtype, ...] = DEFAULT_RUNTIME.reduction_dtypes) -> bool:
    """Whether :func:`linear` takes the reduction form: compiled, one input row, a weight in ``reduction_dtypes``
    (``RuntimeOptions.reduction_dtypes``; by default bfloat16, float16 and float32)."""
    return torch.compiler.is_compiling() and x.shape[:-1].numel() == 1 and weight.dtype in reduction_dtypes


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None,
           reduction_dtypes: tuple[torch.dtype, ...] = DEFAULT_RUNTIME.reduction_dtypes) -> Tensor:
    """``F.linear(x, weight, bias)``; one row of a weight in ``reduction_dtypes`` inside ``torch.compile``: the
    reduction form above."""
    if not uses_reduction_gemv(x, weight, reduction_dtypes):
        return F.linear(x, weight, bias)
    out = (x.reshape(1, -1).float() * weight.float()).sum(dim=-1)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def linear_into(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    """``x W^T + b`` for a 2-D ``x [rows, in]`` written into ``out [rows, out_features]`` (returned): the same
    GEMM ``F.linear`` runs for a contiguous input (``mm``, or ``addmm`` with a bias), in a buffer the caller
    reuses (:class:`keepkv.ops.workspace.Workspace`)."""
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and names, so checkpoints load unchanged) computing through :func:`linear`.
    ``reduction_dtypes``: the model's ``RuntimeOptions.reduction_dtypes`` (set by
    ``Transformer.set_runtime_options``)."""

    reduction_dtypes: tuple[torch.dtype, ...] = DEFAULT_RUNTIME.reduction_dtypes

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self.reduction_dtypes)
