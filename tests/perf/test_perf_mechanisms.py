"""The mechanisms the performance targets rest on, checked without timing anything.

- the decode path (q_len = 1) of the ``flex`` kernel runs the packed or the SDPA kernel (by dtype and cache size),
  each of which equals the dense reference;
- a compressed cache's resident bytes at ``kv_budget = 0.1`` are <= 12% of the full cache's (votes, positions,
  the observation window and all slack slots included);
- a compression reads nothing back to the host (no ``.item()``, ``bool()``, ``int()``, ``float()``, ``tolist()``
  on a tensor): on a GPU it never stalls the stream;
- compression work is per layer per compression (every ``W`` decode steps), never per token.
No-recompilation over many decode steps is tested in ``tests/models/test_generation.py``
(``test_compiled_decode_matches_eager_and_never_recompiles``).
"""

from __future__ import annotations

import math

import pytest
import torch

from keepkv.cache.compressed import CompressedLayerCache
from keepkv.cache.manager import CacheManager
from keepkv.cache.methods import make_method
from keepkv.errors import KeepKVError
from keepkv.ops import attention
from keepkv.ops.attention import (
    vote_attention, vote_attention_packed, vote_attention_reference, vote_attention_sdpa,
)
from keepkv.runtime import RuntimeOptions
from tests.conftest import tiny_config
from tests.unit.test_attention import make_case


def assert_decode_kernel_equals_reference(kernel, dtype, tol, window, capacity, q_len):
    for seed in (0, 1):
        case = make_case(seed, dtype=dtype, q_len=q_len, capacity=capacity)
        out = kernel(*case, sliding_window=window)
        reference = vote_attention_reference(*case, sliding_window=window)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), reference.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("window", [None, 5, 300])
@pytest.mark.parametrize("capacity,q_len,pieces", [(37, 1, 1), (8 * 128, 1, 8), (1031, 1, 1), (1029, 1, 7),
                                                  (6 * 131, 3, 6), (2 * 173, 1, 2)])
def test_packed_decode_kernel_equals_reference(dtype, tol, window, capacity, q_len, pieces):
    """Packed kernel == dense reference whatever number of cache pieces it takes (one softmax across them)."""
    from keepkv.ops.attention import decode_pieces

    assert decode_pieces(capacity) == pieces
    assert_decode_kernel_equals_reference(vote_attention_packed, dtype, tol, window, capacity, q_len)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("capacity,q_len", [(37, 1), (1031, 1), (2 * 173, 3)])
def test_sdpa_decode_kernel_equals_reference(dtype, window, capacity, q_len):
    """SDPA + additive bias == dense reference (fp32 1e-5; 16-bit 2e-2: q, K, V and the output in 16 bits)."""
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_decode_kernel_equals_reference(vote_attention_sdpa, dtype, tol, window, capacity, q_len)


@pytest.mark.parametrize("kernel,capacity", [
    (vote_attention_packed, 37), (vote_attention_packed, 8 * 128 + 5), (vote_attention_sdpa, 37),
    (torch.compile(vote_attention_sdpa, fullgraph=True), 37),
])
def test_decode_kernels_give_zeros_for_rows_without_entries(kernel, capacity):
    q, keys, values, log_votes, kv_positions, q_positions = make_case(2, q_len=1, capacity=capacity)
    log_votes[0] = -math.inf
    out = kernel(q, keys, values, log_votes, kv_positions, q_positions)
    assert torch.isfinite(out).all() and out[0].abs().max() == 0 and out[1].abs().max() > 0


