"""The property matrix every registered compression method must pass (spec ``baselines.md``, "What every method
must satisfy"), at the cache level on small random caches (Hypothesis) and end to end through a tiny random
model (prefill chunks + decode compressions, batch 2 with left padding, GQA 4/2).

Properties:
- the cache never exceeds its budget (per KV head; with Ada-KV head budgets, per layer and batch row);
- protected entries (sinks, recent window, the newest token) are never evicted;
- deterministic: the same inputs give bit-identical caches (ties broken by position);
- no NaN/inf in keys, values or votes, in float32 / bfloat16 / float16, for any scores (all-equal included);
- a budget holding every live entry changes nothing (``kv_budget=1.0`` is the full cache: ``load`` maps it to
  the ``FullCache`` method, checked too);
- votes: vote-carrying methods (KeepKV and ``X+keepkv``) keep ``sum p = tokens seen - entries dropped without a
  merge``; every other method leaves every live entry at one vote.

Adding a method = one file + one registry line + one row in ``MATRIX`` below (a test fails until the row exists);
an option that changes which entries a method keeps gets a row in ``OPTION_ROWS``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keepkv.cache.compressed import CompressedLayerCache
from keepkv.cache.manager import CacheManager
from keepkv.cache.methods import METHODS, make_method, option_names
from keepkv.generate import GenerationEngine
from keepkv.models.loading import resolve_method
from keepkv.sampling import SamplingConfig
from tests.conftest import TINY_VOCAB, tiny_config, tiny_network

HIDDEN = 16  # hidden size of the random o_proj weights bound to CriticalKV at the cache level

# the options used by these tests. Every registered method gets a row (:data:`keepkv.cache.methods.METHODS`):
# a method listed in OWN_OPTIONS takes those, any other the small generic options it accepts (a few sinks and
# recent tokens, so that the tiny caches below still have entries to evict); a new method is picked up with no
# edit here. VARIANTS are the composed forms worth checking (adakv-X, X+keepkv).
SMALL_OPTIONS = dict(sinks=2, window=3)
OWN_OPTIONS: dict[str, dict] = {
    "streamingllm": dict(window=3),
    "h2o": dict(window=1),
    "snapkv": dict(window=3, kernel_size=3),
    "tova": dict(),
    "pyramidkv": dict(window=3, kernel_size=3),
    "criticalkv": dict(window=3, kernel_size=3),
    "weightedkv": dict(sinks=2, window=2),
    "cam": dict(sinks=2, window=2, merge_span=4),
    "d2o": dict(sinks=2, window=1),
    "keepkv": dict(sinks=2, window=3),
}
VARIANTS: dict[str, dict] = {
    "adakv-snapkv": dict(window=3, kernel_size=3),
    "adakv-h2o": dict(),
    "adakv-criticalkv": dict(window=3, kernel_size=3),
    "snapkv+keepkv": dict(window=3),
    "h2o+keepkv": dict(window=2),
    "tova+keepkv": dict(),
    "adakv-criticalkv+keepkv": dict(window=3, kernel_size=3),
    "pyramidkv+keepkv": dict(window=3),
}


def small_options(name: str) -> dict:
    if name in OWN_OPTIONS:
        return OWN_OPTIONS[name]
    accepted = option_names(METHODS[name])
    return {key: value for key, value in SMALL_OPTIONS.items() if key in accepted}


# rows of one method with a non-default option whose selection the properties must hold for too: name -> method
OPTION_ROWS: dict[str, tuple[str, dict]] = {
    "keepkv@blend": ("keepkv", {**OWN_OPTIONS["keepkv"], "selection": "blend"}),  # heads matched by position
    "keepkv@floor": ("keepkv", {**OWN_OPTIONS["keepkv"], "selection": "floor"}),  # and the budget split per head
}
MATRIX: dict[str, dict] = {**{name: small_options(name) for name in METHODS}, **VARIANTS,
                           **{name: options for name, (_, options) in OPTION_ROWS.items()}}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test of this file runs on one thread (conftest.one_thread)."""


