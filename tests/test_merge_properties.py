"""Property tests of the merge op (keepkv.ops.merge), KeepKV spec §2 and §5.

Claims (random shapes, votes, empty slots and many-to-one assignments):
- zip: the vote-weighted attention output for the reference query is unchanged by the merge
  (float64: relative 1e-10; float32: 1e-5), with one reference query per KV head.
- minnorm: every reference query's softmax denominator is unchanged (float64 1e-10), and with one query per
  KV head the output is unchanged too.
- convex and keep-key are not exact in general (explicit counterexample), but merging identical entries is exact
  for every query, for every variant.
- votes add (their sum over live slots is conserved), empty slots stay empty, untouched slots are untouched,
  and nothing non-finite reaches the cache in float32 / bfloat16 / float16, even with |q·k| up to 1e4 or a
  reference query orthogonal to the merged keys.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from keepkv.ops.merge import MERGE_VARIANTS, MergeStats, merge_into_kept, merge_into_kept_compiled


def vote_attention(queries, keys, values, log_votes):
    """``softmax(q·k/sqrt(d) + ln p) @ v`` for queries ``[B, H, R, D]`` (dense, in the inputs' dtype)."""
    logits = torch.einsum("bhrd,bhcd->bhrc", queries, keys) / math.sqrt(keys.shape[-1]) + log_votes[:, :, None]
    return torch.einsum("bhrc,bhcd->bhrd", torch.softmax(logits, dim=-1), values)


def log_denominator(queries, keys, log_votes):
    logits = torch.einsum("bhrd,bhcd->bhrc", queries, keys) / math.sqrt(keys.shape[-1]) + log_votes[:, :, None]
    return torch.logsumexp(logits, dim=-1)


@st.composite
def merge_cases(draw, dtype=torch.float64, group=None, identical=False):
    """A cache with random contents (some empty slots) and a random many-to-one merge assignment."""
    batch, heads = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    group = group or draw(st.sampled_from([1, 2, 3]))
    dim, capacity = draw(st.sampled_from([4, 8, 16])), draw(st.integers(6, 24))
    merges = draw(st.integers(1, capacity - 3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    keys = torch.randn(batch, heads, capacity, dim, generator=g, dtype=torch.float64)
    values = torch.randn(batch, heads, capacity, dim, generator=g, dtype=torch.float64)
    log_votes = torch.log(torch.randint(1, 6, (batch, heads, capacity), generator=g).double())
    queries = torch.randn(batch, heads, group, dim, generator=g, dtype=torch.float64)
    order = torch.stack([torch.randperm(capacity, generator=g) for _ in range(batch * heads)])
    order = order.view(batch, heads, capacity)
    evicted = order[..., :merges]
    kept = order[..., merges:]
    empty = order[..., -1:]  # one empty slot per head, never a target
    log_votes.scatter_(2, empty, -math.inf)
    targets = kept[..., :-1].gather(2, torch.randint(0, kept.shape[-1] - 1, (batch, heads, merges), generator=g))
    merge_mask = torch.rand(batch, heads, merges, generator=g) < 0.8
    if identical:
        merge_mask[:] = True
        index = targets[..., None].expand(-1, -1, -1, dim)
        keys.scatter_(2, evicted[..., None].expand(-1, -1, -1, dim), keys.gather(2, index))
        values.scatter_(2, evicted[..., None].expand(-1, -1, -1, dim), values.gather(2, index))
    cast = lambda t: t.to(dtype)  # noqa: E731
    return dict(keys=cast(keys), values=cast(values), log_votes=log_votes.to(dtype if dtype == torch.float64 else
                torch.float32), evicted_idx=evicted, target_idx=targets, merge_mask=merge_mask,
                queries=cast(queries))


def reference_log_scores(case):
    """The group-mean reference log-score of every slot: ``logsumexp_g(q_g·k/sqrt(d)) - ln G``."""
    logits = torch.einsum("bhrd,bhcd->bhrc", case["queries"].double(), case["keys"].double())
    logits = logits / math.sqrt(case["keys"].shape[-1])
    return torch.logsumexp(logits, dim=2) - math.log(logits.shape[2])


def apply_merge(case, variant, op=merge_into_kept):
    merged = {name: case[name].clone() for name in ("keys", "values", "log_votes")}
    stats = MergeStats()
    op(merged["keys"], merged["values"], merged["log_votes"], case["evicted_idx"], case["target_idx"],
       case["merge_mask"], reference_log_scores(case).to(case["log_votes"].dtype), case["queries"], variant,
       stats=stats)
    return merged, stats


def without_dropped(case):
    """The unmerged cache minus the entries the merge drops (merge_mask False): the exact-merge reference."""
    log_votes = case["log_votes"].clone()
    dropped = case["evicted_idx"].masked_fill(case["merge_mask"], -1)
    for b, h, m in (dropped >= 0).nonzero().tolist():
        log_votes[b, h, dropped[b, h, m]] = -math.inf
    return case["keys"], case["values"], log_votes


def relative_error(got, expected):
    return float((got - expected).norm() / expected.norm().clamp_min(1e-300))


@settings(max_examples=60, deadline=None)
@given(case=merge_cases(group=1))
@pytest.mark.parametrize("variant", ["zip", "minnorm"])
def test_single_step_losslessness_float64(case, variant):
    merged, _ = apply_merge(case, variant)
    keys, values, log_votes = without_dropped(case)
    before = vote_attention(case["queries"], keys, values, log_votes)
    after = vote_attention(case["queries"], merged["keys"], merged["values"], merged["log_votes"])
    assert relative_error(after, before) <= 1e-10


@settings(max_examples=40, deadline=None)
@given(case=merge_cases(dtype=torch.float32, group=1))
@pytest.mark.parametrize("variant", ["zip", "minnorm"])
def test_single_step_losslessness_float32(case, variant):
    merged, _ = apply_merge(case, variant)
    keys, values, log_votes = without_dropped(case)
    before = vote_attention(case["queries"].double(), keys.double(), values.double(), log_votes.double())
    after = vote_attention(case["queries"].double(), merged["keys"].double(), merged["values"].double(),
                           merged["log_votes"].double())
    assert relative_error(after, before) <= 1e-5


@settings(max_examples=60, deadline=None)
@given(case=merge_cases(group=3))
def test_minnorm_keeps_every_gqa_heads_denominator(case):
    merged, _ = apply_merge(case, "minnorm")
    _, _, log_votes = without_dropped(case)
    before = log_denominator(case["queries"], case["keys"], log_votes)
    after = log_denominator(case["queries"], merged["keys"], merged["log_votes"])
    torch.testing.assert_close(after, before, rtol=0, atol=1e-10)


def test_convex_and_keep_key_are_not_exact_in_general():
    """Counterexample: merge e = (k=[3, 0], v=[1, 0]) into c = (k=[0, 3], v=[0, 1]) for q = [1, 0]."""
    keys = torch.tensor([[[[3.0, 0.0], [0.0, 3.0], [1.0, 1.0]]]], dtype=torch.float64)
    values = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]]], dtype=torch.float64)
    case = dict(keys=keys, values=values, log_votes=torch.zeros(1, 1, 3, dtype=torch.float64),
                evicted_idx=torch.tensor([[[0]]]), target_idx=torch.tensor([[[1]]]),
                merge_mask=torch.tensor([[[True]]]), queries=torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64))
    before = vote_attention(case["queries"], keys, values, case["log_votes"])
    for variant in ("convex", "keep-key"):
        merged, _ = apply_merge(case, variant)
        after = vote_attention(case["queries"], merged["keys"], merged["values"], merged["log_votes"])
        assert relative_error(after, before) > 1e-2, variant
    merged, _ = apply_merge(case, "zip")
    after = vote_attention(case["queries"], merged["keys"], merged["values"], merged["log_votes"])
    assert relative_error(after, before) <= 1e-12


