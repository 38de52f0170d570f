"""FlexAttention with the vote ``score_mod`` equals the dense eager reference; votes act as logit biases."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from keepkv.ops.attention import vote_attention, vote_attention_flex, vote_attention_reference, votes_as_key_columns
from keepkv.ops.flex_mods import generate_visibility_mask_mod, generate_vote_score_mod, vote_block_mask

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


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_empty_rows_give_zeros_not_nan(dtype, tol):
    """A batch row without entries gives zeros (not NaN) in both kernels; the other row's flex output, on the
    default tile size (one partial tile over a random slot order), equals the reference."""
    q, keys, values, log_votes, kv_positions, q_positions = make_case(2, dtype=dtype)
    log_votes[0] = -math.inf
    outputs = {}
    for kernel in ("reference", "flex"):
        out = outputs[kernel] = vote_attention(q, keys, values, log_votes, kv_positions, q_positions, kernel=kernel)
        assert torch.isfinite(out).all()
        assert out[0].abs().max() == 0
    torch.testing.assert_close(outputs["flex"].float(), outputs["reference"].float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [16, 64, 80])
def test_vote_columns_add_sqrt_d_ln_p_to_every_dot_product(dtype, head_dim):
    """``q'·k' = q·k + sqrt(d) ln p`` (float32 accumulation) to 2^-14 of ``sqrt(d) |ln p|`` though the columns
    are 16-bit; an empty slot's product is ``-inf``, never NaN; the width is a multiple of 16."""
    q, keys, _, log_votes, _, _ = make_case(1, dtype=dtype, head_dim=head_dim)
    log_votes = log_votes * 7.3  # votes far from powers of two: ln p is not exact in 16 bits
    q_votes, keys_votes = votes_as_key_columns(q, keys, log_votes)
    assert q_votes.shape[-1] % 16 == 0 and q_votes.shape[-1] >= head_dim + 2 and q_votes.dtype == dtype
    group = q.shape[1] // keys.shape[1]
    folded = q_votes.float() @ keys_votes.float().repeat_interleave(group, 1).transpose(-1, -2)
    plain = q.float() @ keys.float().repeat_interleave(group, 1).transpose(-1, -2)
    expected = math.sqrt(head_dim) * log_votes.repeat_interleave(group, 1)[:, :, None, :]
    finite = torch.isfinite(expected).expand_as(folded)
    assert not folded.isnan().any() and (folded[~finite] == -math.inf).all()
    extra = (folded - plain)[finite]
    torch.testing.assert_close(extra, expected.expand_as(folded)[finite], rtol=2**-14, atol=1e-4)


def chunk_case(seed, capacity=100, q_len=40, window_slots=0, shuffle=False):
    """A prefill chunk of ``q_len`` queries at the end of an in-order cache with an empty tail (``shuffle``:
    slots out of position order, as after compression), batch 2 with the second row left-padded."""
    q, keys, values, log_votes, _, _ = make_case(seed, capacity=capacity, q_len=q_len)
    g = torch.Generator().manual_seed(seed)
    filled = capacity - 13
    kv_positions = torch.arange(capacity).expand(2, 3, capacity).clone()
    if shuffle:
        kv_positions = torch.stack([torch.randperm(capacity, generator=g) for _ in range(6)]).view(2, 3, capacity)
    log_votes[..., filled:] = -math.inf
    q_positions = (filled - q_len + torch.arange(q_len)).expand(2, q_len).clone()
    q_positions[1, :7] = 0  # padding tokens (position 0)
    return q, keys, values, log_votes, kv_positions.int(), q_positions.int()


def tile_classes(block_mask, num_heads):
    """``[B, H, n_q, n_kv]`` of 0 (skipped), 1 (partial), 2 (full) from a BlockMask's index tensors."""
    batch, _, n_q = block_mask.kv_num_blocks.shape
    n_kv = block_mask.kv_indices.shape[-1]
    classes = torch.zeros(batch, num_heads, n_q, n_kv, dtype=torch.long)
    for value, count, index in ((1, block_mask.kv_num_blocks, block_mask.kv_indices),
                                (2, block_mask.full_kv_num_blocks, block_mask.full_kv_indices)):
        used = torch.arange(n_kv) < count[..., None]
        classes.scatter_add_(-1, index.long(), used.long() * value)
    return classes


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), window=st.sampled_from([None, 5, 30]), shuffle=st.booleans(),
       blocks=st.sampled_from([(8, 16), (16, 8), (4, 32)]))
