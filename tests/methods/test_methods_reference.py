"""Each method against a small independent reference computation written here (plain loops over heads, queries
and positions; float64 where it matters), not keepkv's vectorised code path:

SnapKV pooling and window - H2O accumulation over decode steps - TOVA's single eviction per step - PyramidKV's
layer budget sequence (mean = requested) - Ada-KV's 20% floor per head - CriticalKV's two stages and
``||v W_O^h||_1`` - WeightedKV's value merge (key gone, convex weights) - CaM's seeded Bernoulli spread over 32
values - D2O's threshold EMA and similarity-weighted merge.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keepkv.cache.budgets import adakv_head_budgets, cosine_layer_budgets, pyramid_layer_budgets
from keepkv.cache.compressed import CompressedLayerCache
from keepkv.cache.manager import CacheManager
from keepkv.cache.methods import make_method
from keepkv.cache.methods.cam import counter_uniform
from keepkv.cache.methods.criticalkv import value_output_norms
from keepkv.cache.methods.d2o import variance_layer_budgets
from keepkv.cache.methods.weightedkv import neighbour_slots
from keepkv.errors import KeepKVError
from keepkv.generate import GenerationEngine
from keepkv.sampling import SamplingConfig
from tests.conftest import TINY_VOCAB, tiny_config, tiny_network


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test of this file runs on one thread (conftest.one_thread)."""


# ---- helpers: a cache filled with known tokens, and dense per-query attention ---------------------------------
def filled_cache(method, batch=1, kv_heads=2, group=2, dim=8, tokens=20, capacity=None, seed=0, equal_keys=False):
    """A cache holding ``tokens`` random tokens at positions ``0..tokens-1`` whose queries were all observed.
    Returns ``(cache, queries [batch, heads, tokens, dim])``."""
    generator = torch.Generator().manual_seed(seed)
    cache = CompressedLayerCache(
        batch, kv_heads, capacity or tokens, dim, torch.float32, num_heads=kv_heads * group,
        window=method.query_window, accumulate_attention=method.needs_accumulated_attention,
    )
    keys = torch.ones(batch, kv_heads, tokens, dim) if equal_keys else torch.randn(batch, kv_heads, tokens, dim,
                                                                                 generator=generator)
    values = torch.randn(batch, kv_heads, tokens, dim, generator=generator)
    queries = torch.randn(batch, kv_heads * group, tokens, dim, generator=generator)
    positions = torch.arange(tokens).repeat(batch, 1)
    valid = torch.ones(batch, tokens, dtype=torch.bool)
    cache.write(keys, values, positions, valid)
    cache.observe_queries(queries, positions, valid)
    return cache, queries


def append_token(cache, generator, position):
    """Write one random token at ``position`` for every row and observe its query; returns the query."""
    batch, kv_heads, _, dim = cache.keys.shape
    heads = cache.window_queries.shape[1]
    key = torch.randn(batch, kv_heads, 1, dim, generator=generator)
    value = torch.randn(batch, kv_heads, 1, dim, generator=generator)
    query = torch.randn(batch, heads, 1, dim, generator=generator)
    positions = torch.full((batch, 1), position)
    valid = torch.ones(batch, 1, dtype=torch.bool)
    cache.write(key, value, positions, valid)
    cache.observe_queries(query, positions, valid)
    return query


def entries(cache, b, h):
    """``{position: (key, value, votes)}`` of the live entries of row ``b``, KV head ``h``."""
    out = {}
    for slot in range(cache.capacity):
        if math.isfinite(float(cache.log_votes[b, h, slot])):
            out[int(cache.positions[b, h, slot])] = (cache.keys[b, h, slot].double(), cache.values[b, h, slot].double(),
                                                     math.exp(float(cache.log_votes[b, h, slot])))
    return out


def dense_attention(query, keyed):
    """Attention of one query over ``keyed = {position: (key, value, votes)}`` (all visible):
    ``{position: p_i exp(q·k_i/sqrt(d)) / sum_j p_j exp(q·k_j/sqrt(d))}`` in float64."""
    q = query.double()
    logits = {pos: float(q @ key) / math.sqrt(q.shape[0]) + math.log(votes) for pos, (key, _, votes) in keyed.items()}
    peak = max(logits.values())
    weights = {pos: math.exp(logit - peak) for pos, logit in logits.items()}
    total = sum(weights.values())
    return {pos: w / total for pos, w in weights.items()}


def top_positions(scores: dict[int, float], count: int) -> set[int]:
    """The ``count`` positions with the highest score, ties to the older position."""
    return set(sorted(scores, key=lambda pos: (-scores[pos], pos))[:max(count, 0)])


def kept_positions(cache, b, h) -> set[int]:
    return set(entries(cache, b, h))


# ---- SnapKV ---------------------------------------------------------------------------------------------------
def snapkv_head_scores(cache_entries, queries, group, kv_head, window, kernel, pooling, tokens):
    """Per query head ``g`` of ``kv_head``: window-mean attention over the prefix, zero on the window, pooled.
    Returns ``{g: [score per position]}`` (float64)."""
    pooled_by_head = {}
    for g in range(group):
        head = kv_head * group + g
        attention = [0.0] * tokens
        for t in range(tokens - window, tokens):
            visible = {pos: e for pos, e in cache_entries.items() if pos <= t}
            for pos, p in dense_attention(queries[head, t], visible).items():
                attention[pos] += p / window
        for pos in range(tokens - window, tokens):
            attention[pos] = 0.0
        half = kernel // 2
        pooled = []
        for i in range(tokens):
            around = [attention[j] if 0 <= j < tokens else 0.0 for j in range(i - half, i + half + 1)]
            pooled.append(max(around) if pooling == "maxpool" else sum(around) / kernel)
        pooled_by_head[g] = pooled
    return pooled_by_head


@pytest.mark.parametrize("pooling,kernel", [("maxpool", 7), ("avgpool", 5), ("maxpool", 1)])
def test_snapkv_pooling_and_window(pooling, kernel):
    window, tokens, budget, group = 4, 24, 10, 2
    method = make_method("snapkv", window=window, kernel_size=kernel, pooling=pooling)
    cache, queries = filled_cache(method, batch=2, kv_heads=2, group=group, tokens=tokens, seed=3)
    reference = {(b, h): entries(cache, b, h) for b in range(2) for h in range(2)}
    method.compress(cache, 0, budget)
    for (b, h), cache_entries in reference.items():
        pooled = snapkv_head_scores(cache_entries, queries[b], group, h, window, kernel, pooling, tokens)
        score = {pos: sum(pooled[g][pos] for g in range(group)) / group for pos in range(tokens - window)}
        expected = set(range(tokens - window, tokens)) | top_positions(score, budget - window)
        assert kept_positions(cache, b, h) == expected


