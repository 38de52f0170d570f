"""Property tests of the merge op (keepkv.ops.merge), KeepKV spec §1, §2, §5, §6 (Tian et al., arXiv 2504.09936).

Random caches: batch 1-2, 1-3 KV heads, G = 1-3 query heads per KV head, head_dim 4/8/16, capacity 4-24, random
keys/values/votes, empty slots (also among the evicted ones), random many-to-one assignments onto live kept slots
and a random ``merge_mask``. Claims tested (float64 1e-10 / float32 1e-5 where exactness is claimed):

1. zip and minnorm with one reference query (G = 1): the attention output is unchanged. With G > 1: zip (queries as
   reference) keeps the group reference output ``softmax(ln sbar_i + ln p_i) @ V`` (``sbar`` = the group's mean
   score) and its denominator; minnorm keeps every head's softmax denominator and the group reference output; with
   identical queries every head's output. No single head's output is exact for G > 1 (counterexample found).
2. convex and keep-key are not exact in general (explicit counterexample and one found by Hypothesis).
3. Merging identical entries is exact for every query, every variant.
4. Votes add (sum conserved, dropped votes vanish), evicted slots empty, untouched slots bitwise unchanged, counters;
   repeating evicted slots as padding (``merge_mask`` False) changes nothing.
5. Nothing non-finite reaches the cache (float32 / bfloat16 / float16, |logits| up to 1e4); each guard fires,
   falls back and is counted under its reason.
6. The compiled op (fullgraph) equals the eager one and does not recompile for new data of the same shapes.
7. The dominance guard (``max_evicted_weight = m``): the evicted side of a capped group weighs exactly ``m`` in the
   merged value, uncapped groups are bitwise the unguarded merge, and minnorm still keeps every head's softmax
   denominator (float64 1e-10).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, find, given, settings
from hypothesis import strategies as st

from keepkv.ops.merge import (
    FALLBACK_REASONS,
    MERGE_VARIANTS,
    MergeStats,
    merge_into_kept,
    merge_into_kept_compiled,
)
from keepkv.ops.scores import group_log_scores

REFERENCES = ("scores", "queries")  # ref_log_scores given (group mean-score of the queries) / None (queries only)


# ----------------------------------------------------------------------------------------------- dense references
def attention(queries, keys, values, log_votes):
    """Per query row ``softmax_i(q·k_i/sqrt(d) + ln p_i) @ V`` in float64: ``[B, H, R, D]`` -> ``[B, H, R, D]``."""
    queries, keys, values, log_votes = (t.double() for t in (queries, keys, values, log_votes))
    logits = queries @ keys.transpose(-1, -2) / math.sqrt(keys.shape[-1]) + log_votes[:, :, None]
    return torch.softmax(logits, dim=-1) @ values


def log_denominators(queries, keys, log_votes):
    """``ln sum_i p_i exp(q·k_i/sqrt(d))`` per query row, float64 ``[B, H, R]``."""
    queries, keys, log_votes = (t.double() for t in (queries, keys, log_votes))
    logits = queries @ keys.transpose(-1, -2) / math.sqrt(keys.shape[-1]) + log_votes[:, :, None]
    return torch.logsumexp(logits, dim=-1)


def group_reference(queries, keys, values, log_votes):
    """The GQA group reference: output ``sum_i p_i sbar_i v_i / sum_i p_i sbar_i`` (``sbar_i = mean_g exp(l_gi)``)
    ``[B, H, D]`` and its log denominator ``[B, H]``, float64."""
    logits = group_log_scores(queries.double(), keys.double()) + log_votes.double()
    return torch.softmax(logits, dim=-1)[:, :, None] @ values.double(), torch.logsumexp(logits, dim=-1)


def test_dense_reference_matches_the_library_attention_reference():
    """The local dense reference uses the same conventions as keepkv.ops.attention (GQA folding, vote bias)."""
    from keepkv.ops.attention import vote_attention_reference

    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 2, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g)
    log_votes = torch.log(torch.randint(1, 4, (2, 2, 6), generator=g).float())
    log_votes[:, :, 2] = -math.inf
    queries = torch.randn(2, 2, 3, 8, generator=g)  # [B, H_kv, G, D]
    library = vote_attention_reference(queries.reshape(2, 6, 1, 8), keys, values, log_votes,
                                       torch.zeros(2, 2, 6, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long))
    torch.testing.assert_close(library.reshape(2, 2, 3, 8).double(), attention(queries, keys, values, log_votes))


def assert_rows_close(got, expected, tol):
    """Per output row: ``|got - expected| <= tol * max(|expected|, 1)`` (values are O(1))."""
    error = (got - expected).norm(dim=-1)
    scale = expected.norm(dim=-1).clamp_min(1.0)
    worst = float((error / scale).max())
    assert worst <= tol, f"relative error {worst:.3e} > {tol:.0e}"


# ---------------------------------------------------------------------------------------------------- random cases
@st.composite
def merge_cases(draw, dtype=torch.float64, groups=(1, 2, 3), identical=False, same_queries=False):
    """A cache with random contents and a random many-to-one merge assignment (see the module doc)."""
    batch, heads = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    group, dim = draw(st.sampled_from(groups)), draw(st.sampled_from([4, 8, 16]))
    capacity = draw(st.integers(4, 24))
    merges = draw(st.integers(1, capacity - 2))
    empty_kept = draw(st.booleans())
    live_kept = capacity - merges - int(empty_kept)
    spread = min(draw(st.sampled_from([1, 2, live_kept])), live_kept)  # 1 = everything into one target
    key_scale = draw(st.sampled_from([0.5, 1.0, 2.0]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    keys = torch.randn(batch, heads, capacity, dim, generator=g, dtype=torch.float64) * key_scale
    values = torch.randn(batch, heads, capacity, dim, generator=g, dtype=torch.float64)
    log_votes = torch.log(torch.randint(1, 6, (batch, heads, capacity), generator=g).double())
    queries = torch.randn(batch, heads, group, dim, generator=g, dtype=torch.float64)
    if same_queries:
        queries = queries[:, :, :1].expand(-1, -1, group, -1).clone()
    order = torch.stack([torch.randperm(capacity, generator=g) for _ in range(batch * heads)])
    order = order.view(batch, heads, capacity)
    evicted, kept = order[..., :merges], order[..., merges:]
    targets = kept.gather(2, torch.randint(0, spread, (batch, heads, merges), generator=g))
    merge_mask = torch.rand(batch, heads, merges, generator=g) < 0.8
    if identical:
        merge_mask[:] = True
        rows = targets[..., None].expand(-1, -1, -1, dim)
        keys.scatter_(2, evicted[..., None].expand(-1, -1, -1, dim), keys.gather(2, rows))
        values.scatter_(2, evicted[..., None].expand(-1, -1, -1, dim), values.gather(2, rows))
    empty = torch.zeros(batch, heads, capacity, dtype=torch.bool)
    empty.scatter_(2, evicted, torch.rand(batch, heads, merges, generator=g) < 0.1)  # merges nothing
    if empty_kept:
        empty.scatter_(2, kept[..., -1:], True)  # never a target
    log_votes = log_votes.masked_fill(empty, -math.inf)
    keys, values = keys.masked_fill(empty[..., None], 0.0), values.masked_fill(empty[..., None], 0.0)
    vote_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return {"keys": keys.to(dtype), "values": values.to(dtype), "log_votes": log_votes.to(vote_dtype),
            "evicted_idx": evicted, "target_idx": targets, "merge_mask": merge_mask, "queries": queries.to(dtype)}


def apply_merge(case, variant, reference="queries", op=merge_into_kept, **options):
    """Run the op on a copy of the case's cache; ``reference`` picks ``ref_log_scores`` given / ``None``."""
    merged = {name: case[name].clone() for name in ("keys", "values", "log_votes")}
    ref_log_scores = None
    if reference == "scores":
        ref_log_scores = group_log_scores(case["queries"], case["keys"]).to(case["log_votes"].dtype)
    stats = MergeStats()
    op(merged["keys"], merged["values"], merged["log_votes"], case["evicted_idx"], case["target_idx"],
       case["merge_mask"], ref_log_scores, case["queries"], variant, stats=stats, **options)
    return merged, stats