def matrix_method(name: str, **overrides):
    """The method of ``MATRIX`` row ``name`` with its options (and ``overrides``)."""
    method_name = OPTION_ROWS[name][0] if name in OPTION_ROWS else name
    return make_method(method_name, **{**MATRIX[name], **overrides})


def build_method(name: str, layers: int = 1, heads: int = 4, head_dim: int = 8, seed: int = 0):
    method = matrix_method(name)
    target = getattr(method, "selector", method)
    if hasattr(target, "bind_output_projections"):
        generator = torch.Generator().manual_seed(seed)
        target.bind_output_projections(
            [torch.randn(HIDDEN, heads * head_dim, generator=generator) for _ in range(layers)]
        )
    return method


def carries_votes(method) -> bool:
    return method.name == "keepkv"


def uses_head_budgets(method) -> bool:
    return getattr(getattr(method, "selector", method), "head_budgets", "uniform") == "adakv"


def write_tokens(cache: CompressedLayerCache, generator: torch.Generator, start: int, count: int, padding: int,
                 equal_keys: bool) -> None:
    """Append ``count`` tokens per row (row 1 gets ``padding`` leading pads in the first call) and observe their
    queries. ``start`` is the first position of row 0; row 1 lags by ``padding``."""
    batch, kv_heads, _, dim = cache.keys.shape
    heads = cache.window_queries.shape[1]
    dtype = cache.keys.dtype
    keys = torch.randn(batch, kv_heads, count, dim, generator=generator)
    if equal_keys:
        keys = torch.ones_like(keys)
    values = torch.randn(batch, kv_heads, count, dim, generator=generator)
    queries = torch.randn(batch, heads, count, dim, generator=generator)
    valid = torch.ones(batch, count, dtype=torch.bool)
    positions = torch.arange(start, start + count).repeat(batch, 1)
    if batch > 1 and padding:
        if start == 0:
            valid[1, :padding] = False
            positions[1] = (valid[1].long().cumsum(0) - 1).clamp_min(0)
        else:
            positions[1] -= padding
    cache.write(keys.to(dtype), values.to(dtype), positions, valid)
    cache.observe_queries(queries.to(dtype), positions, valid)


def live_positions(cache: CompressedLayerCache) -> list[list[set[int]]]:
    live = torch.isfinite(cache.log_votes)
    return [[set(cache.positions[b, h][live[b, h]].tolist()) for h in range(live.shape[1])]
            for b in range(live.shape[0])]


def live_sequence(cache: CompressedLayerCache) -> tuple[torch.Tensor, ...]:
    """Each head's live entries in slot order (padded with zeros / -inf / -1), for comparing caches."""
    live = torch.isfinite(cache.log_votes)
    order = torch.sort((~live).to(torch.int8), dim=-1, stable=True).indices
    live_sorted = live.gather(2, order)
    dim = cache.keys.shape[-1]
    rows = order[..., None].expand(-1, -1, -1, dim)
    keys = torch.where(live_sorted[..., None], cache.keys.gather(2, rows), 0)
    values = torch.where(live_sorted[..., None], cache.values.gather(2, rows), 0)
    votes = torch.where(live_sorted, cache.log_votes.gather(2, order), -float("inf"))
    positions = torch.where(live_sorted, cache.positions.gather(2, order), -1)
    return keys, values, votes, positions


def assert_finite(cache: CompressedLayerCache) -> None:
    assert torch.isfinite(cache.keys).all() and torch.isfinite(cache.values).all()
    assert not torch.isnan(cache.log_votes).any()
    assert not (cache.log_votes == float("inf")).any()
    if cache.accumulate_attention:
        assert torch.isfinite(cache.accumulated_attention).all()