# ---- H2O ------------------------------------------------------------------------------------------------------
def test_h2o_accumulates_attention_over_prefill_and_decode_steps():
    group, budget = 2, 10
    method = make_method("h2o")  # recent = floor(0.5 * 10) = 5, heavy hitters 5
    cache, queries = filled_cache(method, batch=1, kv_heads=2, group=group, tokens=12, capacity=16, seed=5)
    generator = torch.Generator().manual_seed(6)
    # reference: per KV head, position -> accumulated group-mean attention, from the prompt's column sums on
    reference = {h: {pos: 0.0 for pos in range(12)} for h in range(2)}

    def accumulate(query_by_head, position):
        for h in range(2):
            keyed = {pos: e for pos, e in entries(cache, 0, h).items() if pos <= position}
            for g in range(group):
                for pos, p in dense_attention(query_by_head[h * group + g], keyed).items():
                    reference[h][pos] = reference[h].get(pos, 0.0) + p / group

    for t in range(12):
        accumulate(queries[0, :, t], t)
    for step, position in enumerate(range(12, 18)):
        if step == 3:  # a compression in the middle: H2O keeps 5 recent + the 5 heaviest others
            before = {h: dict(reference[h]) for h in range(2)}
            method.compress(cache, 0, budget)
            for h in range(2):
                newest = max(before[h])
                recent = {pos for pos in before[h] if pos > newest - 5}
                heavy = top_positions({p: s for p, s in before[h].items() if p not in recent}, budget - 5)
                assert kept_positions(cache, 0, h) == recent | heavy
                reference[h] = {pos: s for pos, s in before[h].items() if pos in recent | heavy}
        query = append_token(cache, generator, position)
        for h in range(2):
            reference[h][position] = 0.0
        accumulate(query[0, :, 0], position)
    for h in range(2):
        live = torch.isfinite(cache.log_votes[0, h])
        got = dict(zip(cache.positions[0, h][live].tolist(), cache.accumulated_attention[0, h][live].tolist()))
        assert set(got) == set(reference[h])
        for pos, value in reference[h].items():
            assert got[pos] == pytest.approx(value, rel=1e-5, abs=1e-6)


# ---- TOVA -----------------------------------------------------------------------------------------------------
def test_tova_evicts_exactly_one_entry_per_step_the_same_for_all_heads():
    group, kv_heads, budget = 2, 2, 9
    method = make_method("tova")
    cache, queries = filled_cache(method, batch=2, kv_heads=kv_heads, group=group, tokens=10, capacity=10, seed=7)
    generator = torch.Generator().manual_seed(8)
    newest_query, position = queries[:, :, -1], 9
    for _ in range(4):
        before = {(b, h): entries(cache, b, h) for b in range(2) for h in range(kv_heads)}
        method.compress(cache, 0, budget)
        for b in range(2):
            # mean over all query heads of the layer of the newest query's attention; the newest token stays
            layer_mean = {pos: 0.0 for pos in before[(b, 0)]}
            for h in range(kv_heads):
                for g in range(group):
                    for pos, p in dense_attention(newest_query[b, h * group + g], before[(b, h)]).items():
                        layer_mean[pos] += p / (kv_heads * group)
            candidates = {pos: s for pos, s in layer_mean.items() if pos != position}
            dropped = min(candidates, key=lambda pos: (candidates[pos], -pos))
            for h in range(kv_heads):
                assert set(before[(b, h)]) - kept_positions(cache, b, h) == {dropped}
        position += 1
        newest_query = append_token(cache, generator, position)[:, :, 0]


def test_tova_with_decode_slack_one_compresses_once_per_step():
    network = tiny_network()
    method = make_method("tova")
    manager = CacheManager(network.config, torch.float32, torch.device("cpu"), method, kv_budget=12,
                           decode_slack=1)
    engine = GenerationEngine(network, compile=False, prefill_chunk_size=8, cache_manager=manager)
    ids = torch.randint(3, TINY_VOCAB, (2, 30), generator=torch.Generator().manual_seed(0))
    valid = torch.ones_like(ids, dtype=torch.bool)
    engine.prepare_caches(2, 30, 8)
    with torch.inference_mode():
        logits, positions = engine.prefill(ids, valid)
        engine.end_prefill()
        token = logits.argmax(-1)
        compressions = manager.compressions
        for step in range(6):
            engine.decode_step(token, positions)
            positions = positions + 1
            live = manager.entries_per_head()
            assert (live == 12 + 1).all()  # B entries + the token just written
            assert manager.compressions == compressions + step  # one eviction per step from the second step on


# ---- PyramidKV ------------------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(budget=st.integers(1, 600), num_layers=st.integers(1, 40), protected=st.integers(0, 64),
       beta=st.sampled_from([20, 5, 1]))
def test_pyramid_budget_sequence(budget, num_layers, protected, beta):
    layer_budgets = pyramid_layer_budgets(budget, num_layers, protected, beta)
    assert len(layer_budgets) == num_layers
    assert sum(layer_budgets) == budget * num_layers  # mean exactly the requested budget
    selectable = budget - protected
    if selectable <= 0 or num_layers == 1:
        assert layer_budgets == [budget] * num_layers
        return
    assert all(a >= b for a, b in zip(layer_budgets, layer_budgets[1:]))  # shallow layers keep more
    smallest, largest = selectable / beta, 2 * selectable - selectable / beta
    for layer, kept in enumerate(layer_budgets):
        exact = protected + largest - (largest - smallest) * layer / (num_layers - 1)
        assert abs(kept - exact) < 1 and kept >= protected


@settings(max_examples=200, deadline=None)
@given(budget=st.integers(1, 600), num_layers=st.integers(1, 40), protected=st.integers(0, 64),
       decay=st.sampled_from([0.0, 0.5, 0.8, 1.0]))
def test_cosine_budget_sequence(budget, num_layers, protected, decay):
    """The official KeepKV code's cosine schedule: R_l proportional to (1-d)(cos(pi l/L)+1)/2 + d, mean exactly B."""
    layer_budgets = cosine_layer_budgets(budget, num_layers, protected, decay)
    assert len(layer_budgets) == num_layers and sum(layer_budgets) == budget * num_layers
    selectable = budget - protected
    if selectable <= 0 or num_layers == 1:
        assert layer_budgets == [budget] * num_layers
        return
    assert all(a >= b for a, b in zip(layer_budgets, layer_budgets[1:])) and min(layer_budgets) >= protected
    weights = [(1 - decay) * (math.cos(math.pi * layer / num_layers) + 1) / 2 + decay for layer in range(num_layers)]
    for layer, kept in enumerate(layer_budgets):
        assert abs(kept - protected - selectable * num_layers * weights[layer] / sum(weights)) < 1


def test_keepkv_cosine_layer_budgets_size_each_layer():
    config = tiny_config(num_layers=4)
    network = tiny_network(config)
    method = make_method("keepkv", sinks=2, window=4, layer_budgets="cosine", cosine_decay=0.5)
    manager = CacheManager(config, torch.float32, torch.device("cpu"), method, kv_budget=30,
                           decode_slack=2)
    engine = GenerationEngine(network, compile=False, prefill_chunk_size=8, cache_manager=manager)
    ids = torch.randint(3, TINY_VOCAB, (1, 60), generator=torch.Generator().manual_seed(1))
    list(engine.generate_tokens(ids, torch.ones_like(ids, dtype=torch.bool), 5, SamplingConfig()))
    assert manager.layer_budgets == cosine_layer_budgets(30, 4, 6, 0.5)
    assert manager.layer_budgets[0] > manager.layer_budgets[-1] and sum(manager.layer_budgets) == 120
    entries = manager.entries_per_head()
    for layer, kept in enumerate(manager.layer_budgets):
        assert bool((entries[layer] <= kept + 2).all()) and bool((entries[layer] >= kept).all())
    assert method.stats.merged > 0  # KeepKV still merges under per-layer budgets
    with pytest.raises(KeepKVError, match="layer_budgets"):
        make_method("keepkv", layer_budgets="linear")


