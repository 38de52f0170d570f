"""keepkv.ops.linear: the projections' compiled-decode GEMV form is the same product as ``F.linear``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from keepkv.ops.linear import Linear, linear, uses_reduction_gemv


def weights(dtype, rows=96, cols=80, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    b = torch.randn(rows, generator=g).to(dtype) if bias else None
    return w, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_linear_is_exactly_f_linear(dtype):
    w, b = weights(dtype)
    x = torch.randn(2, 3, 80).to(dtype)
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))
    assert not uses_reduction_gemv(x[:1, :1], w)  # eager: never the reduction form


@pytest.mark.compile
@pytest.mark.parametrize("dtype,bias", [(torch.bfloat16, True), (torch.float16, False), (torch.float32, True)])
def test_compiled_single_row_reduction_matches_a_float64_product(dtype, bias):
    """One row of weights under torch.compile takes the reduction form by default, in every dtype: float32
    accumulation, so it is within the dtype's rounding of the exact product (and no worse than the BLAS GEMV)."""
    w, b = weights(dtype, rows=256, cols=576, bias=bias)
    x = torch.randn(1, 1, 576).to(dtype)
    taken = []

    def decode_projection(x):
        taken.append(uses_reduction_gemv(x, w))
        return linear(x, w, b)

    out = torch.compile(decode_projection, fullgraph=True, dynamic=False)(x)
    assert taken == [True] and out.shape == (1, 1, 256) and out.dtype == dtype
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    blas = F.linear(x, w, b).double()
    error, blas_error = (out.double() - exact).abs().max(), (blas - exact).abs().max()
    tolerance = (1e-3 if dtype != torch.float32 else 1e-6) * exact.abs().max()
    assert error <= max(2 * blas_error, tolerance), (error, blas_error)


def test_multi_row_inputs_and_dtypes_left_out_of_the_runtime_keep_f_linear():
    w16, _ = weights(torch.bfloat16)
    w32, _ = weights(torch.float32)
    sixteen_bit_only = (torch.bfloat16, torch.float16)
    seen = []

    def probe(x16, x32, x_rows):
        seen.extend([uses_reduction_gemv(x16, w16), uses_reduction_gemv(x32, w32), uses_reduction_gemv(x_rows, w16),
                     uses_reduction_gemv(x32, w32, sixteen_bit_only)])
        return x16

    torch.compile(probe, fullgraph=True)(torch.ones(1, 80, dtype=torch.bfloat16), torch.ones(1, 80),
                                         torch.ones(4, 80, dtype=torch.bfloat16))
    assert seen == [True, True, False, False]


def test_linear_module_keeps_nn_linear_parameter_names():
    layer = Linear(8, 4, bias=True)
    assert isinstance(layer, torch.nn.Linear) and set(dict(layer.named_parameters())) == {"weight", "bias"}
    x = torch.randn(3, 8)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