@settings(max_examples=40, deadline=None)
@given(case=merge_cases(identical=True), seed=st.integers(0, 1000))
@pytest.mark.parametrize("variant", MERGE_VARIANTS)
def test_merging_identical_entries_is_exact_for_every_query(case, seed, variant):
    merged, _ = apply_merge(case, variant)
    g = torch.Generator().manual_seed(seed)
    others = torch.randn(*case["queries"].shape[:2], 5, case["keys"].shape[-1], generator=g, dtype=torch.float64)
    before = vote_attention(others, case["keys"], case["values"], case["log_votes"])
    after = vote_attention(others, merged["keys"], merged["values"], merged["log_votes"])
    assert relative_error(after, before) <= 1e-9


@settings(max_examples=60, deadline=None)
@given(case=merge_cases(dtype=torch.float32), variant=st.sampled_from(MERGE_VARIANTS))
def test_votes_add_and_slots_are_accounted_for(case, variant):
    merged, stats = apply_merge(case, variant)
    _, _, expected_votes = without_dropped(case)
    total = lambda lv: torch.logsumexp(lv.double(), dim=-1)  # noqa: E731
    torch.testing.assert_close(total(merged["log_votes"]), total(expected_votes), rtol=0, atol=1e-5)
    assert not torch.isnan(merged["log_votes"]).any()
    evicted = torch.zeros_like(case["log_votes"], dtype=torch.bool).scatter(2, case["evicted_idx"], True)
    assert torch.isneginf(merged["log_votes"][evicted]).all()
    assert torch.isneginf(merged["log_votes"][torch.isneginf(case["log_votes"])]).all()
    merges_received = torch.zeros(evicted.shape, dtype=torch.int64)
    targets = merges_received.scatter_add(2, case["target_idx"], case["merge_mask"].long()) > 0
    untouched = ~evicted & ~targets
    assert torch.equal(merged["keys"][untouched], case["keys"][untouched])
    assert torch.equal(merged["values"][untouched], case["values"][untouched])
    assert int(stats.merged) == int(case["merge_mask"].sum())


