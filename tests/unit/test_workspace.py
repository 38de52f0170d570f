"""keepkv.ops.workspace and the MLP's prefill scratch buffers: one storage per name reused across layers and
chunks, the same values as the plain MLP bit for bit, opened per prefill by the engine and freed after it (also
when the prefill fails)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from keepkv.generate import GenerationEngine
from keepkv.ops.linear import linear_into
from keepkv.ops.workspace import Workspace
from tests.conftest import tiny_network


def test_a_name_reuses_one_storage_grown_only_when_a_larger_shape_is_asked_for():
    workspace = Workspace()
    first = workspace.buffer("a", (4, 8), torch.float32, torch.device("cpu"))
    smaller = workspace.buffer("a", (2, 3), torch.float32, "cpu")
    assert smaller.shape == (2, 3) and smaller.is_contiguous()
    assert smaller.data_ptr() == first.data_ptr()
    other_name = workspace.buffer("b", (4, 8), torch.float32, "cpu")
    other_dtype = workspace.buffer("a", (4, 8), torch.bfloat16, "cpu")
    assert len({first.data_ptr(), other_name.data_ptr(), other_dtype.data_ptr()}) == 3
    assert workspace.resident_bytes() == 32 * 4 + 32 * 4 + 32 * 2
    larger = workspace.buffer("a", (5, 8), torch.float32, "cpu")
    assert larger.shape == (5, 8)
    assert workspace.resident_bytes() == 40 * 4 + 32 * 4 + 32 * 2  # the smaller one was dropped
    workspace.clear()
    assert workspace.resident_bytes() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_into_writes_exactly_f_linear_into_the_given_buffer(dtype, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 80, generator=g).to(dtype)
    w = torch.randn(96, 80, generator=g).to(dtype)
    b = torch.randn(96, generator=g).to(dtype) if bias else None
    out = torch.empty(37, 96, dtype=dtype)
    result = linear_into(x, w, b, out)
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(result, F.linear(x, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_mlp_in_scratch_buffers_gives_the_plain_mlps_values_bit_for_bit(dtype):
    network = tiny_network(dtype=dtype)
    x = torch.randn(2, 9, network.config.hidden_size).to(dtype)
    mlps = [block.mlp for block in network.model.layers]
    with torch.inference_mode():
        plain = [mlp(x) for mlp in mlps]
        with network.scratch_buffers() as workspace:
            assert all(mlp.workspace is workspace for mlp in mlps)
            pointers = set()
            for mlp, expected in zip(mlps, plain):
                out = mlp(x)
                assert torch.equal(out, expected) and out.shape == x.shape
                pointers.add(workspace.buffer("mlp_gate", (1,), dtype, x.device).data_ptr())
            assert len(pointers) == 1  # every layer wrote into the same gate buffer
            with network.scratch_buffers() as inner:  # nested: the outer workspace stays
                assert inner is workspace
            assert mlps[0].workspace is workspace
            assert workspace.resident_bytes() == 2 * 18 * network.config.intermediate_size * x.element_size()
        assert all(mlp.workspace is None for mlp in mlps) and workspace.resident_bytes() == 0
    # outside inference mode (autograd, or no_grad with tensors that are not inference tensors) the buffers are
    # not used: an in-place SwiGLU would break a backward pass
    x = x.clone().requires_grad_(dtype == torch.float32)
    with network.scratch_buffers() as workspace:
        assert torch.equal(mlps[0](x).detach(), plain[0])
        with torch.no_grad():
            assert torch.equal(mlps[0](x), plain[0])
        assert workspace.resident_bytes() == 0
    # a projection with a hook is called as a module, so the hook still runs (so are a Linear subclass and a
    # forward replaced on the instance: _plain_projection)
    calls = []
    handle = mlps[0].up_proj.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    with torch.inference_mode(), network.scratch_buffers() as workspace:
        assert torch.equal(mlps[0](x.detach()), plain[0])
        assert calls and workspace.resident_bytes() == 0
    handle.remove()


def test_a_prefill_opens_one_workspace_and_frees_it_even_when_it_fails():
    network = tiny_network()
    engine = GenerationEngine(network, compile=False, prefill_chunk_size=8)
    seen = []
    original = network.model.layers[0].mlp.forward

    def spy(x):
        seen.append(network.model.layers[0].mlp.workspace)
        return original(x)

    network.model.layers[0].mlp.forward = spy
    ids = torch.randint(3, 100, (1, 20))
    valid = torch.ones_like(ids, dtype=torch.bool)
    engine.prepare_caches(1, 20, 1)
    with torch.inference_mode():
        with_buffers, _ = engine.prefill(ids, valid)
    assert len(seen) == 3 and seen[0] is not None and all(w is seen[0] for w in seen)  # one per prefill
    assert network.model.layers[0].mlp.workspace is None and seen[0].resident_bytes() == 0
    del network.model.layers[0].mlp.forward
    # the values do not depend on the buffers: a prefill whose workspace is never opened gives the same logits
    engine.network.scratch_buffers = lambda: __import__("contextlib").nullcontext()
    engine.prepare_caches(1, 20, 1)
    with torch.inference_mode():
        without, _ = engine.prefill(ids, valid)
    del engine.network.scratch_buffers
    assert torch.equal(with_buffers, without)

    def broken(x):
        raise RuntimeError("boom")

    network.model.layers[1].mlp.forward = broken
    engine.prepare_caches(1, 20, 1)
    with pytest.raises(RuntimeError, match="boom") as raised, torch.inference_mode():
        engine.prefill(ids, valid)
    assert all(block.mlp.workspace is None for block in network.model.layers)
    del network.model.layers[1].mlp.forward
    # the consumer of the chunks fails, with the traceback kept alive: the workspace is still released
    network.project = broken
    engine.prepare_caches(1, 20, 1)
    with pytest.raises(RuntimeError, match="boom") as raised:
        engine.extend(ids, torch.arange(20)[None], valid)
    assert raised.value is not None
    assert all(block.mlp.workspace is None for block in network.model.layers)


@pytest.mark.compile
def test_a_compiled_engine_prefills_in_the_workspace_and_decodes_without_it():
    """``load()``'s path: a compiled engine (split prefill kernel, compiled decode step). The prefill's MLPs use
    the workspace and give the logits of a prefill without it bit for bit; the compiled decode step never sees a
    workspace, and greedy tokens match the engine run without buffers."""
    from keepkv.sampling import SamplingConfig

    network = tiny_network()
    engine = GenerationEngine(network, compile=True, prefill_chunk_size=8)
    mlp = network.model.layers[0].mlp
    seen = []
    original = mlp.forward

    def spy(x):
        seen.append((x.shape[1], mlp.workspace is not None, torch.compiler.is_compiling()))
        return original(x)

    mlp.forward = spy
    ids = torch.randint(3, 100, (1, 20))
    valid = torch.ones_like(ids, dtype=torch.bool)

    def run():
        engine.prepare_caches(1, 20, 1)
        with torch.inference_mode():
            logits, _ = engine.prefill(ids, valid)
            engine.end_prefill()
        tokens = [t.clone() for t in engine.generate_tokens(ids, valid, 4, SamplingConfig(temperature=0.0))]
        return logits, torch.stack(tokens)

    with_buffers = run()
    prefill_calls = [s for s in seen if s[0] > 1]
    assert prefill_calls and all(used and not compiling for _, used, compiling in prefill_calls)
    assert all(not used for width, used, _ in seen if width == 1)  # decode (traced or eager): no workspace
    network.scratch_buffers = lambda: __import__("contextlib").nullcontext()
    without = run()
    del network.scratch_buffers
    assert torch.equal(with_buffers[0], without[0]) and torch.equal(with_buffers[1], without[1])
    assert mlp.workspace is None