def test_pyramidkv_manager_sizes_each_layer():
    config = tiny_config(num_layers=4)
    network = tiny_network(config)
    method = make_method("pyramidkv", window=4, kernel_size=3)
    manager = CacheManager(config, torch.float32, torch.device("cpu"), method, kv_budget=20)
    engine = GenerationEngine(network, compile=False, prefill_chunk_size=8, cache_manager=manager)
    ids = torch.randint(3, TINY_VOCAB, (2, 60), generator=torch.Generator().manual_seed(1))
    list(engine.generate_tokens(ids, torch.ones_like(ids, dtype=torch.bool), 4, SamplingConfig()))
    assert manager.layer_budgets == pyramid_layer_budgets(20, 4, 4, 20) == [35, 25, 15, 5]
    entries = manager.entries_per_head()
    for layer, kept in enumerate(manager.layer_budgets):
        assert (entries[layer] == kept + 3).all()  # the layer's budget plus the 3 decode tokens SnapKV lets grow
        # one capacity for every layer (the widest layer's budget + max_new slots): one shape for compiled graphs
        assert manager.caches[layer].capacity == max(manager.layer_budgets) + 4


# ---- Ada-KV ---------------------------------------------------------------------------------------------------
def adakv_reference(scores, protected, live, budget, floor_fraction, head_slots):
    """Greedy Ada-KV per batch row: floors first, then the best remaining candidates over all heads."""
    batch, heads, capacity = scores.shape
    counts = torch.zeros(batch, heads, dtype=torch.long)
    for b in range(batch):
        pools, remaining, kept = 0, [], {}
        for h in range(heads):
            protected_count = int((protected[b, h] & live[b, h]).sum())
            candidates = sorted((slot for slot in range(capacity) if live[b, h, slot] and not protected[b, h, slot]),
                                key=lambda slot: (-float(scores[b, h, slot]), slot))
            selectable = max(budget - protected_count, 0)
            room = max(head_slots - protected_count, 0)
            floor = min(math.floor(floor_fraction * selectable + 1e-4), room, len(candidates))
            kept[h] = protected_count + floor
            pools += selectable - floor
            remaining += [(-float(scores[b, h, slot]), h, rank, slot) for rank, slot in enumerate(candidates)
                          if floor <= rank < room]
        for _, h, _, _ in sorted(remaining)[:max(pools, 0)]:
            kept[h] += 1
        for h in range(heads):
            counts[b, h] = kept[h]
    return counts


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), heads=st.integers(1, 4), capacity=st.integers(4, 20), budget=st.integers(1, 16),
       protect=st.integers(0, 3), cap=st.sampled_from([1.0, 1.5, 2.0]))
def test_adakv_head_budgets_match_a_greedy_reference(seed, heads, capacity, budget, protect, cap):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(2, heads, capacity, generator=generator).round(decimals=1)  # ties on purpose
    scores[:, 0] *= 0.05 if seed % 2 else 1.0  # sometimes one head loses every comparison (its floor matters)
    live = torch.rand(2, heads, capacity, generator=generator) < 0.9
    protected = live & (torch.arange(capacity) >= capacity - protect)
    priority = torch.where(protected, float("inf"), torch.where(live, scores, -float("inf")))
    head_slots = min(math.ceil(cap * budget), capacity)
    got = adakv_head_budgets(priority, protected, live, budget, 0.2, head_slots)
    assert torch.equal(got, adakv_reference(scores, protected, live, budget, 0.2, head_slots))


def test_adakv_keeps_a_20_percent_floor_for_every_head():
    # H2O's scores are the accumulated attention, which we set: head 1 loses every global comparison
    method = make_method("adakv-h2o", window=4, recent_fraction=0.0)
    cache, _ = filled_cache(method, batch=2, kv_heads=2, group=1, tokens=40, seed=2)
    generator = torch.Generator().manual_seed(3)
    scores = torch.rand(2, 2, 40, generator=generator)
    scores[:, 0] += 1.0
    cache.accumulated_attention.copy_(scores)
    budget = 14  # R = 14 - 4 protected = 10 per head: floor 2, pool 2 * 10 - 2 * 2 = 16
    method.compress(cache, 0, budget)
    per_head = torch.isfinite(cache.log_votes).sum(-1)
    assert per_head[:, 1].tolist() == [4 + 2, 4 + 2]  # the protected window and exactly its 20% floor
    assert per_head[:, 0].tolist() == [4 + 2 + 16, 4 + 2 + 16]  # everything else (within the 2 x 14 cap)
    for b in range(2):  # head 1 kept its own two best, not the globally best
        kept = kept_positions(cache, b, 1) - set(range(36, 40))
        assert kept == top_positions({pos: float(scores[b, 1, pos]) for pos in range(36)}, 2)


# ---- CriticalKV -----------------------------------------------------------------------------------------------
def test_value_output_norms_match_a_loop():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(2, 2, 5, 4, generator=generator)
    weight = torch.randn(6, 2 * 3 * 4, generator=generator)  # hidden 6, heads 6 (group 3), head_dim 4
    norms = value_output_norms(values, weight, group=3)
    for b in range(2):
        for k in range(2):
            for g in range(3):
                head = k * 3 + g
                for i in range(5):
                    expected = (weight[:, head * 4:(head + 1) * 4].double() @ values[b, k, i].double()).abs().sum()
                    assert float(norms[b, k, g, i]) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("stage1_fraction,kernel,silent", [(0.5, 3, False), (0.0, 3, False), (1.0, 3, False),
                                                           (0.5, 1, True)])
def test_criticalkv_two_stages(stage1_fraction, kernel, silent):
    window, tokens, budget, group, dim = 4, 24, 12, 2, 8
    method = make_method("criticalkv", window=window, kernel_size=kernel, stage1_fraction=stage1_fraction)
    cache, queries = filled_cache(method, batch=1, kv_heads=2, group=group, dim=dim, tokens=tokens, seed=11)
    if silent:  # all but 4 prefix entries get ~zero attention: stage 2 ranks them by epsilon * ||v W_O||_1 alone
        for h in range(2):
            away = -queries[0, h * group:(h + 1) * group, tokens - window:].sum(dim=(0, 1))
            cache.keys[0, h, 4:tokens - window] = 60 * away / away.norm()
    weight = torch.randn(16, 2 * group * dim, generator=torch.Generator().manual_seed(12))
    method.bind_output_projections([weight])
    reference = {h: entries(cache, 0, h) for h in range(2)}
    method.compress(cache, 0, budget)
    selectable = budget - window
    stage1_count = math.floor(stage1_fraction * selectable + 1e-4)
    for h, cache_entries in reference.items():
        pooled = snapkv_head_scores(cache_entries, queries[0], group, h, window, kernel, "maxpool", tokens)
        prefix = range(tokens - window)
        base = {pos: sum(pooled[g][pos] for g in range(group)) / group for pos in prefix}
        stage1 = top_positions(base, stage1_count)
        critical = {}
        for pos in prefix:
            value = cache_entries[pos][1]
            total = 0.0
            for g in range(group):
                head = h * group + g
                norm = float((weight[:, head * dim:(head + 1) * dim].double() @ value).abs().sum())
                total += (pooled[g][pos] + 1e-4) * norm / group
            critical[pos] = total
        stage2 = top_positions({p: s for p, s in critical.items() if p not in stage1}, selectable - stage1_count)
        assert kept_positions(cache, 0, h) == set(range(tokens - window, tokens)) | stage1 | stage2


def test_criticalkv_without_weights_says_how_to_bind_them():
    method = make_method("criticalkv", window=2)
    cache, _ = filled_cache(method, tokens=8)
    with pytest.raises(ValueError, match="bind_network"):
        method.compress(cache, 0, 4)


# ---- WeightedKV -----------------------------------------------------------------------------------------------
def set_average_attention(cache, averages):
    """Make slot ``i``'s average attention ``averages[i]`` (every row and head)."""
    queries = cache.attention_queries.clamp_min(1.0)
    cache.accumulated_attention.copy_(torch.tensor(averages, dtype=torch.float32) * queries)