def without_dropped(case):
    """The unmerged cache minus the entries that are dropped (``merge_mask`` False): what an exact merge keeps."""
    log_votes = case["log_votes"].clone()
    evicted = case["evicted_idx"]
    kept_votes = torch.where(case["merge_mask"], log_votes.gather(2, evicted), -math.inf)
    return case["keys"], case["values"], log_votes.scatter(2, evicted, kept_votes.to(log_votes.dtype))


def minnorm_guard_fires(case, reference):
    """Whether some group's min-norm key is rejected (ill-conditioned queries): zip's fallback would then be the
    convex key, which is not exact. Rare (~1/600 groups at head_dim 4, G = 3)."""
    _, stats = apply_merge(case, "minnorm", reference)
    return int(stats.fallbacks.sum()) > 0


# ------------------------------------------------------------------------------------------------ 1. losslessness
def assert_single_query_merge_is_output_exact(case, reference, variant, tol):
    assume(not minnorm_guard_fires(case, reference))
    merged, _ = apply_merge(case, variant, reference)
    before = attention(case["queries"], *without_dropped(case))
    after = attention(case["queries"], merged["keys"], merged["values"], merged["log_votes"])
    assert_rows_close(after, before, tol)


@settings(max_examples=120, deadline=None)
@given(case=merge_cases(groups=(1,)), reference=st.sampled_from(REFERENCES))
@pytest.mark.parametrize("variant", ["zip", "minnorm"])
def test_single_query_merge_is_output_exact_float64(case, reference, variant):
    assert_single_query_merge_is_output_exact(case, reference, variant, 1e-10)