@pytest.mark.parametrize("dtype,capacity,expected", [
    (torch.float32, 37, "packed"), (torch.float32, 1000, "packed"),
    (torch.bfloat16, 37, "sdpa"), (torch.float16, 4096, "sdpa"), (torch.bfloat16, 4097, "packed"),
])
def test_flex_kernel_sends_one_token_queries_to_the_decode_kernel(monkeypatch, dtype, capacity, expected):
    """Decode (q_len = 1) never takes flex's template: on a CPU with AMX, 16-bit caches up to sdpa_decode_max_slots
    take SDPA, others the packed kernel; without AMX every decode takes the packed kernel; a prefill chunk
    (q_len > 1) takes flex."""
    monkeypatch.setattr(attention, "CPU_HAS_AMX", True)
    calls = []
    for name in ("packed", "sdpa", "flex"):
        monkeypatch.setattr(attention, f"vote_attention_{name}",
                            lambda *a, name=name, **k: calls.append((name, a[0].shape)) or a[0])
    case = make_case(0, dtype=dtype, q_len=1, capacity=capacity)
    vote_attention(*case, kernel="flex")
    assert calls == [(expected, torch.Size([2, 9, 1, 16]))]
    calls.clear()
    vote_attention(*make_case(0, dtype=dtype, q_len=4, capacity=capacity), kernel="flex")
    assert [name for name, _ in calls] == ["flex"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_decode_kernel_is_packed_on_a_cpu_without_amx(monkeypatch, dtype):
    """Without AMX tiles SDPA lost to the packed kernel at every measured size (docs/profile.md, section 13): the
    automatic choice on a CPU is then always ``packed``; an explicit ``decode_kernel`` still wins, and a device that
    is not a CPU keeps the size rule."""
    monkeypatch.setattr(attention, "CPU_HAS_AMX", False)
    assert attention.decode_kernel_for(dtype, 37, device="cpu") == "packed"
    assert attention.decode_kernel_for(dtype, 37, RuntimeOptions(decode_kernel="sdpa"), device="cpu") == "sdpa"
    expected = "sdpa" if dtype != torch.float32 else "packed"
    assert attention.decode_kernel_for(dtype, 37, device="cuda") == expected
    calls = []
    for name in ("packed", "sdpa", "flex"):
        monkeypatch.setattr(attention, f"vote_attention_{name}", lambda *a, name=name, **k: calls.append(name) or a[0])
    vote_attention(*make_case(0, dtype=dtype, q_len=1, capacity=37), kernel="flex")
    assert calls == ["packed"]


@pytest.mark.parametrize("amx", [True, False])
def test_compiled_decode_follows_the_cpu_rule_and_equals_the_reference(monkeypatch, amx):
    """The kernel choice is read while the graph is traced (a module constant): a compiled bf16 decode with and
    without AMX tiles (SDPA and packed) both equal the dense reference (bf16 2e-2)."""
    monkeypatch.setattr(attention, "CPU_HAS_AMX", amx)
    assert attention.decode_kernel_for(torch.bfloat16, 37, device="cpu") == ("sdpa" if amx else "packed")
    compiled = torch.compile(lambda *case: vote_attention(*case, kernel="flex"), fullgraph=True, dynamic=False)
    case = make_case(0, dtype=torch.bfloat16, q_len=1, capacity=37)
    torch.testing.assert_close(compiled(*case).float(), vote_attention_reference(*case).float(), rtol=2e-2,
                               atol=2e-2)


def test_runtime_options_choose_the_decode_kernel_and_refuse_unknown_ones(monkeypatch):
    calls = []
    for name in ("packed", "sdpa", "flex"):
        monkeypatch.setattr(attention, f"vote_attention_{name}", lambda *a, name=name, **k: calls.append(name) or a[0])
    for kernel in ("packed", "sdpa", "flex"):
        vote_attention(*make_case(0, q_len=1), kernel="flex", runtime=RuntimeOptions(decode_kernel=kernel))
    vote_attention(*make_case(0, dtype=torch.bfloat16, q_len=1, capacity=64), kernel="flex",
                   runtime=RuntimeOptions(sdpa_decode_max_slots=32))  # above the threshold: packed
    assert calls == ["packed", "sdpa", "flex", "packed"]
    with pytest.raises(KeepKVError, match="unknown decode_kernel 'fast'; allowed: auto, packed, sdpa, flex"):
        RuntimeOptions(decode_kernel="fast")
    with pytest.raises(KeepKVError, match="decode_pieces must be an integer >= 1"):
        RuntimeOptions(decode_pieces=0)


def smollm2_like(layers: int = 2):
    return tiny_config(vocab_size=128, hidden_size=576, intermediate_size=64, num_layers=layers, num_heads=9,
                       num_kv_heads=3, head_dim=64)


@pytest.mark.parametrize("context", [8192, 16384])
def test_cache_bytes_at_ten_percent_budget(context):
    """Decode-time resident bytes (B + W slots, votes, positions, window queries) <= 12% of the full cache's."""
    config = smollm2_like()
    full = CacheManager(config, torch.float32, torch.device("cpu"))
    full.allocate(1, context, 64, 512, context)
    method = make_method("keepkv")
    compressed = CacheManager(config, torch.float32, torch.device("cpu"), method, 0.1, decode_slack=64)
    compressed.allocate(1, context, 64, 512, context)
    compressed.end_prefill()  # the decode buffers: budget + W slots per head
    assert compressed.caches[0].capacity == compressed.budget + 64
    ratio = compressed.resident_bytes() / full.resident_bytes()
    assert ratio <= 0.12, ratio
    assert compressed.resident_bytes() > 0.1 * context / (context + 64) * full.resident_bytes()  # counts it all


def filled_cache(capacity=300, window=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    cache = CompressedLayerCache(1, 3, capacity, 64, torch.float32, num_heads=9, window=window)
    cache.keys.copy_(torch.randn(cache.keys.shape, generator=g))
    cache.keys[:, :, 1::2] = cache.keys[:, :, 0::2] + 0.1 * torch.randn(cache.keys[:, :, 1::2].shape, generator=g)
    cache.values.copy_(torch.randn(cache.values.shape, generator=g))
    cache.log_votes.zero_()
    cache.positions.copy_(torch.arange(capacity, dtype=cache.positions.dtype))
    cache.cursor.fill_(capacity)
    cache.window_queries.copy_(torch.randn(cache.window_queries.shape, generator=g))
    cache.window_positions.copy_(torch.arange(capacity - window, capacity)[None])
    return cache


HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@pytest.mark.parametrize("method_name", ["keepkv", "snapkv+keepkv", "snapkv"])
def test_compression_never_reads_a_tensor_back_to_the_host(monkeypatch, method_name):
    method = make_method(method_name)
    cache = filled_cache()
    reads = []
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            reads.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    with torch.inference_mode():
        method.compress(cache, 0, 64)
    monkeypatch.undo()
    assert reads == [], f"{method_name}: host reads during compression: {reads}"
    assert int(torch.isfinite(cache.log_votes).sum(-1).max()) <= 64
    if "keepkv" in method_name:
        assert method.stats.as_dict()["merged"] > 0  # the merge really ran (near-duplicate keys)


def test_compression_is_per_layer_every_w_steps_not_per_token(smollm2_eager):
    """Over a generation the method's ``compress`` runs once per layer per compression, and compressions happen
    once per ``W`` decode steps (plus the one at the end of prefill)."""
    from keepkv.generate import GenerationEngine
    from keepkv.sampling import SamplingConfig

    network = smollm2_eager.engine.network
    method = make_method("keepkv")
    slack, new_tokens, layers = 8, 21, network.config.num_layers
    manager = CacheManager(network.config, torch.float32, torch.device("cpu"), method, 48, slack)
    engine = GenerationEngine(network, compile=False, prefill_chunk_size=64, cache_manager=manager)
    calls = []
    real = method.compress
    method.compress = lambda cache, layer, budget, compiled: calls.append(layer) or real(cache, layer, budget, compiled)
    ids = torch.arange(100, 200)[None]
    tokens = list(engine.generate_tokens(ids, torch.ones_like(ids, dtype=torch.bool), new_tokens, SamplingConfig()))
    assert len(tokens) == new_tokens
    # 100-token prompt -> 48 entries at end of prefill; then 20 decode steps into 48 + 8 slots: compress at the
    # 9th and 17th step
    assert manager.compressions == 1 + (new_tokens - 1 - 1) // slack
    assert calls == list(range(layers)) * manager.compressions


def test_window_scores_are_computed_once_per_compression_with_identical_results(monkeypatch):
    """The selection scorer and KeepKV's EMA merge reference share one window-score product (same numbers)."""
    import contextlib

    calls = []
    real = CompressedLayerCache._window_log_scores
    monkeypatch.setattr(CompressedLayerCache, "_window_log_scores",
                        lambda self: calls.append(1) or real(self))
    shared, separate = filled_cache(seed=3), filled_cache(seed=3)
    with torch.inference_mode():
        make_method("keepkv", reference="ema").compress(shared, 0, 64)
        assert len(calls) == 1
        monkeypatch.setattr(CompressedLayerCache, "reuse_window_scores", lambda self: contextlib.nullcontext())
        make_method("keepkv", reference="ema").compress(separate, 0, 64)
        assert len(calls) == 3
    for name in ("keys", "values", "log_votes", "positions"):
        assert torch.equal(getattr(shared, name), getattr(separate, name)), name
    assert shared._window_scores_memo is None  # nothing kept once the compression is over


@pytest.mark.compile
def test_bench_point_times_a_compressed_decode_with_one_compression_per_run():
    """``keepkv bench`` / ``tools/bench_decode.py``'s measuring core on a tiny model: a compressed point's timed
    runs each contain exactly one decode-time compression (the manager's own call, wrapped for timing)."""
    from keepkv.bench import make_engine, run_point
    from tests.conftest import tiny_network

    point = run_point(tiny_network(), context=256, budget=0.25, runs=2)
    assert point["budget"] == "0.25" and point["compressions_timed"] == 2, point
    assert point["tokens_per_second"] > 0 and point["budget_entries"] == 64
    assert point["capacity"] == 64 + 64  # budget + decode slack
    assert point["method_options"] == make_method("keepkv").options()  # what ran: the defaults
    engine = make_engine(tiny_network(), 0.25, method_options={"value_norm_power": 0.5})  # bench_option_ab's engines
    assert engine.cache_manager.method.value_norm_power == 0.5


def test_option_ab_summary_pairs_each_value_with_the_full_cache_of_its_round():
    """``tools/bench_option_ab.py``'s table: medians over rounds, the ratio to the full cache taken per round."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    import bench_option_ab

    base = {"model": "m", "dtype": "float32", "context": 8192, "option": "value_norm_power", "new_graphs": 0,
            "step_ms": 1.0}
    rows = [{**base, "round": r, "value": v, "tokens_per_second": tps, "compression_ms": c}
            for r, v, tps, c in ((0, 0, 30.0, 40.0), (0, 1, 33.0, 44.0), (0, "full", 20.0, 0.0),
                                 (1, 0, 26.0, 42.0), (1, 1, 24.0, 46.0), (1, "full", 13.0, 0.0))]
    table = bench_option_ab.summary(rows).splitlines()
    assert table[2] == "| m, float32, 8192 | 0 | 28.0 | 41.0 | 1.75x |"  # per round 1.5x and 2.0x
    assert table[3] == "| m, float32, 8192 | 1 | 28.5 | 45.0 | 1.75x |"  # 1.65x and 1.85x
    assert table[4] == "| m, float32, 8192 | full | 16.5 | 0.0 | 1.00x |"


def test_bench_command_is_registered_and_checks_its_input():
    from keepkv.cli.bench import run as run_bench
    from keepkv.cli import build_parser
    from keepkv.errors import KeepKVError

    args = build_parser().parse_args(["bench", "--contexts", "1024", "--budgets", "full", "0.2", "--runs", "2"])
    assert args.run is run_bench and args.contexts == [1024] and args.budgets == ["full", "0.2"]
    with pytest.raises(KeepKVError, match="--budgets"):
        run_bench(build_parser().parse_args(["bench", "--budgets", "lots"]))


@pytest.mark.compile
@pytest.mark.parametrize("options", [
    {},  # the defaults (layer-shared selection, newest-query reference)
    {"selection": "head", "reference": "ema", "score_normalization": "per-token", "kernel_size": 3,
     "max_evicted_weight": 0.5, "last_query_weight": 0.5, "value_norm_power": 0.0},  # every non-default option
    # of the quality study at once
    {"selection": "head", "value_weighting": "output"},  # reads each layer's own o_proj weight
    {"selection": "blend", "layer_share": 0.3},  # heads matched by position (sort + searchsorted) in the graph
    {"selection": "floor", "layer_share": 0.3},  # the same match, then the budget split by rank in the graph
])
def test_whole_compression_compiles_once_for_every_layer_and_equals_eager(options):
    """KeepKV's compiled compression (select + merge + compact in one graph) gives the eager result on every
    cache, and caches of the same shape (the layers) share one graph: no recompilation from layer to layer, even
    when the selection reads the layer's ``o_proj`` weight (``value_weighting="output"``: a different parameter
    per layer, handed to the graph on the cache)."""
    eager_method, compiled_method = make_method("keepkv", **options), make_method("keepkv", **options)
    by_output = options.get("value_weighting") == "output"
    if by_output:
        generator = torch.Generator().manual_seed(21)
        # nn.Parameters that require grad, as a checkpoint's (bind_model gives references); columns scaled per query
        # head so that the heads write differently
        o_proj = [torch.nn.Parameter(torch.randn(48, 9 * 64, generator=generator)
                                     * (torch.rand(9, generator=generator) * 3 + 0.1).repeat_interleave(64))
                  for _ in range(8)]
        for method in (eager_method, compiled_method):
            method.output_projections = o_proj
    assert compiled_method.compiles_whole_compression
    assert not make_method("criticalkv+keepkv").compiles_whole_compression  # SnapKV's selection is not layer-free
    with torch.inference_mode():
        first_eager, first_compiled = filled_cache(seed=4), filled_cache(seed=4)
        eager_method.compress(first_eager, 0, 64)
        compiled_method.compress(first_compiled, 0, 64, compiled=True)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for layer, seed in ((1, 5), (7, 6)):
                eager, compiled = filled_cache(seed=seed), filled_cache(seed=seed)
                eager_method.compress(eager, layer, 64)
                compiled_method.compress(compiled, layer, 64, compiled=True)
                for name in ("keys", "values", "log_votes", "positions", "cursor"):
                    torch.testing.assert_close(getattr(compiled, name), getattr(eager, name), rtol=1e-5, atol=1e-5)
    for name in ("keys", "values", "log_votes", "positions", "cursor"):
        torch.testing.assert_close(getattr(first_compiled, name), getattr(first_eager, name), rtol=1e-5, atol=1e-5)
    assert compiled_method.stats.as_dict() == eager_method.stats.as_dict()
    assert eager_method.stats.as_dict()["merged"] > 0
    # the query-agnostic copy (another last_query_weight, a tensor input) runs the same graph, with its own result
    agnostic_eager, agnostic_compiled = eager_method.for_query_agnostic(), compiled_method.for_query_agnostic()
    assert agnostic_compiled is not compiled_method and agnostic_compiled.last_query_weight == 1.0
    with torch.inference_mode(), torch._dynamo.config.patch(error_on_recompile=True):
        eager, compiled, plain = filled_cache(seed=8), filled_cache(seed=8), filled_cache(seed=8)
        agnostic_eager.compress(eager, 3, 64)
        agnostic_compiled.compress(compiled, 3, 64, compiled=True)
        compiled_method.compress(plain, 3, 64, compiled=True)
    for name in ("keys", "values", "log_votes", "positions", "cursor"):
        torch.testing.assert_close(getattr(compiled, name), getattr(eager, name), rtol=1e-5, atol=1e-5)
    # the query-agnostic mix (a tensor input) reached the graph: other entries kept
    assert not torch.equal(compiled.positions, plain.positions)
    if by_output:  # each layer's own o_proj reached the graph: the compiled compression at layer 7 equals an eager
        # one whose only bound weight is layer 7's (at index 0), and layers 1 and 7 keep different entries
        only_seventh = make_method("keepkv", **options)
        only_seventh.output_projections = [o_proj[7]]
        with torch.inference_mode(), torch._dynamo.config.patch(error_on_recompile=True):
            by_layer = {layer: filled_cache(seed=9) for layer in (1, 7)}
            for layer, cache in by_layer.items():
                compiled_method.compress(cache, layer, 64, compiled=True)
                assert cache.output_projection is None  # handed over for the compression only
                assert "output_projection" not in cache._parameters  # a plain attribute, not the module's parameter
            reference = filled_cache(seed=9)
            only_seventh.compress(reference, 0, 64)
        for name in ("keys", "values", "log_votes", "positions", "cursor"):
            torch.testing.assert_close(getattr(by_layer[7], name), getattr(reference, name), rtol=1e-5, atol=1e-5)
        assert not torch.equal(by_layer[1].positions, by_layer[7].positions)


def test_packed_entries_leave_the_cache_alone_and_store_packed_writes_them():
    cache = filled_cache(seed=7)
    before = {name: getattr(cache, name).clone() for name in ("keys", "values", "log_votes", "positions")}
    kept = torch.arange(0, 300, 3).expand(1, 3, -1).contiguous()
    valid = torch.ones_like(kept, dtype=torch.bool)
    valid[:, 1, -5:] = False
    entries = cache.packed_entries(kept, valid)
    for name, tensor in before.items():
        assert torch.equal(getattr(cache, name), tensor), name
        assert entries[name].shape == tensor.shape
    assert int(entries["cursor"]) == 100
    assert torch.equal(entries["positions"][0, 0, :100], torch.arange(0, 300, 3).to(entries["positions"].dtype))
    assert torch.isinf(entries["log_votes"][0, 1, 95:]).all() and (entries["positions"][0, 1, 95:] == -1).all()
    assert (entries["keys"][:, :, 100:] == 0).all()
    cache.store_packed(cache.packed_entries(kept, valid))
    for name in ("keys", "values", "log_votes", "positions", "cursor"):
        assert torch.equal(getattr(cache, name), entries[name]), name


def test_one_query_window_update_equals_the_sorted_one():
    """The decode step's window update (shift + append, no sort) gives the general sorted update's window, from
    windows with absent rows at the front, full windows and padding rows alike."""
    g = torch.Generator().manual_seed(11)
    for trial in range(6):
        fast = CompressedLayerCache(3, 2, 16, 8, torch.float32, num_heads=4, window=5)
        slow = CompressedLayerCache(3, 2, 16, 8, torch.float32, num_heads=4, window=5)
        for step in range(9):
            width = 1 if step >= 2 or trial % 2 else 3  # some prefill-like chunks first
            queries = torch.randn(3, 4, width, 8, generator=g)
            positions = torch.arange(width)[None].expand(3, -1) + 10 * step
            valid = torch.rand(3, width, generator=g) > 0.3
            fast.observe_queries(queries, positions, valid)
            (slow._append_queries if width == 1 else slow.observe_queries)(queries, positions, valid)
            assert torch.equal(fast.window_positions, slow.window_positions), (trial, step)
            assert torch.equal(fast.window_queries, slow.window_queries), (trial, step)


@pytest.mark.parametrize("tied", [True, False])
def test_bytes_read_per_token_count_an_untied_embedding_as_one_row(tied):
    """The bandwidth bound's weight bytes: a tied table is read whole (by the output head); an untied input
    embedding only for the one row a decode step looks up."""
    from keepkv.bench import weight_bytes, weight_bytes_read_per_token
    from tests.conftest import tiny_network

    network = tiny_network(tiny_config(tie_word_embeddings=tied))
    every_parameter = sum(p.numel() * p.element_size() for p in network.parameters())  # dedups shared ones
    assert weight_bytes(network) == every_parameter
    embedding = network.model.embed_tokens.weight
    table, row = embedding.numel() * embedding.element_size(), embedding.shape[1] * embedding.element_size()
    assert weight_bytes_read_per_token(network) == every_parameter - (0 if tied else table - row)


def test_decode_graph_traces_the_decoder_block_once_and_calls_it_for_every_layer():
    """Compile cost (issue 5, target 6): the decode step's graph holds one block subgraph, called once per layer
    (``keepkv.compile_limits.repeated_region``), not ``num_layers`` inlined copies. Traced with dynamo only (a
    capturing backend, no inductor), and the captured graph still gives the eager logits."""
    from keepkv.generate import GenerationEngine
    from tests.conftest import tiny_network

    if not hasattr(torch.compiler, "nested_compile_region"):
        pytest.skip("torch without nested_compile_region: blocks are inlined")
    network = tiny_network(tiny_config(num_layers=4))
    engine = GenerationEngine(network, compile=False)
    engine.prepare_caches(batch_size=1, prompt_tokens=8, max_new_tokens=4)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    tokens, positions = torch.tensor([[3]]), torch.tensor([[0]])
    with torch.inference_mode():
        expected = engine._decode(tokens, positions)
        engine.prepare_caches(batch_size=1, prompt_tokens=8, max_new_tokens=4)  # the same empty caches again
        got = torch.compile(engine._decode, backend=capture, fullgraph=True, dynamic=False)(tokens, positions)
    assert len(graphs) == 1
    calls = [node for node in graphs[0].graph.nodes
             if node.op == "call_function" and node.target is torch.ops.higher_order.invoke_subgraph]
    assert len(calls) == 4
    assert len({call.args[0].target for call in calls}) == 1  # the same subgraph module every time
    # traced, the one-row projections take the reduction form (keepkv.ops.linear): float32 summation order only
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---- the split prefill kernel (issue 15) ----------------------------------------------------------------------
def chunk_case(seed, dtype, past, q_len=9, batch=2, kv_heads=3, group=3, head_dim=16, padded=0, empty_row=False):
    """A cache of ``past`` old slots (shuffled positions < the chunk's, votes, empty slots) followed by the
    chunk's ``q_len`` new slots (positions consecutive after them, ``ln p = 0``; the last ``padded`` are padding)."""
    q, keys, values, log_votes, kv_positions, _ = make_case(seed, dtype=dtype, batch=batch, kv_heads=kv_heads,
                                                            group=group, q_len=q_len, capacity=past + q_len,
                                                            head_dim=head_dim)
    start = past + 5
    kv_positions[:, :, :past] = torch.stack([torch.randperm(start)[:past] for _ in range(batch * kv_heads)]).view(
        batch, kv_heads, past).int()
    kv_positions[:, :, past:] = (start + torch.arange(q_len)).int()
    log_votes[:, :, past:] = 0.0
    if padded:
        log_votes[:, :, past + q_len - padded:] = -math.inf
    if empty_row and past:
        log_votes[0, :, :past] = -math.inf
    q_positions = (start + torch.arange(q_len)).expand(batch, q_len).int()
    return q, keys, values, log_votes, kv_positions, q_positions


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("past,padded,empty_row", [(0, 0, False), (37, 0, False), (37, 3, False), (300, 0, True)])
def test_split_prefill_kernel_equals_reference(dtype, tol, past, padded, empty_row):
    from keepkv.ops.attention import vote_attention_chunk

    for seed in (0, 1):
        q, keys, values, log_votes, kv_positions, q_positions = chunk_case(seed, dtype, past, padded=padded,
                                                                          empty_row=empty_row)
        out = vote_attention_chunk(q, keys[:, :, past:], values[:, :, past:], keys[:, :, :past],
                                   values[:, :, :past], log_votes[:, :, :past], compiled=False)
        reference = vote_attention_reference(q, keys, values, log_votes, kv_positions, q_positions)
        real = q.shape[2] - padded  # a padding query's row is not defined by the split kernel
        assert out.dtype == dtype and torch.isfinite(out[:, :, :real]).all()
        torch.testing.assert_close(out[:, :, :real].float(), reference[:, :, :real].float(), rtol=tol, atol=tol)


def test_split_prefill_merge_ignores_a_part_that_saw_nothing():
    from keepkv.ops.attention import _merge_two

    out_a, out_b = torch.randn(1, 2, 3, 4), torch.full((1, 2, 3, 4), float("nan"))
    lse_a, lse_b = torch.randn(1, 2, 3), torch.full((1, 2, 3), -math.inf)
    torch.testing.assert_close(_merge_two(out_a, lse_a, out_b, lse_b), out_a)
    assert (_merge_two(out_b, lse_b, out_b, lse_b) == 0).all()  # nothing seen anywhere: zeros, never NaN


def test_prefill_kernel_is_chosen_per_device_and_checked(monkeypatch):
    from keepkv.ops.attention import prefill_kernel_for

    assert prefill_kernel_for(torch.device("cpu")) == "split"
    assert prefill_kernel_for(torch.device("meta")) == "flex"  # no fused attention with log-sum-exp there
    assert prefill_kernel_for(torch.device("cpu"), RuntimeOptions(prefill_kernel="flex")) == "flex"
    with pytest.raises(KeepKVError, match="prefill_kernel"):
        RuntimeOptions(prefill_kernel="dense")
    split = RuntimeOptions(prefill_kernel="split")
    assert prefill_kernel_for(torch.device("cpu"), split) == "split"
    with pytest.raises(ValueError, match="CPU only"):
        prefill_kernel_for(torch.device("meta"), split)


def test_engine_routes_only_eligible_chunks_to_the_split_kernel(monkeypatch):
    from keepkv.generate import GenerationEngine
    from tests.conftest import tiny_network

    engine = GenerationEngine(tiny_network(), compile=True, prefill_chunk_size=8)  # nothing compiles here
    engine.prepare_caches(2, 16, 4)
    engine.cache_manager.wrote(8)
    right_padded = torch.tensor([[True] * 8, [True] * 5 + [False] * 3])
    assert engine._split_prefill_past(right_padded) == [8, 8]  # every layer: the 8 slots written before
    left_padded = torch.tensor([[True] * 8, [False] * 3 + [True] * 5])
    assert engine._split_prefill_past(left_padded) is None  # padding before a real token: flex
    assert engine._split_prefill_past(right_padded[:, :1]) is None  # one token: the decode kernels
    flex_engine = GenerationEngine(tiny_network(), compile=True, prefill_chunk_size=8,
                                   runtime=RuntimeOptions(prefill_kernel="flex"))
    flex_engine.prepare_caches(2, 16, 4)
    flex_engine.cache_manager.wrote(8)
    assert flex_engine._split_prefill_past(right_padded) is None
    assert all(layer.runtime.prefill_kernel == "flex" for layer in flex_engine.network.attention_layers)
    again = GenerationEngine(flex_engine.network, compile=False)  # no options given: the network keeps its own
    assert again.runtime is flex_engine.runtime and again.network.runtime.prefill_kernel == "flex"
    from keepkv.ops.linear import Linear

    no_gemv = GenerationEngine(tiny_network(), compile=False, runtime=RuntimeOptions(reduction_dtypes=()))
    linears = [m for m in no_gemv.network.modules() if isinstance(m, Linear)]
    assert linears and all(m.reduction_dtypes == () for m in linears)
    eager = GenerationEngine(tiny_network(), compile=False, prefill_chunk_size=8)
    eager.prepare_caches(1, 8, 4)
    assert eager._split_prefill_past(right_padded[:1]) is None  # eager runs keep the dense reference


def test_runtime_options_size_the_caches_and_split_the_packed_kernel():
    from keepkv.ops.attention import decode_pieces

    config = tiny_config()
    full = CacheManager(config, torch.float32, torch.device("cpu"), runtime=RuntimeOptions(capacity_quantum=64))
    assert full.capacity_for(100, 10) == 128
    assert CacheManager(config, torch.float32, torch.device("cpu")).capacity_for(100, 10) == 256
    assert decode_pieces(8 * 128) == 8 and decode_pieces(8 * 128, most=4) == 4 and decode_pieces(8 * 128, 1) == 1
    compiled = CacheManager(config, torch.float32, torch.device("cpu"), make_method("keepkv"), 0.5, compiled_ops=True)
    compiled.allocate(1, 200, 8, 64)
    assert compiled.compresses_compiled
    assert not CacheManager(config, torch.float32, torch.device("cpu"), make_method("keepkv"), 0.5).compiled_ops
    pyramid = CacheManager(config, torch.float32, torch.device("cpu"), make_method("pyramidkv+keepkv"), 0.5,
                           compiled_ops=True)
    pyramid.allocate(1, 200, 8, 64)
    assert len(set(pyramid.layer_budgets)) > 1 and not pyramid.compresses_compiled  # one graph per budget: eager


def test_load_refuses_runtime_options_of_the_wrong_type():
    from keepkv.models import load

    with pytest.raises(KeepKVError, match="runtime must be None or a keepkv.runtime.RuntimeOptions"):
        load("SmolLM2-135M-Instruct", runtime={"decode_kernel": "sdpa"})