def test_weightedkv_merges_the_value_into_the_next_entry_and_drops_the_key():
    method = make_method("weightedkv", sinks=2, window=2)
    cache, _ = filled_cache(method, batch=1, kv_heads=1, group=1, dim=4, tokens=8, seed=4)
    averages = [0.9, 0.8, 0.5, 0.3, 0.05, 0.2, 0.4, 0.6]  # position 4 is the lowest non-protected one
    set_average_attention(cache, averages)
    before = entries(cache, 0, 0)
    count5 = float(cache.attention_queries[0, 0, 5])
    method.compress(cache, 0, 7)
    after = entries(cache, 0, 0)
    assert set(after) == set(before) - {4}
    a_j, a_n = averages[4], averages[5]
    expected_value = (a_j * before[4][1] + a_n * before[5][1]) / (a_j + a_n)
    torch.testing.assert_close(after[5][1], expected_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after[5][0], before[5][0])  # the neighbour keeps its own key
    assert all(not torch.allclose(key, before[4][0]) for key, _, _ in after.values())  # the evicted key is gone
    for pos in (0, 1, 2, 3, 6, 7):
        torch.testing.assert_close(after[pos][1], before[pos][1])
    slot5 = int((cache.positions[0, 0] == 5).nonzero())
    merged_average = float(cache.accumulated_attention[0, 0, slot5]) / count5
    assert merged_average == pytest.approx((a_j * a_j + a_n * a_n) / (a_j + a_n), rel=1e-5)
    assert all(votes == 1.0 for _, _, votes in after.values())


def test_weightedkv_two_evicted_entries_merge_into_one_neighbour_with_convex_weights():
    method = make_method("weightedkv", sinks=1, window=2)
    cache, _ = filled_cache(method, batch=1, kv_heads=1, group=1, dim=4, tokens=8, seed=9)
    averages = [0.9, 0.7, 0.6, 0.1, 0.2, 0.5, 0.4, 0.6]  # positions 3 and 4 go, both into position 5
    set_average_attention(cache, averages)
    before = entries(cache, 0, 0)
    method.compress(cache, 0, 6)
    after = entries(cache, 0, 0)
    weights = {3: 0.1, 4: 0.2, 5: 0.5}
    expected = sum(w * before[p][1] for p, w in weights.items()) / sum(weights.values())
    torch.testing.assert_close(after[5][1], expected, rtol=1e-5, atol=1e-6)


def test_weightedkv_neighbour_is_the_next_kept_entry_or_the_previous_one():
    kept = torch.tensor([[[True, False, False, True, False, True, False, False]]])
    assert neighbour_slots(kept)[0, 0].tolist() == [3, 3, 3, 5, 5, 5, 5, 5]


# ---- CaM ------------------------------------------------------------------------------------------------------
def test_cam_spreads_the_evicted_value_over_the_next_32_values_when_the_draw_says_so():
    method = make_method("cam", sinks=4, window=2)  # merge_span 32
    # equal keys and votes: uniform attention, so a_e / mean(a_window) = 1 and every draw merges
    cache, _ = filled_cache(method, batch=1, kv_heads=2, group=2, dim=4, tokens=50, seed=1, equal_keys=True)
    before = {h: entries(cache, 0, h) for h in range(2)}
    method.compress(cache, 0, 49)  # StreamingLLM evicts position 4, the oldest non-sink token
    for h in range(2):
        after = entries(cache, 0, h)
        assert set(after) == set(before[h]) - {4}
        share = before[h][4][1] / 32
        for pos, (key, value, votes) in after.items():
            expected = before[h][pos][1] + share if 5 <= pos <= 36 else before[h][pos][1]
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(key, before[h][pos][0])  # keys untouched
            assert votes == 1.0


def test_cam_bernoulli_draws_are_seeded_per_token():
    probability = 0.3
    results = {}
    for seed in (0, 0, 1):
        method = make_method("cam", sinks=4, window=2, seed=seed)
        cache, _ = filled_cache(method, batch=4, kv_heads=8, group=1, dim=4, tokens=50, seed=2, equal_keys=True)
        slot4 = 4
        cache.log_votes[:, :, slot4] = math.log(probability)  # attention to it = 0.3 x the others' (equal keys)
        before = cache.values.clone()
        method.compress(cache, 0, 49)
        # position 5 (now slot 4) received v_4 / 32 exactly where the seeded draw was below p
        merged = ~torch.isclose(cache.values[:, :, 4], before[:, :, 5]).all(-1)
        draws = counter_uniform(seed, 0, torch.full((4, 8, 1), 4))[..., 0]
        assert torch.equal(merged, draws < probability)
        results.setdefault(seed, []).append(merged)
        assert 0.05 < merged.float().mean() < 0.6
    assert torch.equal(results[0][0], results[0][1])  # same seed, same draws
    assert not torch.equal(results[0][0], results[1][0])  # another seed, other draws


def test_cam_chains_evicted_entries_oldest_first():
    method = make_method("cam", sinks=4, window=2, merge_span=3)
    cache, _ = filled_cache(method, batch=1, kv_heads=1, group=1, dim=4, tokens=12, seed=3, equal_keys=True)
    before = {pos: e[1] for pos, e in entries(cache, 0, 0).items()}
    method.compress(cache, 0, 10)  # evicts positions 4 and 5
    expected = dict(before)
    for evicted in (4, 5):  # one step at a time, as the paper's per-step schedule would
        for pos in range(evicted + 1, evicted + 4):
            expected[pos] = expected[pos] + expected[evicted] / 3
    after = entries(cache, 0, 0)
    for pos in after:
        torch.testing.assert_close(after[pos][1], expected[pos], rtol=1e-5, atol=1e-6)


def test_counter_uniform_is_uniform_and_stable():
    positions = torch.arange(4096).view(1, 1, -1)
    draws = counter_uniform(0, 3, positions)
    assert draws.min() >= 0 and draws.max() < 1
    assert abs(float(draws.mean()) - 0.5) < 0.02
    histogram = torch.histc(draws, bins=8, min=0, max=1)
    assert (histogram > 4096 / 8 * 0.85).all()
    assert torch.equal(draws, counter_uniform(0, 3, positions))
    assert not torch.equal(draws, counter_uniform(0, 4, positions))


# ---- D2O ------------------------------------------------------------------------------------------------------
def d2o_reference(live, evicted, kept):
    """Max cosine similarity of each evicted entry to the kept ones and its best target (float64);
    ``live = {position: (key, value, votes)}`` before the compression."""
    result = {}
    for e in evicted:
        sims = {c: float(torch.nn.functional.cosine_similarity(live[e][0], live[c][0], dim=0)) for c in kept}
        best = max(sims, key=lambda c: (sims[c], -c))
        result[e] = (sims[best], best)
    return result