@settings(max_examples=90, deadline=None)
@given(case=merge_cases(dtype=torch.float32, groups=(1,)), reference=st.sampled_from(REFERENCES))
@pytest.mark.parametrize("variant", ["zip", "minnorm"])
def test_single_query_merge_is_output_exact_float32(case, reference, variant):
    assert_single_query_merge_is_output_exact(case, reference, variant, 1e-5)


@settings(max_examples=120, deadline=None)
@given(case=merge_cases(groups=(2, 3)))
def test_zip_with_gqa_is_exact_for_the_group_reference(case):
    """Queries as reference (``ref_log_scores=None``): lambda solves the group mean-score exactly (Newton)."""
    assume(not minnorm_guard_fires(case, "queries"))
    merged, _ = apply_merge(case, "zip", "queries")
    out_before, log_z_before = group_reference(case["queries"], *without_dropped(case))
    out_after, log_z_after = group_reference(case["queries"], merged["keys"], merged["values"], merged["log_votes"])
    assert_rows_close(out_after, out_before, 1e-10)
    torch.testing.assert_close(log_z_after, log_z_before, rtol=0, atol=1e-10)


@settings(max_examples=120, deadline=None)
@given(case=merge_cases(), reference=st.sampled_from(REFERENCES))
def test_minnorm_keeps_every_heads_denominator_and_the_group_reference(case, reference):
    merged, stats = apply_merge(case, "minnorm", reference)
    assume(int(stats.fallbacks.sum()) == 0)
    keys, values, log_votes = without_dropped(case)
    torch.testing.assert_close(log_denominators(case["queries"], merged["keys"], merged["log_votes"]),
                               log_denominators(case["queries"], keys, log_votes), rtol=0, atol=1e-10)
    out_before, _ = group_reference(case["queries"], keys, values, log_votes)
    out_after, _ = group_reference(case["queries"], merged["keys"], merged["values"], merged["log_votes"])
    assert_rows_close(out_after, out_before, 1e-10)


@settings(max_examples=90, deadline=None)
@given(case=merge_cases(groups=(2, 3), same_queries=True), reference=st.sampled_from(REFERENCES))
@pytest.mark.parametrize("variant", ["zip", "minnorm"])
def test_identical_gqa_queries_make_every_head_exact(case, reference, variant):
    assume(not minnorm_guard_fires(case, reference))
    merged, _ = apply_merge(case, variant, reference)
    before = attention(case["queries"], *without_dropped(case))
    after = attention(case["queries"], merged["keys"], merged["values"], merged["log_votes"])
    assert_rows_close(after, before, 1e-10)


def head_output_error(case, variant, reference="queries"):
    merged, _ = apply_merge(case, variant, reference)
    before = attention(case["queries"], *without_dropped(case))
    after = attention(case["queries"], merged["keys"], merged["values"], merged["log_votes"])
    return float(((after - before).norm(dim=-1) / before.norm(dim=-1).clamp_min(1.0)).max())