@settings(max_examples=30, deadline=None)
@given(case=merge_cases(dtype=torch.float32), variant=st.sampled_from(MERGE_VARIANTS),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       magnitude=st.sampled_from([1.0, 100.0, 1e4]))
def test_nothing_non_finite_reaches_the_cache(case, variant, dtype, magnitude):
    """|q·k| up to 1e4 (queries scaled) in every cache dtype: keys, values finite; votes finite or -inf."""
    case = dict(case, keys=case["keys"].to(dtype), values=case["values"].to(dtype),
                queries=(case["queries"] * magnitude).to(dtype))
    merged, _ = apply_merge(case, variant)
    assert torch.isfinite(merged["keys"]).all() and torch.isfinite(merged["values"]).all()
    assert not torch.isnan(merged["log_votes"]).any() and not torch.isposinf(merged["log_votes"]).any()


@pytest.mark.parametrize("variant", ["zip", "minnorm"])
def test_orthogonal_reference_query_takes_the_guard(variant):
    """q ⟂ kbar: zip's scale is 0/0; the guard must fall back (and count it) without writing NaN."""
    keys = torch.tensor([[[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]]])
    values = torch.randn(1, 1, 3, 2)
    queries = torch.tensor([[[[0.0, 1.0]]]])
    log_votes = torch.zeros(1, 1, 3)
    stats = MergeStats()
    ref = torch.einsum("bhrd,bhcd->bhrc", queries, keys)[:, :, 0] / math.sqrt(2)  # all 0 for the merged pair
    merge_into_kept(keys, values, log_votes, torch.tensor([[[0]]]), torch.tensor([[[1]]]),
                    torch.tensor([[[True]]]), ref, queries if variant == "minnorm" else None, variant, stats=stats)
    assert torch.isfinite(keys).all() and torch.isfinite(values).all()
    if variant == "zip":
        assert int(stats.fallbacks) == 1
    assert float(log_votes[0, 0, 1].exp()) == pytest.approx(2.0)


def test_unknown_variant_and_missing_queries_are_refused():
    case = dict(keys=torch.zeros(1, 1, 3, 2), values=torch.zeros(1, 1, 3, 2), log_votes=torch.zeros(1, 1, 3))
    args = (torch.tensor([[[0]]]), torch.tensor([[[1]]]), torch.tensor([[[True]]]), torch.zeros(1, 1, 3))
    with pytest.raises(ValueError, match="allowed: zip, convex, keep-key, minnorm"):
        merge_into_kept(case["keys"], case["values"], case["log_votes"], *args, None, "average")
    with pytest.raises(ValueError, match="needs ref_queries"):
        merge_into_kept(case["keys"], case["values"], case["log_votes"], *args, None, "minnorm")


@pytest.mark.compile
@pytest.mark.parametrize("variant", ["zip", "minnorm"])
def test_compiled_merge_equals_eager(variant):
    """One fixed shape, compiled once per variant (fullgraph): same cache as the eager op."""
    g = torch.Generator().manual_seed(0)
    batch, heads, capacity, dim, merges = 1, 3, 64, 16, 24
    keys = torch.randn(batch, heads, capacity, dim, generator=g)
    values = torch.randn(batch, heads, capacity, dim, generator=g)
    log_votes = torch.zeros(batch, heads, capacity)
    evicted = torch.arange(merges).expand(batch, heads, merges).contiguous()
    targets = (merges + torch.randint(0, capacity - merges, (batch, heads, merges), generator=g))
    mask = torch.rand(batch, heads, merges, generator=g) < 0.9
    queries = torch.randn(batch, heads, 3, dim, generator=g)
    ref = torch.randn(batch, heads, capacity, generator=g)
    results = []
    for op in (merge_into_kept, merge_into_kept_compiled):
        buffers = [keys.clone(), values.clone(), log_votes.clone()]
        op(*buffers, evicted, targets, mask, ref, queries, variant)
        results.append(buffers)
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