def test_d2o_threshold_ema_and_similarity_weighted_merge():
    method = make_method("d2o", sinks=1, window=1, layer_budgets="uniform")  # recent = floor(0.5 * 8) = 4
    cache, _ = filled_cache(method, batch=1, kv_heads=2, group=1, dim=4, tokens=12, capacity=16, seed=21)
    thresholds = {}
    generator = torch.Generator().manual_seed(22)
    for round_, budget in enumerate((8, 8)):
        # heavy hitters by construction: accumulated attention falls with position (older = heavier)
        live = torch.isfinite(cache.log_votes)
        cache.accumulated_attention.copy_(torch.where(live, 100.0 - cache.positions.float(), 0.0))
        before = {h: entries(cache, 0, h) for h in range(2)}
        method.compress(cache, 0, budget)
        for h in range(2):
            positions = sorted(before[h])
            recent = set(positions[-4:])
            heavy = set([p for p in positions if p not in recent][:budget - 4])
            kept, evicted = recent | heavy, [p for p in positions if p not in recent | heavy]
            assert kept_positions(cache, 0, h) == kept
            matches = d2o_reference(before[h], evicted, kept)
            mean_sim = sum(s for s, _ in matches.values()) / len(matches)
            tau = mean_sim if round_ == 0 else 0.5 * thresholds[h] + 0.5 * mean_sim
            thresholds[h] = tau
            assert float(method.thresholds[0][0, h]) == pytest.approx(tau, rel=1e-5)
            after = entries(cache, 0, h)
            for c in kept:
                merged_in = [(s, e) for e, (s, target) in matches.items() if target == c and s >= tau]
                total = math.e + sum(math.exp(s) for s, _ in merged_in)
                for field in (0, 1):
                    expected = (math.e * before[h][c][field] + sum(math.exp(s) * before[h][e][field]
                                                                   for s, e in merged_in)) / total
                    torch.testing.assert_close(after[c][field], expected, rtol=1e-4, atol=1e-5)
                assert after[c][2] == 1.0  # no vote bias
        for position in (12 + 2 * round_, 13 + 2 * round_):
            append_token(cache, generator, position)


def test_d2o_layer_budgets_from_variance():
    budgets = variance_layer_budgets(20, 5, torch.tensor([0.3, 0.1, 0.9, 0.5]))
    assert sum(budgets) == 80 and min(budgets) >= 5
    assert budgets[1] == max(budgets) and budgets[2] == min(budgets)  # flatter attention keeps more
    assert (budgets[1] - 5) <= math.e * (budgets[2] - 5) + 1
    assert variance_layer_budgets(20, 5, torch.tensor([0.2, 0.2])) == [20, 20]


# ---- KeepKV's selection options ---------------------------------------------------------------------------------
def keepkv_head_scores(cache, queries, kv_head, window, per_token, last_query_weight=0.0):
    """KeepKV's score of each position for one KV head (row 0): the mean over the last ``window`` queries and the
    group's query heads of the vote-weighted attention (causal), mixed with the newest query's mean over the group
    (``(1 - lambda) window + lambda newest``), divided by the votes when ``per_token``."""
    keyed = entries(cache, 0, kv_head)
    group = queries.shape[1] // cache.keys.shape[1]
    tokens = queries.shape[2]
    totals = dict.fromkeys(keyed, 0.0)
    for t in range(tokens - window, tokens):
        for g in range(group):
            visible = {pos: entry for pos, entry in keyed.items() if pos <= t}
            for pos, a in dense_attention(queries[0, kv_head * group + g, t], visible).items():
                totals[pos] += (1.0 - last_query_weight) * a / (window * group)
                if t == tokens - 1:
                    totals[pos] += last_query_weight * a / group
    if per_token:
        totals = {pos: total / keyed[pos][2] for pos, total in totals.items()}
    return totals


def max_pooled(scores: dict[int, float], protected: set[int], kernel: int) -> dict[int, float]:
    """Max over the positions within ``kernel // 2`` (protected ones count as 0; slots are positions here)."""
    plain = {pos: (0.0 if pos in protected else s) for pos, s in scores.items()}
    reach = kernel // 2
    return {pos: max(plain[p] for p in plain if abs(p - pos) <= reach) for pos in plain}


@pytest.mark.parametrize("selection", ["layer", "head", "blend", "floor"])
@pytest.mark.parametrize("normalization", ["per-token", "total"])
@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("last_query_weight", [0.0, 0.6])
def test_keepkv_selection_and_score_normalization(selection, normalization, kernel, last_query_weight):
    """No merging (``similarity_threshold=1``): the kept set is sinks + recent window + the top scores, ranked per
    KV head (``head``), by the mean over the layer's KV heads (``layer``: every head keeps the same positions) or
    by ``(1 - beta)`` times the head's own score plus ``beta`` times that mean (``blend``, ``beta = 0.3``), or
    (``floor``, share 0.5) the ``floor(0.5 * free)`` tokens of highest layer mean first, then the rest of the free
    budget by the head's own score; ``per-token`` divides an entry's attention by its votes (entries standing for
    several tokens lose rank); ``kernel_size`` max-pools each head's scores along the positions first;
    ``last_query_weight`` mixes in the newest query's attention. Attention only (``value_norm_power=0``; the value
    weighting has its own test)."""
    share = {"blend": 0.3, "floor": 0.5}.get(selection)
    method = make_method("keepkv", selection=selection, score_normalization=normalization, similarity_threshold=1.0,
                         sinks=2, window=6, kernel_size=kernel, last_query_weight=last_query_weight,
                         value_norm_power=0.0, **({"layer_share": share} if share is not None else {}))
    cache, queries = filled_cache(method, kv_heads=3, group=2, tokens=30, seed=4)
    votes = torch.randint(1, 6, cache.log_votes.shape, generator=torch.Generator().manual_seed(1)).float()
    cache.log_votes.copy_(torch.log(votes))  # as if earlier merges had happened
    scores = [keepkv_head_scores(cache, queries, h, 6, normalization == "per-token", last_query_weight)
              for h in range(3)]
    scores = [max_pooled(s, {0, 1, *range(24, 30)}, kernel) for s in scores]
    if selection == "layer":
        scores = [{pos: sum(s[pos] for s in scores) / 3 for pos in scores[0]}] * 3
    elif selection == "blend":
        mean = {pos: sum(s[pos] for s in scores) / 3 for pos in scores[0]}
        scores = [{pos: (1 - share) * s[pos] + share * mean[pos] for pos in s} for s in scores]
    budget = 14
    protected = {0, 1, *range(24, 30)}
    floor = set()
    if selection == "floor":
        mean = {pos: sum(s[pos] for s in scores) / 3 for pos in scores[0] if pos not in protected}
        floor = top_positions(mean, floor_count(share, budget - len(protected)))
        assert len(floor) == 3
    method.compress(cache, 0, budget)
    kept = [kept_positions(cache, 0, h) for h in range(3)]
    for h in range(3):
        candidates = {pos: s for pos, s in scores[h].items() if pos not in protected | floor}
        assert kept[h] == protected | floor | top_positions(candidates, budget - len(protected | floor)), h
    if selection == "layer":
        assert kept[0] == kept[1] == kept[2]


@pytest.mark.parametrize("selection", ["layer", "head"])
@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("power", [1.0, 0.5])
def test_keepkv_value_norm_power_weights_each_score_by_its_value(selection, kernel, power):
    """``value_norm_power = gamma``: each head's (pooled) score times ``||v_i||_1 ** gamma`` of that head's own
    value, then the layer mean; the kept set is the top of that product, and it differs from the unweighted one
    (the option is not idle). Values are scaled per position so that norms, not noise, decide."""
    kept = {}
    for gamma in (0.0, power):
        method = make_method("keepkv", selection=selection, similarity_threshold=1.0, sinks=2, window=6,
                             kernel_size=kernel, value_norm_power=gamma)
        cache, queries = filled_cache(method, kv_heads=3, group=2, tokens=30, seed=4)
        scale = torch.rand(1, 3, 30, 1, generator=torch.Generator().manual_seed(2)) * 4.0 + 0.01
        cache.values.mul_(scale)
        protected = {0, 1, *range(24, 30)}
        scores = [max_pooled(keepkv_head_scores(cache, queries, h, 6, False), protected, kernel) for h in range(3)]
        values = [entries(cache, 0, h) for h in range(3)]
        scores = [{pos: s * float(values[h][pos][1].abs().sum()) ** gamma for pos, s in scores[h].items()}
                  for h in range(3)]
        if selection == "layer":
            scores = [{pos: sum(s[pos] for s in scores) / 3 for pos in scores[0]}] * 3
        expected = torch.tensor([[[scores[h][pos] for pos in range(30)] for h in range(3)]], dtype=torch.float64)
        selectable = [pos for pos in range(30) if pos not in protected]  # protected slots score 0 after pooling
        computed = method.scores(cache, 0).double()
        torch.testing.assert_close(computed[..., selectable], expected[..., selectable], rtol=1e-5, atol=1e-7)
        budget = 14
        method.compress(cache, 0, budget)
        kept[gamma] = [kept_positions(cache, 0, h) for h in range(3)]
        for h in range(3):
            candidates = {pos: s for pos, s in scores[h].items() if pos not in protected}
            assert kept[gamma][h] == protected | top_positions(candidates, budget - len(protected)), (gamma, h)
    assert kept[0.0] != kept[power]