FIND = settings(max_examples=300, deadline=None, database=None)


@pytest.mark.parametrize("variant", ["zip", "minnorm"])
def test_gqa_heads_are_not_each_exact(variant):
    """With G > 1 distinct queries one shared merged value cannot reproduce every head's output (as documented)."""
    find(merge_cases(groups=(2,)), lambda case: head_output_error(case, variant) > 1e-3, settings=FIND)


# ---------------------------------------------------------------------------- 2. convex / keep-key are not exact
def test_convex_and_keep_key_are_not_exact_in_general():
    """Counterexample: merge e = (k=[3, 0], v=[1, 0]) into c = (k=[0, 3], v=[0, 1]) for q = [1, 0]."""
    keys = torch.tensor([[[[3.0, 0.0], [0.0, 3.0], [1.0, 1.0]]]], dtype=torch.float64)
    values = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]]], dtype=torch.float64)
    case = {"keys": keys, "values": values, "log_votes": torch.zeros(1, 1, 3, dtype=torch.float64),
            "evicted_idx": torch.tensor([[[0]]]), "target_idx": torch.tensor([[[1]]]),
            "merge_mask": torch.tensor([[[True]]]), "queries": torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)}
    for variant in ("convex", "keep-key"):
        assert head_output_error(case, variant) > 1e-2, variant
    for variant in ("zip", "minnorm"):
        assert head_output_error(case, variant) <= 1e-12, variant


@pytest.mark.parametrize("variant", ["convex", "keep-key"])
def test_hypothesis_finds_a_counterexample_for_convex_and_keep_key(variant):
    find(merge_cases(groups=(1,)), lambda case: head_output_error(case, variant, "scores") > 1e-3, settings=FIND)


# -------------------------------------------------------------------------------------- 3. identical entries
@settings(max_examples=60, deadline=None)
@given(case=merge_cases(identical=True), reference=st.sampled_from(REFERENCES), seed=st.integers(0, 10**6))
@pytest.mark.parametrize("variant", MERGE_VARIANTS)
def test_merging_identical_entries_is_exact_for_every_query(case, reference, seed, variant):
    merged, _ = apply_merge(case, variant, reference)
    g = torch.Generator().manual_seed(seed)
    others = torch.randn(*case["queries"].shape[:2], 5, case["keys"].shape[-1], generator=g, dtype=torch.float64)
    before = attention(others, case["keys"], case["values"], case["log_votes"])
    after = attention(others, merged["keys"], merged["values"], merged["log_votes"])
    assert_rows_close(after, before, 1e-10)


# ------------------------------------------------------------------------------------------ 4. votes and slots
@settings(max_examples=120, deadline=None)
@given(case=merge_cases(dtype=torch.float32), variant=st.sampled_from(MERGE_VARIANTS),
       reference=st.sampled_from(REFERENCES))
def test_votes_add_and_every_slot_is_accounted_for(case, variant, reference):
    merged, stats = apply_merge(case, variant, reference)
    log_votes, after = case["log_votes"], merged["log_votes"]
    batch, heads, capacity = log_votes.shape
    expected = log_votes.double().clone()
    touched = torch.zeros(batch, heads, capacity, dtype=torch.bool)
    merged_count = dropped_count = group_count = 0
    for b in range(batch):
        for h in range(heads):
            received = {}
            for e, t, m in zip(case["evicted_idx"][b, h].tolist(), case["target_idx"][b, h].tolist(),
                               case["merge_mask"][b, h].tolist()):
                live = bool(torch.isfinite(log_votes[b, h, e]))
                merged_count += int(m and live)
                dropped_count += int(live and not m)
                if m and live:
                    received.setdefault(t, [float(log_votes[b, h, t])]).append(float(log_votes[b, h, e]))
                expected[b, h, e] = -math.inf
                touched[b, h, e] = True
            group_count += len(received)
            for t, parts in received.items():
                expected[b, h, t] = torch.logsumexp(torch.tensor(parts, dtype=torch.float64), 0)
                touched[b, h, t] = True
    assert not torch.isnan(after).any() and not torch.isposinf(after).any()
    assert torch.equal(torch.isneginf(after), torch.isneginf(expected))  # empty slots: evicted + previously empty
    finite = torch.isfinite(expected)
    torch.testing.assert_close(after.double()[finite], expected[finite], rtol=1e-6, atol=1e-6)
    # votes add: the total is conserved, minus the dropped entries' votes
    torch.testing.assert_close(torch.logsumexp(after.double(), dim=-1),
                               torch.logsumexp(without_dropped(case)[2].double(), dim=-1), rtol=1e-6, atol=1e-6)
    evicted = torch.zeros_like(touched).scatter(2, case["evicted_idx"], True)
    assert (merged["keys"][evicted] == 0).all() and (merged["values"][evicted] == 0).all()
    for name in ("keys", "values", "log_votes"):
        assert torch.equal(merged[name][~touched], case[name][~touched]), name
    assert (int(stats.merged), int(stats.dropped), int(stats.groups)) == (merged_count, dropped_count, group_count)
    assert stats.fallbacks.shape == (len(FALLBACK_REASONS),) and int(stats.fallbacks.sum()) <= group_count