def compress_and_check(method, cache: CompressedLayerCache, budget: int) -> None:
    """One compression to ``budget`` with every per-compression property checked."""
    protected = method.protected_mask(cache, budget)
    protected_positions = [[set(cache.positions[b, h][protected[b, h]].tolist()) for h in range(protected.shape[1])]
                           for b in range(protected.shape[0])]
    votes_before = torch.exp(cache.log_votes).sum()
    if carries_votes(method):  # the votes of the entries evicted without a merge
        kept_slots, kept_valid, evicted_slots, evicted_valid = method.select(cache, 0, budget)
        merger = getattr(method, "merger", method)  # X+keepkv: KeepKV (the merger) matches
        _, merge_mask = merger.match(cache, kept_slots, kept_valid, evicted_slots, evicted_valid)
        evicted_votes = torch.exp(cache.log_votes.gather(2, evicted_slots))
        dropped_votes = torch.where(evicted_valid & ~merge_mask, evicted_votes, 0.0).sum()
    method.compress(cache, 0, budget)
    live = torch.isfinite(cache.log_votes)
    per_head = live.sum(dim=-1)
    assert (per_head <= min(method.slots_for_budget(budget), cache.capacity)).all()
    if uses_head_budgets(method):
        assert (per_head.sum(dim=-1) <= budget * cache.keys.shape[1]).all()
    else:
        assert (per_head <= budget).all()
    after = live_positions(cache)
    for b, row in enumerate(protected_positions):
        for h, kept in enumerate(row):
            assert kept <= after[b][h], f"protected positions {sorted(kept - after[b][h])} evicted (row {b}, head {h})"
    assert_finite(cache)
    if carries_votes(method):
        torch.testing.assert_close(torch.exp(cache.log_votes).sum(), votes_before - dropped_votes, rtol=1e-5,
                                   atol=1e-3)
    else:
        assert (cache.log_votes[live] == 0).all()


@st.composite
def cache_cases(draw):
    return dict(
        batch=draw(st.integers(1, 2)), kv_heads=draw(st.integers(1, 2)), group=draw(st.integers(1, 2)),
        head_dim=draw(st.sampled_from([4, 8])), tokens=draw(st.integers(6, 22)), padding=draw(st.integers(0, 3)),
        extra_capacity=draw(st.integers(0, 3)), budget_slack=draw(st.integers(0, 24)),
        dtype=draw(st.sampled_from(DTYPES)), equal_keys=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
        decode_tokens=draw(st.integers(1, 3)),
    )


def test_every_registered_method_has_a_matrix_row_that_can_compress_a_tiny_cache():
    """Rows come from the registry; each protects at most 8 entries, so most of the tiny caches drawn below (6-22
    tokens) have entries to evict."""
    assert [name for name in MATRIX if name in METHODS] == list(METHODS)
    for name in MATRIX:
        assert matrix_method(name).protected_entries <= 8, name


@pytest.mark.parametrize("name", list(MATRIX))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cache_cases())
def test_cache_level_properties(name, case):
    method = build_method(name, heads=case["kv_heads"] * case["group"], head_dim=case["head_dim"])
    protected = method.protected_entries
    tokens = max(case["tokens"], protected + 1)
    capacity = tokens + case["padding"] + case["extra_capacity"] + case["decode_tokens"]
    budget = min(protected + case["budget_slack"], tokens + 2)

    def fresh_cache() -> CompressedLayerCache:
        return CompressedLayerCache(
            case["batch"], case["kv_heads"], capacity, case["head_dim"], case["dtype"],
            num_heads=case["kv_heads"] * case["group"], window=method.query_window,
            accumulate_attention=method.needs_accumulated_attention,
        )

    def filled_cache() -> CompressedLayerCache:
        cache = fresh_cache()
        write_tokens(cache, torch.Generator().manual_seed(case["seed"]), 0, tokens, case["padding"], case["equal_keys"])
        return cache

    heads = case["kv_heads"] * case["group"]
    # a budget holding every live entry changes nothing
    cache, roomy = filled_cache(), filled_cache()
    build_method(name, heads=heads, head_dim=case["head_dim"]).compress(roomy, 0, capacity)
    for before, after in zip(live_sequence(cache), live_sequence(roomy)):
        assert torch.equal(before, after)

    # prefill-end compression, then a few decode tokens and a decode compression
    compress_and_check(method, cache, budget)
    first_compression = copy.deepcopy(cache)
    if cache.capacity - int(cache.cursor) >= case["decode_tokens"]:
        generator = torch.Generator().manual_seed(case["seed"] + 1)
        write_tokens(cache, generator, tokens, case["decode_tokens"], case["padding"], case["equal_keys"])
        compress_and_check(method, cache, budget)

    # deterministic: a fresh method on a fresh copy of the same inputs gives bit-identical buffers
    replay = filled_cache()
    build_method(name, heads=heads, head_dim=case["head_dim"]).compress(replay, 0, budget)
    for a, b in zip(first_compression.buffers(), replay.buffers()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(set(MATRIX) - {"keepkv", *OPTION_ROWS}))