def test_block_mask_classifies_tiles_exactly(seed, window, shuffle, blocks):
    """Every tile marked full has every (query, non-empty slot) pair visible, every skipped tile none; each tile
    is in at most one list. Checked against the dense visibility of each pair."""
    _, _, _, log_votes, kv_positions, q_positions = chunk_case(seed, shuffle=shuffle)
    block_mask = vote_block_mask(log_votes, kv_positions, q_positions, 9, window, blocks)
    classes = tile_classes(block_mask, 9)
    assert classes.max() <= 2
    visible = kv_positions[:, :, None, :] <= q_positions[:, None, :, None]
    if window is not None:
        visible &= q_positions[:, None, :, None] - kv_positions[:, :, None, :] < window
    counted = visible & torch.isfinite(log_votes)[:, :, None, :]  # [B, H_kv, T, C]
    q_block, kv_block = blocks
    for b, h in ((b, h) for b in range(2) for h in range(9)):
        for i in range(classes.shape[2]):
            for j in range(classes.shape[3]):
                tile = counted[b, h // 3, i * q_block:(i + 1) * q_block, j * kv_block:(j + 1) * kv_block]
                present = torch.isfinite(log_votes[b, h // 3, j * kv_block:(j + 1) * kv_block])
                if classes[b, h, i, j] == 2:
                    assert tile[:, present].all()
                elif classes[b, h, i, j] == 0:
                    assert not tile.any()
    if not shuffle and window is None:
        assert (classes == 2).any() and (classes == 0).any()  # the in-order chunk has both kinds


@pytest.mark.compile
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_flex_equals_reference(dtype, tol):
    """Compiled FlexAttention (vote score_mod + data-dependent block mask) == dense reference (fp32 1e-5;
    bf16 2e-2; fp16 2e-3) with small tiles (8 query rows, 16 slots): a random slot order with 20% empty slots
    (:func:`make_case`), an in-order chunk whose tiles are full, partial and skipped, a shuffled cache, a sliding
    window, padding rows. Every case has the chunk's shapes, so one window setting is one compiled kernel: float32
    runs every case with and without the window (2 kernels); the half-precision dtypes, whose prefill chunks carry
    the votes as key columns, the windowed ones (1 kernel each; the default tile size and no window are
    :func:`test_empty_rows_give_zeros_not_nan`'s)."""
    window = 7
    random_order = [make_case(seed, dtype=dtype, capacity=100, q_len=40) for seed in (3, 4)]
    chunks = [tuple(t.to(dtype) if t.is_floating_point() and i < 3 else t
                    for i, t in enumerate(chunk_case(seed, shuffle=shuffle)))
              for seed, shuffle in ((5, False), (6, False), (7, True))]
    windows = (None, window) if dtype == torch.float32 else (window,)
    for case in (*random_order, *chunks):
        for sliding_window in windows:
            flex = vote_attention_flex(*case, sliding_window=sliding_window, block_size=(8, 16))
            reference = vote_attention_reference(*case, sliding_window=sliding_window)
            torch.testing.assert_close(flex.float(), reference.float(), rtol=tol, atol=tol)


def test_score_mod_and_mask_mod_are_named_closures_reading_captured_tensors():
    _, _, _, log_votes, kv_positions, q_positions = make_case(5)
    score_mod = generate_vote_score_mod(log_votes, group_size=3)
    mask_mod = generate_visibility_mask_mod(kv_positions, q_positions, group_size=3, sliding_window=None)
    assert score_mod.__name__ == "vote_score_mod" and mask_mod.__name__ == "visibility_mask_mod"
    b, h, q_idx, kv_idx = (torch.tensor(v) for v in (1, 4, 2, 9))
    assert score_mod(torch.tensor(0.5), b, h, q_idx, kv_idx) == 0.5 + log_votes[1, 1, 9]
    assert mask_mod(b, h, q_idx, kv_idx) == (kv_positions[1, 1, 9] <= q_positions[1, 2])


def test_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="allowed: flex, reference"):
        vote_attention(*make_case(6), kernel="sdpa")


@pytest.mark.parametrize("window", [None, 300])
def test_eager_attention_of_a_long_chunk_runs_in_query_blocks_with_the_same_result(window):
    """``vote_attention(kernel="reference")`` attends a chunk longer than ``REFERENCE_QUERY_BLOCK`` queries block by
    block (bounded float32 logits for the long eager prefill chunks of a compressed cache): every query row equals
    the one-call dense reference (rows are independent; float32 1e-6)."""
    from keepkv.ops.attention import REFERENCE_QUERY_BLOCK

    q_len = 2 * REFERENCE_QUERY_BLOCK + 77
    case = make_case(11, batch=1, kv_heads=2, group=2, q_len=q_len, capacity=q_len + 40, head_dim=8)
    calls = []
    from keepkv.ops import attention

    original = attention.vote_attention_reference
    try:
        attention.vote_attention_reference = lambda q, *rest: calls.append(q.shape[2]) or original(q, *rest)
        got = vote_attention(*case, sliding_window=window, kernel="reference")
    finally:
        attention.vote_attention_reference = original
    assert calls == [REFERENCE_QUERY_BLOCK, REFERENCE_QUERY_BLOCK, 77]
    torch.testing.assert_close(got, vote_attention_reference(*case, sliding_window=window), rtol=1e-6, atol=1e-6)
