"""Tests of keepkv.ops.group_reduce: per-group sums and maxima as custom ops (the merge's group reductions).

- against a loop reference (float64, exact), empty groups (0 / -inf) and dropped rows (group == G);
- bit-identical to ``torch.segment_reduce`` over rows sorted by group (the op they replace in the merge);
- torch.library's opcheck (schema, fake tensor, dispatch) and one compiled graph equal to eager;
- bad shapes are refused with the shapes in the message.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keepkv.ops.group_reduce import group_amax, group_sum


def loop_reference(values: torch.Tensor, group: torch.Tensor, groups: int):
    batch, heads, length = group.shape
    rest = values.shape[3:]
    sums = torch.zeros(batch, heads, groups + 1, *rest, dtype=values.dtype)
    peaks = torch.full((batch, heads, groups + 1, *rest), -float("inf"), dtype=values.dtype)
    for b in range(batch):
        for h in range(heads):
            for i in range(length):
                j = int(group[b, h, i])
                sums[b, h, j] += values[b, h, i]
                peaks[b, h, j] = torch.maximum(peaks[b, h, j], values[b, h, i])
    return sums, peaks


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 2), heads=st.integers(1, 3), length=st.integers(1, 12),
       groups=st.integers(0, 6), rest=st.sampled_from([(), (1,), (4,), (2, 3)]))
def test_group_sum_and_amax_equal_a_loop_reference(seed, batch, heads, length, groups, rest):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(batch, heads, length, *rest, generator=g, dtype=torch.float64)
    group = torch.randint(0, groups + 1, (batch, heads, length), generator=g)  # groups itself = dropped row
    sums, peaks = loop_reference(values, group, groups)
    got_sums, got_peaks = group_sum(values, group, groups), group_amax(values, group, groups)
    assert got_sums.shape == (batch, heads, groups + 1, *rest) and got_peaks.shape == got_sums.shape
    torch.testing.assert_close(got_sums, sums, rtol=0, atol=1e-12)
    assert torch.equal(got_peaks, peaks)  # a maximum is exact; -inf where a group got no row
    empty = torch.stack([torch.bincount(row, minlength=groups + 1) for row in group.reshape(-1, length)])
    empty = (empty == 0).reshape(batch, heads, groups + 1)
    assert (got_sums[empty] == 0).all() and torch.isneginf(got_peaks[empty]).all()


@pytest.mark.parametrize("rest", [(), (3,), (64,)])
def test_group_sum_is_bit_identical_to_segment_reduce_over_rows_sorted_by_group(rest):
    """The merge sorts its members by group; there the new op must give the old sums bit for bit."""
    g = torch.Generator().manual_seed(0)
    batch, heads, length, groups = 1, 3, 900, 300
    key = torch.randint(0, groups + 1, (batch, heads, length), generator=g)
    key, order = torch.sort(key, dim=-1, stable=True)
    values = torch.randn(batch, heads, length, *rest, generator=g) * 10.0 ** torch.randint(
        -3, 4, (batch, heads, length, *rest), generator=g)
    edges = torch.arange(groups + 2).expand(batch, heads, groups + 2).contiguous()
    bounds = torch.searchsorted(key.contiguous(), edges)
    lengths = bounds[..., 1:] - bounds[..., :-1]
    old = torch.segment_reduce(values, "sum", lengths=lengths, axis=2, unsafe=True, initial=0.0)
    assert torch.equal(group_sum(values, key, groups), old)
    old_max = torch.segment_reduce(values, "max", lengths=lengths, axis=2, unsafe=True, initial=-float("inf"))
    assert torch.equal(group_amax(values, key, groups), old_max)


@pytest.mark.compile
def test_the_ops_pass_opcheck_and_compile_into_one_graph_equal_to_eager():
    g = torch.Generator().manual_seed(1)
    values = torch.randn(2, 3, 10, 5, generator=g)
    group = torch.randint(0, 5, (2, 3, 10), generator=g)
    for op in (group_sum, group_amax):
        torch.library.opcheck(op, (values, group, 4))

    def both(v, k):
        return group_sum(v * 2.0, k, 4)[:, :, :4].exp(), group_amax(v, k, 4)[:, :, :4]

    compiled = torch.compile(both, fullgraph=True, dynamic=False)
    for got, want in zip(compiled(values, group), both(values, group)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_bad_shapes_are_refused_with_what_was_given():
    with pytest.raises(ValueError, match=r"values \[B, H, L, \.\.\.\] and group \[B, H, L\].*\(1, 2, 3\).*\(1, 2, 4\)"):
        group_sum(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="groups must be >= 0"):
        group_amax(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3, dtype=torch.int64), -1)