@pytest.mark.parametrize("weighting", ["value", "output"])
def test_keepkv_value_norm_power_scores_an_empty_slot_zero_whatever_its_stale_value(weighting):
    """A cache with free slots whose values hold NaN / inf (stale memory): every score stays finite, the empty
    slots score 0, and the kept set is the one of the same cache with zeros there (``||v||_1`` and CriticalKV's
    ``||v W_O||_1`` weighting alike)."""
    kept = []
    for stale in (0.0, float("nan"), float("inf")):
        method = make_method("keepkv", similarity_threshold=1.0, sinks=2, window=6, value_norm_power=1.0,
                             value_weighting=weighting)
        method.output_projections = [torch.randn(5, 3 * 2 * 8, generator=torch.Generator().manual_seed(3))]
        cache, _ = filled_cache(method, kv_heads=3, group=2, tokens=30, capacity=40, seed=4)
        cache.values[:, :, 30:] = stale
        scores = method.scores(cache, 0)
        assert torch.isfinite(scores).all() and (scores[..., 30:] == 0).all(), stale
        method.compress(cache, 0, 14)
        kept.append([kept_positions(cache, 0, h) for h in range(3)])
    assert kept[0] == kept[1] == kept[2]


@pytest.mark.parametrize("selection", ["layer", "head"])
@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("normalization", ["total", "per-token"])
@pytest.mark.parametrize("last_query_weight", [0.0, 0.6])
def test_keepkv_output_value_weighting_weights_each_query_heads_score_by_what_it_writes(
        selection, kernel, normalization, last_query_weight):
    """``value_weighting="output"``: query head ``g``'s window-mean attention (mixed with its newest query's by
    ``last_query_weight``, divided by the entry's votes with ``per-token``), max-pooled, times
    ``||v_i W_O^g||_1 ** gamma`` (its slice of the layer's ``o_proj``), then the mean over the group (and over the
    layer with ``selection="layer"``); the kept set is the top of that score, and it differs from the one weighted by
    ``||v_i||_1`` (the option is not idle). The output projection's columns are scaled per query head so that
    heads differ in what they write."""
    group, dim, hidden, gamma = 2, 8, 5, 1.0
    protected = {0, 1, *range(24, 30)}
    kept = {}
    for weighting in ("value", "output"):
        method = make_method("keepkv", selection=selection, similarity_threshold=1.0, sinks=2, window=6,
                             kernel_size=kernel, value_norm_power=gamma, value_weighting=weighting,
                             score_normalization=normalization, last_query_weight=last_query_weight)
        cache, queries = filled_cache(method, kv_heads=3, group=group, dim=dim, tokens=30, seed=4)
        votes = torch.randint(1, 6, cache.log_votes.shape, generator=torch.Generator().manual_seed(1)).float()
        cache.log_votes.copy_(torch.log(votes))  # as if earlier merges had happened
        generator = torch.Generator().manual_seed(3)
        head_scale = (torch.rand(3 * group, generator=generator) * 3.0 + 0.1).repeat_interleave(dim)
        o_proj = torch.randn(hidden, 3 * group * dim, generator=generator) * head_scale
        method.output_projections = [o_proj]
        scores = []
        for h in range(3):
            keyed = entries(cache, 0, h)
            per_query_head = []
            for g in range(group):
                head = h * group + g
                attention = dict.fromkeys(keyed, 0.0)
                for t in range(24, 30):
                    visible = {pos: entry for pos, entry in keyed.items() if pos <= t}
                    for pos, a in dense_attention(queries[0, head, t], visible).items():
                        attention[pos] += (1.0 - last_query_weight) * a / 6
                        if t == 29:
                            attention[pos] += last_query_weight * a
                if normalization == "per-token":
                    attention = {pos: a / keyed[pos][2] for pos, a in attention.items()}
                pooled = max_pooled(attention, protected, kernel)
                w_o = o_proj[:, head * dim:(head + 1) * dim].double()
                per_query_head.append({pos: s * float((keyed[pos][1] @ w_o.T).abs().sum()) ** gamma
                                       for pos, s in pooled.items()})
            scores.append({pos: sum(q[pos] for q in per_query_head) / group for pos in keyed})
        if selection == "layer":
            scores = [{pos: sum(s[pos] for s in scores) / 3 for pos in scores[0]}] * 3
        if weighting == "output":
            expected = torch.tensor([[[scores[h][pos] for pos in range(30)] for h in range(3)]], dtype=torch.float64)
            selectable = [pos for pos in range(30) if pos not in protected]
            computed = method.scores(cache, 0).double()
            torch.testing.assert_close(computed[..., selectable], expected[..., selectable], rtol=1e-5, atol=1e-7)
        budget = 14
        method.compress(cache, 0, budget)
        kept[weighting] = [kept_positions(cache, 0, h) for h in range(3)]
        if weighting == "output":
            for h in range(3):
                candidates = {pos: s for pos, s in scores[h].items() if pos not in protected}
                assert kept[weighting][h] == protected | top_positions(candidates, budget - len(protected)), h
    assert kept["value"] != kept["output"]


def test_keepkv_output_value_weighting_needs_the_layers_output_projection_and_a_known_name():
    """Without bound ``o_proj`` weights (or for a layer beyond them) the selection refuses, saying what to call;
    an unknown weighting is refused with the allowed names; with ``value_norm_power=0`` the weighting is idle
    (attention only) and it needs no weights. Either way the method compiles its whole compression (one graph
    for every layer: ``tests/perf/test_perf_mechanisms.py``)."""
    method = make_method("keepkv", similarity_threshold=1.0, sinks=2, window=6, value_weighting="output")
    assert method.compiles_whole_compression
    cache, _ = filled_cache(method, kv_heads=3, group=2, tokens=30, seed=4)
    with pytest.raises(KeepKVError, match="needs the model's o_proj weights: call CacheManager.bind_network"):
        method.compress(cache, 0, 14)
    method.output_projections = [torch.randn(5, 3 * 2 * 8)]
    with pytest.raises(KeepKVError, match="no o_proj weight bound for layer 1"):
        method.scores(cache, 1)
    with pytest.raises(KeepKVError, match="unknown value_weighting 'outputs'; allowed: value, output"):
        make_method("keepkv", value_weighting="outputs")
    idle = make_method("keepkv", similarity_threshold=1.0, sinks=2, window=6, value_weighting="output",
                       value_norm_power=0.0)
    plain = make_method("keepkv", similarity_threshold=1.0, sinks=2, window=6, value_norm_power=0.0)
    assert idle.compiles_whole_compression
    cache, _ = filled_cache(idle, kv_heads=3, group=2, tokens=30, seed=4)
    assert torch.equal(idle.scores(cache, 0), plain.scores(cache, 0))


