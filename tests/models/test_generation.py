"""Generation engine: chunked prefill, decode loop, sampling, padding, and the compiled decode step."""

from __future__ import annotations

import pytest
import torch

from keepkv.generate import GenerationEngine
from keepkv.sampling import SamplingConfig, sample_next_token
from keepkv.errors import KeepKVError
from tests.conftest import tiny_network


def greedy(engine, ids, valid=None, steps=12):
    valid = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid
    return torch.stack(list(engine.generate_tokens(ids, valid, steps, SamplingConfig())), dim=1)


@pytest.fixture(scope="module")
def network():
    return tiny_network()


def test_chunk_size_does_not_change_the_result(network):
    ids = torch.randint(3, 128, (1, 45), generator=torch.Generator().manual_seed(0))
    outputs = [greedy(GenerationEngine(network, compile=False, prefill_chunk_size=c), ids) for c in (7, 16, 512)]
    assert all(torch.equal(outputs[0], other) for other in outputs[1:])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_rows_equal_single_rows(network, side):
    """Each row of a padded batch generates exactly what it generates alone (positions count real tokens)."""
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 128, (n,), generator=g) for n in (30, 17)]
    engine = GenerationEngine(network, compile=False, prefill_chunk_size=8)
    ids = torch.zeros(2, 30, dtype=torch.long)
    valid = torch.zeros(2, 30, dtype=torch.bool)
    for r, row in enumerate(rows):
        span = slice(30 - len(row), 30) if side == "left" else slice(0, len(row))
        ids[r, span], valid[r, span] = row, True
    batched = greedy(engine, ids, valid)
    for r, row in enumerate(rows):
        assert torch.equal(batched[r], greedy(engine, row[None])[0])


def test_sampling_is_seeded_and_respects_top_k():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    config = SamplingConfig(temperature=0.8, top_k=5, seed=7)
    first = [sample_next_token(logits, config, config.make_generator(torch.device("cpu"))) for _ in range(2)]
    assert torch.equal(first[0], first[1])
    top5 = logits.topk(5, dim=-1).indices
    draws = torch.stack([sample_next_token(logits, config, torch.Generator().manual_seed(s)) for s in range(200)])
    assert all(bool((top5[r] == draws[:, r, None]).any(-1).all()) for r in range(3))


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    config = SamplingConfig(temperature=1.0, top_p=0.7)
    draws = {int(sample_next_token(logits, config, torch.Generator().manual_seed(s))) for s in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_options_are_refused(bad):
    with pytest.raises(KeepKVError):
        SamplingConfig(**bad)


def test_stop_token_ends_generation(network):
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(3))
    engine = GenerationEngine(network, compile=False)
    free = greedy(engine, ids, steps=10)[0].tolist()
    stop_at = free[4]
    stopped = [int(t) for t in engine.generate_tokens(ids, torch.ones_like(ids, dtype=torch.bool), 10,
                                                       SamplingConfig(), stop_token_ids=(stop_at,))]
    assert stopped == free[: free.index(stop_at) + 1]


@pytest.mark.compile
def test_compiled_decode_matches_eager_and_never_recompiles(network):
    """One compiled decode graph per (batch, capacity): 70 steps and a second prompt of another length in the
    same capacity bucket run with recompilation forbidden."""
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(4))
    eager = greedy(GenerationEngine(network, compile=False, prefill_chunk_size=32), ids, steps=70)
    engine = GenerationEngine(network, compile=True, prefill_chunk_size=32)
    compiled = greedy(engine, ids, steps=3)  # compiles prefill attention and the decode step
    assert torch.equal(compiled, eager[:, :3])
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = greedy(engine, ids, steps=70)
        assert torch.equal(compiled, eager)
        greedy(engine, ids[:, :35], steps=70)  # another prompt length, same capacity bucket
    assert engine.caches[0].capacity == 256


@pytest.mark.compile
def test_compiled_bfloat16_decode_step_matches_eager():
    """In bfloat16 the compiled decode step computes its projections as float32-accumulated reductions
    (keepkv.ops.linear); from the same caches its logits stay within bf16 rounding of the eager step's (BLAS
    GEMV), step after step."""
    from tests.conftest import tiny_config

    network = tiny_network(tiny_config("qwen2", attention_bias=True), dtype=torch.bfloat16)
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(5))
    engine = GenerationEngine(network, compile=True, prefill_chunk_size=32)
    engine.prepare_caches(1, ids.shape[1], 8)
    names = ("keys", "values", "log_votes", "positions", "cursor")
    with torch.inference_mode():
        engine.prefill(ids, torch.ones_like(ids, dtype=torch.bool))
        engine.end_prefill()
        start = [{name: getattr(cache, name).clone() for name in names} for cache in engine.caches]
        tokens, positions = torch.tensor([7]), torch.tensor([ids.shape[1]])
        compiled = torch.stack([engine.decode_step(tokens + i, positions + i) for i in range(4)])
        for cache, saved in zip(engine.caches, start):
            for name in names:
                getattr(cache, name).copy_(saved[name])
        engine._decode_compiled = None  # the same engine, eager
        engine.cache_manager.filled -= 4
        eager = torch.stack([engine.decode_step(tokens + i, positions + i) for i in range(4)])
    assert torch.isfinite(compiled).all()
    error = (compiled - eager).abs().max()
    assert 0 < error <= 0.03 * eager.abs().max(), error  # not the same kernel, the same product


@pytest.mark.compile
def test_decode_step_compiles_once_whatever_the_callers_autograd_mode(network):
    """Token and position tensors made outside ``inference_mode`` (first step) and inside it (later steps) reach
    the compiled step as the same kind of tensor: one graph, no recompilation."""
    engine = GenerationEngine(network, compile=True, prefill_chunk_size=32)
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(6))
    engine.prepare_caches(1, ids.shape[1], 8)
    with torch.inference_mode():
        engine.prefill(ids, torch.ones_like(ids, dtype=torch.bool))
        engine.end_prefill()
    token, position = torch.tensor([5]), torch.tensor([20])  # normal tensors
    engine.decode_step(token, position)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.inference_mode():
        for i in range(1, 4):
            engine.decode_step(token + i, position + i)  # inference tensors


def test_a_compiling_engine_allows_a_graph_per_shape(network):
    """With fullgraph=True the ninth shape of a compiled function is a hard error at dynamo's default limit of 8;
    a compiling engine raises the limits (prompt lengths and capacities each get their own graph)."""
    import torch._dynamo.config as dynamo_config

    from keepkv.compile_limits import GRAPHS_PER_FUNCTION

    with dynamo_config.patch(recompile_limit=8, accumulated_recompile_limit=256):
        GenerationEngine(network, compile=True)
        assert dynamo_config.recompile_limit >= GRAPHS_PER_FUNCTION
        assert dynamo_config.accumulated_recompile_limit >= 16 * GRAPHS_PER_FUNCTION
