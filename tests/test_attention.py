"""FlexAttention with the vote ``score_mod`` equals the dense eager reference; votes act as logit biases."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from keepkv.ops.attention import generate_vote_score_mod, vote_attention, vote_attention_reference

SHAPES = dict(batch=2, kv_heads=3, group=3, q_len=5, capacity=37, head_dim=16)


def make_case(seed, dtype=torch.float32, batch=2, kv_heads=3, group=3, q_len=5, capacity=37, head_dim=16,
              window=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * group, q_len, head_dim, generator=g).to(dtype)
    keys = torch.randn(batch, kv_heads, capacity, head_dim, generator=g).to(dtype)
    values = torch.randn(batch, kv_heads, capacity, head_dim, generator=g).to(dtype)
    log_votes = torch.log(torch.randint(1, 5, (batch, kv_heads, capacity), generator=g).float())
    log_votes[torch.rand(batch, kv_heads, capacity, generator=g) < 0.2] = -math.inf  # empty slots
    kv_positions = torch.stack([torch.randperm(capacity, generator=g) for _ in range(batch * kv_heads)])
    kv_positions = kv_positions.view(batch, kv_heads, capacity).int()
    q_positions = (capacity - q_len + torch.arange(q_len)).expand(batch, q_len).int()
    return q, keys, values, log_votes, kv_positions, q_positions


def dense_loop(q, keys, values, log_votes, kv_positions, q_positions, window=None):
    """Per (batch, head, query) loop in float64: o = sum_i p_i e^{l_i} v_i / sum_i p_i e^{l_i} over visible i."""
    batch, heads, q_len, dim = q.shape
    group = heads // keys.shape[1]
    out = torch.zeros(batch, heads, q_len, dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for t in range(q_len):
                kh = h // group
                qp, kp = q_positions[b, t], kv_positions[b, kh]
                visible = (kp <= qp) & torch.isfinite(log_votes[b, kh])
                if window is not None:
                    visible &= qp - kp < window
                if not visible.any():
                    continue
                logits = keys[b, kh].double() @ q[b, h, t].double() / math.sqrt(dim) + log_votes[b, kh].double()
                weights = torch.softmax(logits[visible], dim=0)
                out[b, h, t] = weights @ values[b, kh][visible].double()
    return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), window=st.sampled_from([None, 1, 4, 16]))
def test_reference_equals_loop_definition(seed, window):
    case = make_case(seed)
    expected = dense_loop(*case, window=window)
    got = vote_attention_reference(*case, sliding_window=window)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_votes_equal_duplicated_entries():
    """An entry with p votes weighs exactly like p identical copies of it (KeepKV §3, electoral votes)."""
    q, keys, values, _, kv_positions, q_positions = make_case(1, capacity=6, q_len=1)
    kv_positions = torch.zeros_like(kv_positions)
    votes = torch.tensor([1, 3, 2, 1, 4, 1]).float()
    with_votes = vote_attention_reference(
        q, keys, values, votes.log().expand(2, 3, 6).contiguous(), kv_positions, q_positions
    )
    repeated = torch.repeat_interleave(torch.arange(6), votes.long())
    duplicated = vote_attention_reference(
        q, keys[:, :, repeated], values[:, :, repeated], torch.zeros(2, 3, len(repeated)),
        kv_positions[:, :, repeated], q_positions,
    )
    torch.testing.assert_close(with_votes, duplicated, rtol=1e-6, atol=1e-6)


def test_empty_rows_give_zeros_not_nan():
    q, keys, values, log_votes, kv_positions, q_positions = make_case(2)
    log_votes[0] = -math.inf
    for kernel in ("reference", "flex"):
        out = vote_attention(q, keys, values, log_votes, kv_positions, q_positions, kernel=kernel)
        assert torch.isfinite(out).all()
        assert out[0].abs().max() == 0


@pytest.mark.compile
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_flex_equals_reference(dtype, tol):
    """Compiled FlexAttention with the vote score_mod == dense reference (fp32 1e-5; bf16 2e-2; fp16 2e-3)."""
    for seed, window in [(3, None), (4, 7)]:
        case = make_case(seed, dtype=dtype)
        flex = vote_attention(*case, sliding_window=window, kernel="flex")
        reference = vote_attention_reference(*case, sliding_window=window)
        torch.testing.assert_close(flex.float(), reference.float(), rtol=tol, atol=tol)


def test_score_mod_is_a_named_closure_reading_captured_tensors():
    _, _, _, log_votes, kv_positions, q_positions = make_case(5)
    score_mod = generate_vote_score_mod(log_votes, kv_positions, q_positions, group_size=3, sliding_window=None)
    assert score_mod.__name__ == "vote_score_mod"
    b, h, q_idx, kv_idx = (torch.tensor(v) for v in (1, 4, 2, 9))
    expected = 0.5 + log_votes[1, 1, 9] if kv_positions[1, 1, 9] <= q_positions[1, 2] else -math.inf
    assert score_mod(torch.tensor(0.5), b, h, q_idx, kv_idx) == expected


def test_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="allowed: flex, reference"):
        vote_attention(*make_case(6), kernel="sdpa")