def test_full_budget_is_the_full_cache(name):
    resolved, method = resolve_method(name, 1.0, {})
    assert method.keeps_everything and resolved == name


def run_generation(name: str, network, seed: int = 0, decode_slack: int = 3, max_new: int = 8):
    method = matrix_method(name, window=4)
    manager = CacheManager(network.config, torch.float32, torch.device("cpu"), method, kv_budget=12,
                           decode_slack=decode_slack)
    manager.bind_network(network)  # what GenerationEngine will do (CriticalKV reads o_proj)
    engine = GenerationEngine(network, compile=False, prefill_chunk_size=8, cache_manager=manager)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TINY_VOCAB, (2, 40), generator=generator)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, :7] = False  # left padding
    tokens = torch.stack(list(engine.generate_tokens(ids, valid, max_new, SamplingConfig())), dim=1)
    return tokens, manager


@pytest.fixture(scope="module")
def tiny_gqa_network():
    return tiny_network(tiny_config(num_layers=3))


@pytest.mark.parametrize("name", list(MATRIX))
def test_generation_runs_through_prefill_and_decode_compression(name, tiny_gqa_network):
    tokens, manager = run_generation(name, tiny_gqa_network)
    assert tokens.shape == (2, 8) and int(tokens.min()) >= 0 and int(tokens.max()) < TINY_VOCAB
    assert manager.compressions >= 2  # prompt chunks (40 tokens into B + 8 slots) and the end of prefill
    method = manager.method
    entries = manager.entries_per_head()  # [layers, batch, kv_heads]
    for layer, cache in enumerate(manager.caches):
        assert_finite(cache)
        assert cache.capacity == max(manager.layer_slots) + manager.room  # one capacity for every layer
        assert (entries[layer] <= cache.capacity).all()
        if not uses_head_budgets(method):
            assert (entries[layer] <= manager.layer_budgets[layer] + manager.room).all()
    assert sum(manager.layer_budgets) == manager.budget * len(manager.layer_budgets)
    if method.compresses_during_decode:
        assert manager.room == 3
    again, _ = run_generation(name, tiny_gqa_network)
    assert torch.equal(tokens, again)


ARCHITECTURES = {
    "mistral-sliding-window": dict(arch="mistral", sliding_window=6, num_kv_heads=1),
    "qwen2-bias-tied": dict(arch="qwen2", attention_bias=True, tie_word_embeddings=True),
}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("name", ["h2o", "snapkv", "weightedkv", "cam", "d2o", "adakv-criticalkv+keepkv"])
def test_generation_on_the_other_architectures(name, arch):
    network = tiny_network(tiny_config(**ARCHITECTURES[arch]), seed=1)
    tokens, manager = run_generation(name, network)
    assert tokens.shape == (2, 8)
    for cache in manager.caches:
        assert_finite(cache)