@pytest.mark.parametrize("bad", [-0.5, 5.0, float("nan"), "one"])
def test_keepkv_value_norm_power_refuses_what_is_not_an_exponent_in_range(bad):
    """Out of range, not finite or not a number: refused, naming the option (the generic option check refuses the
    last two before the range check)."""
    with pytest.raises(KeepKVError, match="value_norm_power must"):
        make_method("keepkv", value_norm_power=bad)


@pytest.mark.parametrize("budget,rho", [(14, 0.5), (20, 0.5), (14, 0.95), (14, 1.0)])
def test_keepkv_recent_fraction_protects_the_newest_share_of_the_budget(budget, rho):
    """``recent_fraction = rho``: the newest ``floor(rho * budget)`` positions, at least the window and at most
    ``budget - sinks`` (so the sinks and the newest token always fit), are kept like the window, and the rest of
    the budget is the top of the scores the method would rank by anyway; ``rho = 0`` is the window alone, and a
    share larger than the window changes the kept set (the option is not idle)."""
    kept = {}
    for share in (0.0, rho):
        method = make_method("keepkv", similarity_threshold=1.0, sinks=2, window=6, kernel_size=1,
                             recent_fraction=share)
        cache, _ = filled_cache(method, kv_heads=3, group=2, tokens=40, seed=4)
        recent = max(6, min(math.floor(share * budget + 1e-9), budget - 2))
        protected = {0, 1, *range(40 - recent, 40)}
        assert method.recent_window(budget) == recent and method.recent_window(None) == 6
        scores = method.scores(cache, 0)  # layer selection: one ranking for every head
        candidates = {pos: float(scores[0, 0, pos]) for pos in range(40) if pos not in protected}
        method.compress(cache, 0, budget)
        kept[share] = [kept_positions(cache, 0, h) for h in range(3)]
        for h in range(3):
            assert 39 in kept[share][h] and len(kept[share][h]) == budget, (share, h)
            assert kept[share][h] == protected | top_positions(candidates, budget - len(protected)), (share, h)
    assert kept[0.0] != kept[rho]


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.compile)])
def test_keepkv_pooling_skips_the_recent_share_a_compression_protects(compiled):
    """With ``kernel_size > 1`` and ``recent_fraction > 0`` the max-pooling runs over the slots the compression
    leaves to the ranking: sinks, window and the recent share of its budget are zeroed before pooling, so no
    protected slot lends its score to an older neighbour. Reference: the unpooled per-head scores, protected slots
    zeroed, max over the ``kernel_size`` neighbourhood in Python; the kept set is the protected slots plus the top
    of that. The case is chosen so the window-only mask gives other pooled scores and another kept set (the test
    can fail), with a clear gap below the budget's cut (compiled rounding cannot flip the kept set)."""
    budget, kernel, half = 20, 7, 3
    options = dict(similarity_threshold=1.0, sinks=2, window=4, recent_fraction=0.5, selection="head",
                   value_norm_power=0.0)
    method = make_method("keepkv", kernel_size=kernel, **options)
    cache, _ = filled_cache(method, kv_heads=3, group=2, tokens=40, seed=2)
    raw = make_method("keepkv", kernel_size=1, **options).scores(cache, 0)
    recent = method.recent_window(budget)
    assert recent == 10 > options["window"]

    def pooled(protected_positions):
        return [{pos: max(0.0 if p in protected_positions else float(raw[0, h, p])
                          for p in range(max(pos - half, 0), min(pos + half + 1, 40)))
                 for pos in range(40) if pos not in protected_positions} for h in range(3)]

    protected = {0, 1, *range(40 - recent, 40)}
    expected = pooled(protected)
    window_only = pooled({0, 1, *range(40 - options["window"], 40)})
    assert any(expected[h][pos] != window_only[h][pos] for h in range(3) for pos in expected[h])
    selectable = budget - len(protected)
    old_kept = [top_positions({pos: window_only[h][pos] for pos in expected[h]}, selectable) for h in range(3)]
    assert any(top_positions(expected[h], selectable) != old_kept[h] for h in range(3))  # the old code kept these
    for h in range(3):  # a tie at the cut is one plateau of the pooling (copies of one score), else a clear gap
        ranked = sorted(expected[h].values(), reverse=True)
        below = [score for score in ranked[selectable:] if score != ranked[selectable - 1]]
        assert not below or ranked[selectable - 1] - max(below) > 1e-5, h
    live = torch.isfinite(cache.log_votes)
    ranking = method.keep_priority(cache, 0, budget, method.protected_mask(cache, budget), live)
    for h in range(3):
        for pos, score in expected[h].items():
            assert float(ranking[0, h, pos]) == pytest.approx(score, rel=1e-6, abs=1e-9), (h, pos)
    method.compress(cache, 0, budget, compiled=compiled)
    for h in range(3):
        assert kept_positions(cache, 0, h) == protected | top_positions(expected[h], budget - len(protected)), h


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "half"])
def test_keepkv_recent_fraction_refuses_a_share_outside_zero_to_one(bad):
    with pytest.raises(KeepKVError, match="recent_fraction must"):
        make_method("keepkv", recent_fraction=bad)


def test_keepkv_newest_query_scores_are_tovas():
    """With ``last_query_weight=1``, layer selection, no pooling (``kernel_size=1``) and attention-only scores
    (``value_norm_power=0``) KeepKV ranks by TOVA's score (the newest query's attention averaged over every query
    head of the layer), and a weight changes the kept set (the option is not idle)."""
    kept = {}
    for weight in (0.0, 1.0):
        method = make_method("keepkv", last_query_weight=weight, similarity_threshold=1.0, sinks=2, window=6,
                             kernel_size=1, value_norm_power=0.0)
        cache, _ = filled_cache(method, kv_heads=3, group=2, tokens=30, seed=4)
        if weight == 1.0:
            torch.testing.assert_close(method.scores(cache, 0), make_method("tova").scores(cache, 0))
        method.compress(cache, 0, 14)
        kept[weight] = [kept_positions(cache, 0, h) for h in range(3)]
    assert kept[0.0] != kept[1.0]
    with pytest.raises(KeepKVError, match="last_query_weight must lie in"):
        make_method("keepkv", last_query_weight=1.5)


def test_keepkv_layer_selection_differs_from_per_head_selection():
    """The selections are different rules on the same cache (else the option would be idle): ``layer``, ``head``
    and ``blend`` at ``beta = 0.5`` keep three different sets; ``blend`` at ``beta = 1`` keeps ``layer``'s set and
    at ``beta = 0`` ``head``'s (its scores are exactly theirs). ``floor`` at share 0.5 keeps a fourth set, at share
    1 ``layer``'s and at share 0 ``head``'s."""
    kept, scores = {}, {}
    for selection, share in (("layer", 0.5), ("head", 0.5), ("blend", 0.5), ("blend", 1.0), ("blend", 0.0),
                             ("floor", 0.5), ("floor", 1.0), ("floor", 0.0)):
        method = make_method("keepkv", selection=selection, layer_share=share, similarity_threshold=1.0, sinks=2,
                             window=6)
        cache, _ = filled_cache(method, kv_heads=3, group=2, tokens=30, seed=4)
        scores[selection, share] = method.scores(cache, 0)
        method.compress(cache, 0, 14)
        kept[selection, share] = [kept_positions(cache, 0, h) for h in range(3)]
    assert kept["layer", 0.5] != kept["head", 0.5]
    assert kept["blend", 0.5] not in (kept["layer", 0.5], kept["head", 0.5])
    torch.testing.assert_close(scores["blend", 1.0], scores["layer", 0.5], rtol=1e-6, atol=0.0)
    assert kept["blend", 1.0] == kept["layer", 0.5]
    assert torch.equal(scores["blend", 0.0], scores["head", 0.5]) and kept["blend", 0.0] == kept["head", 0.5]
    assert kept["floor", 0.5] not in (kept["layer", 0.5], kept["head", 0.5], kept["blend", 0.5])
    assert kept["floor", 1.0] == kept["layer", 0.5] and kept["floor", 0.0] == kept["head", 0.5]