# ------------------------------------------------------------------------------------- 5. finiteness and guards
@settings(max_examples=120, deadline=None)
@given(case=merge_cases(dtype=torch.float64), variant=st.sampled_from(MERGE_VARIANTS),
       reference=st.sampled_from(REFERENCES), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       logit=st.sampled_from([1.0, 1e2, 1e4]), key_scale=st.sampled_from([1.0, 1e2, 3e4]))
def test_nothing_non_finite_reaches_the_cache(case, variant, reference, dtype, logit, key_scale):
    """Keys up to 6e4 (float16's range), queries scaled so that max |q·k|/sqrt(d) = ``logit``."""
    keys = case["keys"].clamp(-2, 2) * key_scale
    raw = (case["queries"] @ keys.transpose(-1, -2)).abs().amax(dim=(-1, -2), keepdim=True) / math.sqrt(keys.shape[-1])
    queries = case["queries"] * (logit / raw.clamp_min(1e-6))
    case = {**case, "keys": keys.to(dtype), "values": case["values"].to(dtype), "queries": queries.to(dtype),
            "log_votes": case["log_votes"].float()}
    merged, stats = apply_merge(case, variant, reference)
    assert torch.isfinite(merged["keys"]).all() and torch.isfinite(merged["values"]).all()
    after = merged["log_votes"]
    assert not torch.isnan(after).any() and not torch.isposinf(after).any()
    evicted = torch.zeros_like(after, dtype=torch.bool).scatter(2, case["evicted_idx"], True)
    assert torch.equal(torch.isneginf(after), evicted | torch.isneginf(case["log_votes"]))
    assert int(stats.fallbacks.sum()) <= int(stats.groups)


def one_merge(keys, values, queries, log_votes=None, dtype=torch.float32):
    """Slot 0 merges into slot 1 (slot 2, if any, is an untouched bystander)."""
    keys, values, queries = (torch.tensor(t, dtype=dtype)[None, None] for t in (keys, values, queries))
    log_votes = torch.zeros(keys.shape[:3]) if log_votes is None else torch.tensor(log_votes)[None, None]
    return {"keys": keys, "values": values, "log_votes": log_votes, "evicted_idx": torch.tensor([[[0]]]),
            "target_idx": torch.tensor([[[1]]]), "merge_mask": torch.tensor([[[True]]]), "queries": queries}


def convex_key(case, reference="queries"):
    merged, _ = apply_merge(case, "convex", reference)
    return merged["keys"][0, 0, 1]


@pytest.mark.parametrize("reference", REFERENCES)
@pytest.mark.parametrize("zip_fallback", ["minnorm", "convex"])
def test_orthogonal_reference_takes_the_zero_denominator_guard(reference, zip_fallback):
    """q ⟂ both keys: zip's scale is 0/0; counted, convex key (= the min-norm key here), votes add, no NaN."""
    case = one_merge([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], [[0.0, 1.0]])
    merged, stats = apply_merge(case, "zip", reference, zip_fallback=zip_fallback)
    assert stats.fallbacks.tolist() == [1, 0, 0, 0] and int(stats.groups) == 1
    assert torch.isfinite(merged["keys"]).all() and torch.isfinite(merged["values"]).all()
    torch.testing.assert_close(merged["keys"][0, 0, 1], convex_key(case, reference))
    assert float(merged["log_votes"][0, 0, 1].exp()) == pytest.approx(2.0)


