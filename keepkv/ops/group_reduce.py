"""Per-group sums and maxima of rows, as opaque ops: the group reductions of :mod:`keepkv.ops.merge`.

For ``values [B, H, L, *rest]`` and ``group [B, H, L]`` (int64 in ``[0, G]``; ``G`` = the number of groups, the
value ``G`` itself marks a row that belongs to no group and is dropped)::

    group_sum(values, group, G)[b, h, j]  = sum_{i : group[b, h, i] = j} values[b, h, i]      (0 for an empty group)
    group_amax(values, group, G)[b, h, j] = max_{i : group[b, h, i] = j} values[b, h, i]      (-inf for an empty group)

Both return ``[B, H, G + 1, *rest]``, the last group holding the dropped rows; callers slice ``[:, :, :G]``.
Group ids are not checked against ``[0, G]`` (that would be a host sync): an id above ``G`` lands in the next
``(b, h)``'s groups (past the last one, an index error), a negative id in the previous one's. ``group_amax`` needs
floating-point values. No autograd formula (the merge runs under ``torch.inference_mode``).

**Why custom ops.** Each is a ``torch.library.custom_op`` (``keepkv::group_sum``, ``keepkv::group_amax``):
inductor calls it as one extern kernel that returns a new tensor, so it can neither fuse a reader of the merge's
cache writes before it nor rewrite it as an in-place scatter, which inductor 2.13 on CPU did reorder against its
readers (``docs/profile.md`` section 11, ``keepkv/ops/merge.py``). Inside: ``index_add_`` /
``scatter_reduce_("amax")`` into a fresh buffer over flattened ``(b, h, group)`` rows.

**Summation order.** ``index_add_`` adds rows in index order: with rows sorted by group (as the merge sorts its
members) float32 / float64 sums are bit-identical on the CPU to ``torch.segment_reduce(..., "sum", initial=0)``
over the same rows, and about 7.5x faster for ``[*, 64]`` rows (``docs/profile.md`` section 23). 16-bit values
round after every add where ``segment_reduce`` accumulates wider: the merge passes float32 / float64 only. On
CUDA ``index_add_`` is atomic (the order of a sum is not fixed) unless ``torch.use_deterministic_algorithms(True)``.
A maximum does not depend on the order (up to the sign of a zero).

Device-agnostic: plain tensor ops on the inputs' device.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _flat_rows(values: Tensor, group: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """``(index [B*H*L], rows [B*H*L, *rest])``: each row's flattened destination ``(b*H + h)*(G + 1) + group``."""
    batch, heads, length = group.shape
    base = torch.arange(batch * heads, device=group.device, dtype=torch.int64).view(batch, heads, 1) * (groups + 1)
    index = (base + group.to(torch.int64)).reshape(-1)
    return index, values.reshape(batch * heads * length, *values.shape[3:])


def _check(values: Tensor, group: Tensor, groups: int) -> None:
    if group.dim() != 3 or values.shape[:3] != group.shape:
        raise ValueError(f"group reductions need values [B, H, L, ...] and group [B, H, L]; got values "
                         f"{tuple(values.shape)}, group {tuple(group.shape)}")
    if groups < 0:
        raise ValueError(f"groups must be >= 0, got {groups}")


@torch.library.custom_op("keepkv::group_sum", mutates_args=())
def group_sum(values: Tensor, group: Tensor, groups: int) -> Tensor:
    """Per-group sums ``[B, H, groups + 1, *rest]`` (module doc); rows are added in index order."""
    _check(values, group, groups)
    batch, heads = group.shape[:2]
    index, rows = _flat_rows(values, group, groups)
    out = values.new_zeros((batch * heads * (groups + 1), *values.shape[3:]))
    out.index_add_(0, index, rows)
    return out.view(batch, heads, groups + 1, *values.shape[3:])


@group_sum.register_fake
def _group_sum_fake(values: Tensor, group: Tensor, groups: int) -> Tensor:
    _check(values, group, groups)
    return values.new_empty((group.shape[0], group.shape[1], groups + 1, *values.shape[3:]))


@torch.library.custom_op("keepkv::group_amax", mutates_args=())
def group_amax(values: Tensor, group: Tensor, groups: int) -> Tensor:
    """Per-group maxima ``[B, H, groups + 1, *rest]`` (module doc); ``-inf`` for an empty group."""
    _check(values, group, groups)
    batch, heads = group.shape[:2]
    index, rows = _flat_rows(values, group, groups)
    out = values.new_full((batch * heads * (groups + 1), *values.shape[3:]), -float("inf"))
    index = index.view(-1, *([1] * (rows.dim() - 1))).expand_as(rows)
    out.scatter_reduce_(0, index, rows, "amax", include_self=True)
    return out.view(batch, heads, groups + 1, *values.shape[3:])


@group_amax.register_fake
def _group_amax_fake(values: Tensor, group: Tensor, groups: int) -> Tensor:
    _check(values, group, groups)
    return values.new_empty((group.shape[0], group.shape[1], groups + 1, *values.shape[3:]))