def diverged_cache(stale_live_positions: bool):
    """A 3-KV-head cache (30 tokens, 36 slots) compressed per head to 20 entries, so its heads hold different
    tokens, then shuffled along the slots (no order of slots assumed). Its 16 empty slots keep stale positions, as
    padding slots do until packed: position 0 (a live sink), or with ``stale_live_positions`` the positions of live
    unprotected tokens of their own head."""
    splitter = make_method("keepkv", selection="head", similarity_threshold=1.0, sinks=2, window=6)
    cache, _ = filled_cache(splitter, kv_heads=3, group=2, tokens=30, capacity=36, seed=4)
    splitter.compress(cache, 0, 20)
    heads_positions = [set(cache.positions[0, h][cache.positions[0, h] >= 0].tolist()) for h in range(3)]
    assert len(set(map(frozenset, heads_positions))) > 1  # the heads hold different tokens now
    assert not torch.isfinite(cache.log_votes[:, :, 20:]).any()
    for h in range(3):
        live = [p for p in cache.positions[0, h, :20].tolist() if 2 <= p < 24] if stale_live_positions else [0]
        cache.positions[0, h, 20:] = torch.tensor([live[i % len(live)] for i in range(16)])
    shuffle = torch.randperm(36, generator=torch.Generator().manual_seed(5))
    for name in ("keys", "values", "log_votes", "positions"):
        getattr(cache, name).copy_(getattr(cache, name)[:, :, shuffle])
    return cache


def floor_count(share: float, free: int) -> int:
    """``floor(share * free)`` exactly (the share read as its decimal)."""
    return math.floor(Fraction(str(share)) * free)


@pytest.mark.parametrize("share", [0.3, 0.7])
def test_keepkv_blend_matches_heads_by_position_once_they_hold_different_tokens(share):
    """After a per-head compression slot ``i`` holds a different token in each KV head; ``selection="blend"``
    then mixes each head's own score of a token with the layer's mean score *of that token* (a head that no longer
    holds it counts 0), not with the mean of whatever the heads hold in slot ``i``. Checked against a dictionary
    reference keyed by position, on a cache whose heads were compressed apart (and whose slots are then shuffled,
    so no order of slots is assumed), whose empty slots hold position 0 as padding slots do (they count for
    nothing, and position 0's sink is still found)."""
    from keepkv.distributed.heads import head_mean, head_mean_by_position

    cache = diverged_cache(stale_live_positions=False)
    own = make_method("keepkv", selection="head", similarity_threshold=1.0, sinks=2, window=6).scores(cache, 0)
    blend = make_method("keepkv", selection="blend", layer_share=share, similarity_threshold=1.0, sinks=2,
                        window=6).scores(cache, 0)
    positions = cache.positions[0].masked_fill(~torch.isfinite(cache.log_votes[0]), -1).tolist()
    by_position = [{p: float(own[0, h, i]) for i, p in enumerate(positions[h]) if p >= 0} for h in range(3)]
    for h in range(3):
        for i, p in enumerate(positions[h]):
            layer = sum(heads.get(p, 0.0) for heads in by_position) / 3 if p >= 0 else 0.0
            assert float(blend[0, h, i]) == pytest.approx((1 - share) * float(own[0, h, i]) + share * layer,
                                                          rel=1e-5, abs=1e-9), (h, i, p)
    slot_mean = head_mean(own, cache, dim=1)  # what matching by slot would give: another number
    assert not torch.allclose(head_mean_by_position(own, cache), slot_mean.expand_as(own))


def test_keepkv_floor_keeps_the_layer_top_tokens_in_every_head_that_holds_them():
    """``selection="floor"`` on a cache whose heads were compressed apart (then shuffled, empty slots holding stale
    positions as padding slots do): each head keeps its protected entries, then its ``floor(share * free)``
    unprotected tokens of highest layer mean (the position-matched mean of the heads' own scores, a head that no
    longer holds a token counting 0), then the rest of its budget by its own score; checked against a dictionary
    reference keyed by position. A token every head still holds and the layer ranks first is kept in every head.
    The empty slots hold the positions of live unprotected tokens of their own head (as stale padding can): they
    must count for nothing."""
    cache = diverged_cache(stale_live_positions=True)
    budget, share = 14, 0.6
    floor = make_method("keepkv", selection="floor", layer_share=share, similarity_threshold=1.0, sinks=2, window=6)
    protected_mask = floor.protected_mask(cache, budget)
    own = make_method("keepkv", selection="head", similarity_threshold=1.0, sinks=2,
                      window=6).ranking_scores(cache, 0, protected_mask)
    positions = cache.positions[0].masked_fill(~torch.isfinite(cache.log_votes[0]), -1).tolist()
    protected = [{p for i, p in enumerate(positions[h]) if protected_mask[0, h, i]} for h in range(3)]
    by_position = [{p: float(own[0, h, i]) for i, p in enumerate(positions[h]) if p >= 0 and p not in protected[h]}
                   for h in range(3)]
    layer = {p: sum(heads.get(p, 0.0) for heads in by_position) / 3 for heads in by_position for p in heads}
    expected, own_only = [], []
    for h in range(3):
        free = budget - len(protected[h])
        floor_set = top_positions({p: layer[p] for p in by_position[h]}, floor_count(share, free))
        rest = {p: s for p, s in by_position[h].items() if p not in floor_set}
        expected.append(protected[h] | floor_set | top_positions(rest, free - len(floor_set)))
        own_only.append(protected[h] | top_positions(by_position[h], free))
    assert expected != own_only  # the floor changes what this cache keeps
    slot_mean = own.mean(dim=1)[0]  # what matching heads by slot would rank by: another floor on this cache
    by_slot = [protected[h] | top_positions({p: float(slot_mean[i]) for i, p in enumerate(positions[h])
                                             if p >= 0 and p not in protected[h]},
                                            floor_count(share, budget - len(protected[h])))
               for h in range(3)]
    assert any(not by_slot[h] <= expected[h] for h in range(3))
    floor.compress(cache, 0, budget)
    assert [kept_positions(cache, 0, h) for h in range(3)] == expected
    shared_top = max((p for p in layer if all(p in heads for heads in by_position)), key=layer.get)
    assert all(shared_top in kept_positions(cache, 0, h) for h in range(3))


@pytest.mark.parametrize("options, message", [
    (dict(selection="blend", layer_share=1.5), "layer_share must be a number in \\[0, 1\\]"),
    (dict(selection="blend", layer_share=-0.1), "layer_share must be a number in \\[0, 1\\]"),
    (dict(selection="blend", layer_share=float("nan")), "option layer_share must be a finite number"),
    (dict(selection="blend", layer_share="half"), "option layer_share must be a finite number"),
    (dict(selection="blend", layer_share=True), "option layer_share must be a finite number"),
    (dict(selection="floor", layer_share=1.01), "layer_share must be a number in \\[0, 1\\]"),
    (dict(selection="layer", layer_share=0.3), "layer_share is read only with selection='blend' or 'floor'"),
    (dict(selection="head", layer_share=0.3), "layer_share is read only with selection='blend' or 'floor'"),
    (dict(selection="mixed"), "unknown selection 'mixed'; allowed: layer, head, blend, floor"),
])
def test_keepkv_refuses_a_layer_share_it_would_not_read_or_outside_zero_to_one(options, message):
    with pytest.raises(KeepKVError, match=message):
        make_method("keepkv", **options)