def test_mixed_sign_scores_take_the_bad_scale_guard():
    """Reference log-scores 0.5 and -5 (given): ln(W/P) < 0 < sum_i pi_i ln s_i, so lambda < 0; convex key, counted."""
    case = one_merge([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0]])
    merged = {name: case[name].clone() for name in ("keys", "values", "log_votes")}
    stats = MergeStats()
    scores = torch.tensor([[[0.5, -5.0]]])
    merge_into_kept(merged["keys"], merged["values"], merged["log_votes"], case["evicted_idx"], case["target_idx"],
                    case["merge_mask"], scores, None, "zip", stats=stats)
    assert stats.fallbacks.tolist() == [0, 1, 0, 0]
    pi = torch.softmax(scores[0, 0], 0)
    torch.testing.assert_close(merged["keys"][0, 0, 1], pi[0] * case["keys"][0, 0, 0] + pi[1] * case["keys"][0, 0, 1])


def test_nearly_dependent_queries_take_the_bad_correction_guard():
    """Two almost antiparallel queries: their logit targets are inconsistent (t_1 + t_2 > 0 for q_2 ~ -q_1 by
    convexity), so the least-norm key would be huge; kbar instead."""
    case = one_merge([[2.0, 0.5], [-1.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [-1.0, 1e-6]],
                     dtype=torch.float64)
    case["log_votes"] = case["log_votes"].double()
    merged, stats = apply_merge(case, "minnorm")
    assert stats.fallbacks.tolist() == [0, 0, 1, 0]
    torch.testing.assert_close(merged["keys"][0, 0, 1], convex_key(case))


def test_float16_overflow_takes_the_non_finite_key_guard():
    """Keys near float16's maximum and negative log-scores give lambda > 1: the key overflows; kbar instead."""
    case = one_merge([[6.0e4, 0.0], [6.0e4, 0.0]], [[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0]], dtype=torch.float16)
    merged = {name: case[name].clone() for name in ("keys", "values", "log_votes")}
    stats = MergeStats()
    merge_into_kept(merged["keys"], merged["values"], merged["log_votes"], case["evicted_idx"], case["target_idx"],
                    case["merge_mask"], torch.tensor([[[-1.0, -3.0]]]), None, "zip", stats=stats)
    assert stats.fallbacks.tolist() == [0, 0, 0, 1]
    assert torch.isfinite(merged["keys"]).all() and float(merged["keys"][0, 0, 1, 0]) == 6.0e4


def test_garbage_in_empty_slots_never_leaks():
    """NaN keys/values in an empty target or evicted slot are never read into a merged entry."""
    g = torch.Generator().manual_seed(1)
    keys, values = torch.randn(1, 1, 5, 4, generator=g), torch.randn(1, 1, 5, 4, generator=g)
    log_votes = torch.zeros(1, 1, 5)
    for slot in (0, 4):  # evicted-but-empty slot 0; empty bystander slot 4
        keys[0, 0, slot], values[0, 0, slot], log_votes[0, 0, slot] = math.nan, math.nan, -math.inf
    queries = torch.randn(1, 1, 2, 4, generator=g)
    for variant in MERGE_VARIANTS:
        k, v, lv = keys.clone(), values.clone(), log_votes.clone()
        merge_into_kept(k, v, lv, torch.tensor([[[0, 1]]]), torch.tensor([[[2, 2]]]), torch.tensor([[[True, True]]]),
                        None, queries, variant)
        assert torch.isfinite(k[0, 0, :4]).all() and torch.isfinite(v[0, 0, :4]).all(), variant
        assert float(lv[0, 0, 2].exp()) == pytest.approx(2.0)


@settings(max_examples=60, deadline=None)
@given(case=merge_cases(), variant=st.sampled_from(MERGE_VARIANTS), extra=st.integers(1, 6), seed=st.integers(0, 99))
def test_repeated_evicted_slots_as_padding_change_nothing(case, variant, extra, seed):
    """Padding M with repeats of listed slots (``merge_mask`` False) gives the same cache and the same counters."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, case["evicted_idx"].shape[-1], (*case["evicted_idx"].shape[:2], extra), generator=g)
    padded = {**case, "evicted_idx": torch.cat((case["evicted_idx"], case["evicted_idx"].gather(2, pick)), -1),
              "target_idx": torch.cat((case["target_idx"], case["target_idx"].gather(2, pick)), -1),
              "merge_mask": torch.cat((case["merge_mask"], torch.zeros_like(pick, dtype=torch.bool)), -1)}
    expected, expected_stats = apply_merge(case, variant)
    got, got_stats = apply_merge(padded, variant)
    for name in ("keys", "values", "log_votes"):
        torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=1e-12)
    assert got_stats.as_dict() == expected_stats.as_dict()


def test_arguments_are_checked():
    case = one_merge([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0]])
    args = (case["keys"], case["values"], case["log_votes"], case["evicted_idx"], case["target_idx"],
            case["merge_mask"])
    with pytest.raises(ValueError, match="allowed: zip, convex, keep-key, minnorm"):
        merge_into_kept(*args, None, case["queries"], "average")
    with pytest.raises(ValueError, match="needs ref_queries"):
        merge_into_kept(*args, torch.zeros(1, 1, 2), None, "minnorm")
    with pytest.raises(ValueError, match="ref_log_scores"):
        merge_into_kept(*args, None, None, "zip")
    with pytest.raises(ValueError, match="zip fallback"):
        merge_into_kept(*args, None, case["queries"], "zip", zip_fallback="evict")
    empty = torch.zeros(1, 1, 0, dtype=torch.long)
    merge_into_kept(*args[:3], empty, empty, empty.bool(), None, case["queries"], "zip")  # M = 0: nothing to do
    assert torch.equal(args[2], torch.zeros(1, 1, 2))


# --------------------------------------------------------------------------------------------- 6. compiled
def fixed_case(seed, dtype=torch.float32):
    """Fixed shapes (B=2, H=3, C=48, D=16, M=20, G=3), random contents: many-to-one, drops, empty slots."""
    g = torch.Generator().manual_seed(seed)
    batch, heads, capacity, dim, merges, group = 2, 3, 48, 16, 20, 3
    order = torch.stack([torch.randperm(capacity, generator=g) for _ in range(batch * heads)]).view(batch, heads, -1)
    log_votes = torch.log(torch.randint(1, 5, (batch, heads, capacity), generator=g).float())
    log_votes.scatter_(2, order[..., -2:], -math.inf)
    targets = order[..., merges:merges + 8].gather(2, torch.randint(0, 8, (batch, heads, merges), generator=g))
    return {"keys": torch.randn(batch, heads, capacity, dim, generator=g).to(dtype),
            "values": torch.randn(batch, heads, capacity, dim, generator=g).to(dtype), "log_votes": log_votes,
            "evicted_idx": order[..., :merges].contiguous(), "target_idx": targets,
            "merge_mask": torch.rand(batch, heads, merges, generator=g) < 0.85,
            "queries": torch.randn(batch, heads, group, dim, generator=g).to(dtype)}


COMPILED_MERGE_CASES = [
    ("zip", "scores", {}), ("minnorm", "queries", {}), ("minnorm", "queries", {"max_evicted_weight": 0.5}),
    pytest.param("zip", "queries", {}, marks=pytest.mark.slow),
    pytest.param("keep-key", "scores", {}, marks=pytest.mark.slow),
]


@pytest.mark.compile
@pytest.mark.parametrize("variant,reference,options", COMPILED_MERGE_CASES)
def test_compiled_merge_equals_eager_and_does_not_recompile(variant, reference, options):
    """fullgraph=True (no graph break) per variant / reference; a second call with new data of the same shapes
    must reuse the graph. Dynamo's cache is reset afterwards so these graphs do not count against the recompile
    limit of other tests that use :data:`merge_into_kept_compiled`. (The default run compiles the paper's rule,
    the default minnorm and the guard; the other two variants run with ``-m slow``.)"""
    try:
        for seed in (0, 1):
            case = fixed_case(seed)
            with torch._dynamo.config.patch(error_on_recompile=seed > 0):
                compiled, compiled_stats = apply_merge(case, variant, reference, op=merge_into_kept_compiled,
                                                       **options)
            eager, eager_stats = apply_merge(case, variant, reference, **options)
            for name in ("keys", "values"):
                torch.testing.assert_close(compiled[name], eager[name], rtol=1e-5, atol=1e-5)
            assert torch.equal(torch.isneginf(compiled["log_votes"]), torch.isneginf(eager["log_votes"]))
            torch.testing.assert_close(compiled["log_votes"], eager["log_votes"], rtol=1e-6, atol=1e-6)
            assert compiled_stats.as_dict() == eager_stats.as_dict(), (variant, reference)
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------------------------------- 7. dominance guard
def one_pair_case(evicted_logit_boost: float):
    """One KV head, one query: slot 0 (kept target) and slot 1 (evicted, merged into 0), slot 2 untouched. The
    evicted key is the target's plus a push along the query, so the evicted entry dominates the reference mass."""
    g = torch.Generator().manual_seed(3)
    dim = 8
    query = torch.randn(1, 1, 1, dim, generator=g, dtype=torch.float64)
    keys = torch.randn(1, 1, 3, dim, generator=g, dtype=torch.float64)
    keys[0, 0, 1] = keys[0, 0, 0] + evicted_logit_boost * math.sqrt(dim) * query[0, 0, 0] / query.norm() ** 2
    values = torch.randn(1, 1, 3, dim, generator=g, dtype=torch.float64)
    return {"keys": keys, "values": values, "log_votes": torch.zeros(1, 1, 3, dtype=torch.float64),
            "evicted_idx": torch.tensor([[[1]]]), "target_idx": torch.tensor([[[0]]]),
            "merge_mask": torch.tensor([[[True]]]), "queries": query}


@pytest.mark.parametrize("variant", MERGE_VARIANTS)
def test_dominance_guard_caps_the_evicted_weight_of_the_value(variant):
    case = one_pair_case(evicted_logit_boost=4.0)  # pi_e = e^4 / (1 + e^4) = 0.982
    free, free_stats = apply_merge(case, variant)
    guarded, guarded_stats = apply_merge(case, variant, max_evicted_weight=0.5)
    v_kept, v_evicted = case["values"][0, 0, 0], case["values"][0, 0, 1]
    pi_e = math.exp(4.0) / (1 + math.exp(4.0))
    torch.testing.assert_close(free["values"][0, 0, 0], (1 - pi_e) * v_kept + pi_e * v_evicted, rtol=0, atol=1e-12)
    torch.testing.assert_close(guarded["values"][0, 0, 0], 0.5 * v_kept + 0.5 * v_evicted, rtol=0, atol=1e-12)
    assert (int(free_stats.capped), int(guarded_stats.capped)) == (0, 1)
    assert float(guarded["log_votes"][0, 0, 0]) == pytest.approx(math.log(2))  # votes still add
    assert torch.equal(guarded["keys"][0, 0, 2], case["keys"][0, 0, 2])


@settings(max_examples=80, deadline=None)
@given(case=merge_cases(), reference=st.sampled_from(REFERENCES), bound=st.sampled_from([0.2, 0.5, 0.9]))
def test_guarded_minnorm_keeps_every_heads_denominator(case, reference, bound):
    merged, stats = apply_merge(case, "minnorm", reference, max_evicted_weight=bound)
    assume(int(stats.fallbacks.sum()) == 0)
    keys, _, log_votes = without_dropped(case)
    torch.testing.assert_close(log_denominators(case["queries"], merged["keys"], merged["log_votes"]),
                               log_denominators(case["queries"], keys, log_votes), rtol=0, atol=1e-10)


@settings(max_examples=60, deadline=None)
@given(case=merge_cases(), variant=st.sampled_from(MERGE_VARIANTS), reference=st.sampled_from(REFERENCES))
def test_guard_that_caps_nothing_changes_nothing(case, variant, reference):
    """``m = 1`` is the unguarded op, bitwise; and no group is counted as capped."""
    free, _ = apply_merge(case, variant, reference)
    same, stats = apply_merge(case, variant, reference, max_evicted_weight=1.0)
    for name in ("keys", "values", "log_votes"):
        assert torch.equal(free[name], same[name])
    assert int(stats.capped) == 0


def test_guard_bound_is_checked():
    case = one_pair_case(1.0)
    for bound in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="max_evicted_weight"):
            apply_merge(case, "minnorm", max_evicted_weight=bound)
