"""Tests of the shared scoring kernels (keepkv.ops.scores) against direct float64 loop references.

- group reference log-score ``logsumexp_g(q_g·k/sqrt(d)) - ln G`` = ``ln mean_g exp(q_g·k/sqrt(d))`` (spec §6);
- cosine matching: argmax over valid kept keys, strict threshold, validity masks (spec §3);
- the score EMA in log space, step by step and in window form, with bias correction (spec §4);
- SnapKV's pooling along the cache (max / average, zero padding).
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keepkv.ops.scores import (
    cosine_best_match,
    cosine_match,
    ema_log_debias,
    ema_log_scores,
    ema_log_update,
    group_log_scores,
    head_logits,
    log_mean_exp,
    pool_along_slots,
)

seeds = st.integers(0, 2**31 - 1)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, batch=st.integers(1, 2), heads=st.integers(1, 3), group=st.sampled_from([1, 2, 3]),
       dim=st.sampled_from([4, 8, 16]), count=st.integers(1, 12), steps=st.sampled_from([None, 1, 3]))
def test_group_log_scores_is_the_log_of_the_mean_score(seed, batch, heads, group, dim, count, steps):
    g = generator(seed)
    shape = (batch, heads, group, dim) if steps is None else (batch, heads, group, steps, dim)
    queries = torch.randn(*shape, generator=g, dtype=torch.float64) * 2
    keys = torch.randn(batch, heads, count, dim, generator=g, dtype=torch.float64) * 2
    got = group_log_scores(queries, keys)
    logits = head_logits(queries, keys)
    assert got.shape == ((batch, heads, count) if steps is None else (batch, heads, steps, count))
    q = queries if steps is not None else queries[:, :, :, None]
    expected = torch.empty(batch, heads, q.shape[3], count, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for t in range(q.shape[3]):
                for i in range(count):
                    scores = [math.exp(float(q[b, h, j, t] @ keys[b, h, i]) / math.sqrt(dim)) for j in range(group)]
                    expected[b, h, t, i] = math.log(sum(scores) / group)
                    for j in range(group):
                        l_direct = float(q[b, h, j, t] @ keys[b, h, i]) / math.sqrt(dim)
                        l_got = logits[b, h, j, t, i] if steps is not None else logits[b, h, j, i]
                        assert abs(float(l_got) - l_direct) <= 1e-12 * (1 + abs(l_direct))
    expected = expected if steps is not None else expected[:, :, 0]
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_group_log_scores_of_one_query_is_its_logit_and_stays_finite_for_huge_logits():
    g = generator(0)
    q = torch.randn(1, 2, 1, 8, generator=g)
    k = torch.randn(1, 2, 5, 8, generator=g)
    torch.testing.assert_close(group_log_scores(q, k), (q @ k.transpose(-1, -2))[:, :, 0] / math.sqrt(8))
    huge = group_log_scores(torch.cat((q, -q), dim=2) * 1e4, k)  # |logits| ~ 1e4 in float32: logsumexp, no inf
    assert torch.isfinite(huge).all()
    logits = torch.tensor([[0.0, -math.inf], [-math.inf, -math.inf]])
    assert torch.equal(log_mean_exp(logits, dim=-1), torch.tensor([-math.log(2), -math.inf]))


def loop_cosine_match(evicted, kept, threshold, kept_valid, evicted_valid):
    batch, heads, count, _ = evicted.shape
    best = torch.zeros(batch, heads, count, dtype=torch.int64)
    similarity = torch.full((batch, heads, count), -math.inf, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for e in range(count):
                for c in range(kept.shape[2]):
                    if not kept_valid[b, h, c]:
                        continue
                    x, y = evicted[b, h, e], kept[b, h, c]
                    nx, ny = float(x.norm()), float(y.norm())
                    cos = float(x @ y) / (nx * ny) if nx > 0 and ny > 0 else 0.0
                    if cos > similarity[b, h, e]:  # strict: the first index wins ties
                        similarity[b, h, e], best[b, h, e] = cos, c
    merge = (similarity > threshold) & evicted_valid
    return best, similarity, merge


@settings(max_examples=40, deadline=None)
@given(seed=seeds, batch=st.integers(1, 2), heads=st.integers(1, 3), dim=st.sampled_from([4, 8, 16]),
       evicted_count=st.integers(1, 8), kept_count=st.integers(1, 8), threshold=st.sampled_from([-1.0, 0.0, 0.5, 0.8]))
def test_cosine_match_equals_a_loop_reference(seed, batch, heads, dim, evicted_count, kept_count, threshold):
    g = generator(seed)
    kept = torch.randn(batch, heads, kept_count, dim, generator=g, dtype=torch.float64)
    evicted = torch.randn(batch, heads, evicted_count, dim, generator=g, dtype=torch.float64)
    # some evicted keys are near-copies of kept ones (cosine ~ 1), one kept key is zero
    copy_from = torch.randint(0, kept_count, (batch, heads, evicted_count), generator=g)
    near = kept.gather(2, copy_from[..., None].expand(-1, -1, -1, dim)) * 1.5
    near = near + 0.05 * torch.randn(near.shape, generator=g, dtype=torch.float64)
    evicted = torch.where(torch.rand(batch, heads, evicted_count, 1, generator=g) < 0.5, near, evicted)
    kept[:, :, -1] = 0.0 if kept_count > 1 else kept[:, :, -1]
    kept_valid = torch.rand(batch, heads, kept_count, generator=g) < 0.8
    evicted_valid = torch.rand(batch, heads, evicted_count, generator=g) < 0.8
    best, similarity, merge = cosine_match(evicted, kept, threshold, kept_valid, evicted_valid)
    assert all(torch.equal(a, b) for a, b in zip(cosine_best_match(evicted, kept, kept_valid), (best, similarity)))
    ref_best, ref_similarity, ref_merge = loop_cosine_match(evicted, kept, threshold, kept_valid, evicted_valid)
    has_kept = kept_valid.any(-1, keepdim=True).expand_as(best)
    assert torch.equal(best[has_kept], ref_best[has_kept])
    assert torch.equal(best[~has_kept], torch.zeros_like(best[~has_kept]))
    torch.testing.assert_close(similarity, ref_similarity, rtol=0, atol=1e-12)
    assert torch.equal(merge, ref_merge)


def test_cosine_best_match_gives_the_masked_fill_form_bit_for_bit_and_ignores_whatever_invalid_keys_hold():
    """The mask is the matmul's additive input (one pass per kept key); the earlier form filled the similarity
    matrix after the matmul. Same bits at a merge-sized problem; an invalid kept key holding inf / NaN never wins
    and no NaN comes out; an empty evicted set gives empty results."""
    g = generator(11)
    kept = torch.randn(2, 3, 410, 64, generator=g)
    evicted = torch.randn(2, 3, 300, 64, generator=g)
    kept_valid = torch.rand(2, 3, 410, generator=g) < 0.9
    kept_valid[1, 2] = False  # a head without any valid kept key
    similarity = torch.matmul(torch.nn.functional.normalize(evicted, dim=-1),
                              torch.nn.functional.normalize(kept, dim=-1).transpose(-1, -2))
    old_similarity, old_best = similarity.masked_fill(~kept_valid[:, :, None, :], -math.inf).max(dim=-1)
    best, best_similarity = cosine_best_match(evicted, kept, kept_valid)
    assert torch.equal(best, old_best) and torch.equal(best_similarity, old_similarity)
    assert torch.isneginf(best_similarity[1, 2]).all() and (best[1, 2] == 0).all()
    poisoned = kept.clone()
    poisoned[~kept_valid] = math.nan
    poisoned[0, 0, ~kept_valid[0, 0]] = math.inf
    best, best_similarity = cosine_best_match(evicted, poisoned, kept_valid)
    assert torch.equal(best, old_best) and torch.equal(best_similarity, old_similarity)
    best, best_similarity = cosine_best_match(evicted[:, :, :0], kept, kept_valid)
    assert best.shape == (2, 3, 0) and best_similarity.shape == (2, 3, 0)


def test_cosine_match_threshold_is_strict_and_accepts_a_tensor():
    kept = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    evicted = torch.tensor([[[[2.0, 0.0], [1.0, 1.0]]]])
    best, _, merge = cosine_match(evicted, kept, torch.tensor(1.0))
    assert best.tolist() == [[[0, 0]]] and not merge.any()  # cos = 1 is not > 1; tie 0.707 -> first index
    _, _, merge = cosine_match(evicted, kept, 0.7)
    assert merge.tolist() == [[[True, True]]]


def test_a_threshold_of_one_merges_nothing_even_when_rounding_puts_the_cosine_above_one():
    """Parallel keys can have a float cosine a few ulps above 1; ``threshold=1`` (no merging) must still hold."""
    keys = torch.randn(1, 1, 1000, 64, generator=generator(3))
    _, similarity, merge = cosine_match(keys * 3.0, keys, 1.0)
    assert (similarity > 1.0).any(), "no rounding above 1 on this draw: the test would prove nothing"
    assert not merge.any()
    _, _, merge = cosine_match(keys * 3.0, keys, 0.999)
    assert merge.all()


def direct_ema(scores, visible, alpha):
    """float64 loop: S_t = a S_{t-1} + (1 - a) s_t over the visible steps, then S / (1 - a^m)."""
    steps, count = scores.shape
    out = torch.full((count,), -math.inf, dtype=torch.float64)
    for i in range(count):
        state, seen = 0.0, 0
        for t in range(steps):
            if visible[t, i]:
                state = alpha * state + (1 - alpha) * math.exp(float(scores[t, i]))
                seen += 1
        if seen:
            out[i] = math.log(state / (1 - alpha**seen))
    return out


@settings(max_examples=40, deadline=None)
@given(seed=seeds, steps=st.integers(1, 12), count=st.integers(1, 6), alpha=st.sampled_from([0.5, 0.9, 0.99]),
       spread=st.sampled_from([1.0, 5.0, 30.0]))
def test_ema_in_log_space_equals_a_direct_float64_ema(seed, steps, count, alpha, spread):
    g = generator(seed)
    log_scores = torch.randn(steps, count, generator=g, dtype=torch.float64) * spread
    start = torch.randint(0, steps + 1, (count,), generator=g)  # entry i exists from step start_i on (causal)
    visible = torch.arange(steps)[:, None] >= start[None, :]
    expected = direct_ema(log_scores, visible, alpha)

    state = torch.full((count,), -math.inf, dtype=torch.float64)
    updates = torch.zeros(count, dtype=torch.int64)
    for t in range(steps):
        state = ema_log_update(state, log_scores[t], alpha, visible[t])
        updates += visible[t].long()
    stepwise = ema_log_debias(state, updates, alpha)
    window = ema_log_scores(log_scores, alpha, visible)
    for got in (stepwise, window):
        assert torch.equal(torch.isneginf(got), torch.isneginf(expected))
        finite = torch.isfinite(expected)
        torch.testing.assert_close(got[finite], expected[finite], rtol=1e-12, atol=1e-12)


def test_debiased_ema_of_a_constant_score_is_that_score_and_unseen_is_minus_inf():
    log_scores = torch.full((7, 3), -2.5, dtype=torch.float64)
    torch.testing.assert_close(ema_log_scores(log_scores, 0.9), torch.full((3,), -2.5, dtype=torch.float64))
    state = ema_log_update(torch.full((2,), -math.inf), torch.tensor([1.0, 1.0]), 0.9, torch.tensor([True, False]))
    debiased = ema_log_debias(state, torch.tensor([1, 0]), 0.9)
    assert abs(float(debiased[0]) - 1.0) < 1e-6
    assert torch.isneginf(debiased[1])
    assert torch.isfinite(ema_log_scores(torch.full((4, 2), 1e4), 0.9)).all()  # log space: no overflow


@settings(max_examples=30, deadline=None)
@given(seed=seeds, length=st.integers(1, 20), kernel=st.sampled_from([1, 3, 5, 7]),
       pooling=st.sampled_from(["maxpool", "avgpool"]))
def test_pooling_along_slots_equals_a_loop_with_zero_padding(seed, length, kernel, pooling):
    scores = torch.rand(2, 3, length, generator=generator(seed))
    got = pool_along_slots(scores, kernel, pooling)
    padded = [[[0.0] * (kernel // 2) + row.tolist() + [0.0] * (kernel // 2) for row in head] for head in scores]
    for b in range(2):
        for h in range(3):
            for i in range(length):
                around = padded[b][h][i : i + kernel]
                expected = max(around) if pooling == "maxpool" else sum(around) / kernel
                assert abs(float(got[b, h, i]) - expected) < 1e-6
