"""Cross-head reductions of the compression methods, made to agree across tensor-parallel ranks.

Under tensor parallelism (:mod:`keepkv.distributed.tp`) each rank holds the KV heads
``[first_kv_head, first_kv_head + kv_heads)`` of a layer (a :class:`HeadShard`, attached to every cache the rank's
manager creates as ``cache.head_shard``) and compresses them itself. Most methods score and select each KV head
alone, which needs nothing from the other ranks. The few places that read *several* KV heads call the functions
below instead of the plain tensor op; without a shard (one process, ``cache.head_shard`` absent or ``None``) each
one *is* the plain op, so the single-process code path is unchanged:

- :func:`head_mean`: a mean over axes that include the KV-head axis 1 (KeepKV's ``selection="layer"`` ranking,
  TOVA's layer-wise score, D2O's per-layer attention variance). Each rank sums its heads, one ``all_reduce(sum)``
  adds the ranks' sums, and the total is divided by the element count of the whole layer: the mean over every
  KV head of the layer, the same number on every rank (the float32 summation order differs from one process's
  ``mean``: rounding-level differences only);
- :func:`head_mean_by_position`: the same mean taken token by token (heads matched by position), for KeepKV's
  ``selection="blend"`` and ``"floor"``, whose heads keep different tokens;
- :func:`gather_kv_heads` / :func:`local_kv_heads`: the whole layer's tensors (``all_gather`` along axis 1) for a
  decision that couples heads non-linearly (Ada-KV's global top-k of head budgets), and this rank's slice of the
  result;
- :func:`first_kv_head`: the global index of the rank's first KV head (CaM's per-head random stream).

Each rank then makes the same decision as the single process makes for those heads, so the kept set is the
single-process one (``tests/distributed/test_tp.py`` compares the caches). The collectives are PyTorch's functional
collectives (``torch.distributed._functional_collectives``): plain ops in eager mode and traced ops inside
``torch.compile`` graphs (the compiled decode step and KeepKV's compiled compression), no host sync.

Head-invariant reductions need no collective: the newest position of a row (``CompressionMethod.protected_mask``'s
``amax`` over heads) is the same in every head, since each new token is written to every head and the newest one
is always protected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

KV_HEAD_AXIS = 1


@dataclass(frozen=True)
class HeadShard:
    """The KV heads one tensor-parallel rank holds: ``[first_kv_head, first_kv_head + kv_heads)`` of
    ``total_kv_heads``, and the process group (by name, as the functional collectives take it) of the ranks that
    hold the others (``world_size`` of them, this one ``rank``)."""

    group_name: str
    rank: int
    world_size: int
    first_kv_head: int
    kv_heads: int
    total_kv_heads: int


def shard_of(cache: Any) -> HeadShard | None:
    """The :class:`HeadShard` a cache holds, or ``None`` (one process)."""
    return getattr(cache, "head_shard", None)


def attach_head_shard(shard: HeadShard | None, caches: list) -> list:
    """Mark ``caches`` as holding ``shard``'s heads (``cache.head_shard``); returns them. ``None``: unchanged."""
    if shard is not None:
        for cache in caches:
            cache.head_shard = shard
    return caches


def head_mean(x: Tensor, cache: Any, dim: int | Sequence[int], keepdim: bool = True) -> Tensor:
    """``x.mean(dim, keepdim)`` over axes ``dim`` (which include the KV-head axis 1) of the whole layer: with a
    shard, the sum over this rank's heads, ``all_reduce``-summed over the ranks, divided by the layer's count."""
    shard = shard_of(cache)
    if shard is None:
        return x.mean(dim=dim, keepdim=keepdim)
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    if KV_HEAD_AXIS not in [d % x.dim() for d in dims]:
        raise ValueError(f"head_mean reduces over the KV-head axis {KV_HEAD_AXIS}; got dim={dim}")
    import torch.distributed._functional_collectives as funcol

    count = shard.world_size
    for axis in dims:  # a plain loop: dynamo traces it (not math.prod over a generator)
        count *= x.shape[axis]
    total = funcol.all_reduce(x.sum(dim=dims, keepdim=keepdim), "sum", shard.group_name)
    return total / count


def head_mean_by_position(scores: Tensor, cache: Any) -> Tensor:
    """``[batch, kv_heads, capacity]`` -> the same shape: at each slot, the mean over every KV head of the layer of
    that head's score of the *same token* (the slot holding the same position in that head; 0 for a head that no
    longer holds it, and 0 at an empty slot). Positions and liveness are read from ``cache`` (a slot is live when
    its log-vote is finite; an empty slot is excluded whatever position it still holds, as a padding slot keeps
    its position until the cache is packed). The live positions of a head must be unique (each token is written
    once and a merge keeps the kept entry's position). Once heads have kept different tokens (a per-head
    selection), slot ``i`` holds a different token in each head and :func:`head_mean` over slots would mix them;
    while every head holds the same positions in the same slots this equals :func:`head_mean` over axis 1 (up to
    float rounding). Each head's positions are sorted once and searched (``torch.searchsorted``): no host sync,
    ``kv_heads**2 * capacity * log(capacity)`` work. With a shard the whole layer's scores and positions are gathered
    first (:func:`gather_kv_heads`) and this rank's slots answered."""
    positions = cache.positions.masked_fill(~torch.isfinite(cache.log_votes), -1)
    all_scores, all_positions = gather_kv_heads(cache, scores, positions)
    batch, local_heads, capacity = positions.shape
    heads = all_scores.shape[KV_HEAD_AXIS]
    sorted_positions, order = torch.sort(all_positions, dim=-1)
    sorted_scores = all_scores.gather(-1, order)
    wanted = positions.reshape(batch, 1, local_heads * capacity).expand(-1, heads, -1).contiguous()
    index = torch.searchsorted(sorted_positions, wanted).clamp_max(capacity - 1)
    found = (sorted_positions.gather(-1, index) == wanted) & (wanted >= 0)
    matched = torch.where(found, sorted_scores.gather(-1, index), 0.0)
    return (matched.sum(dim=KV_HEAD_AXIS) / heads).reshape(batch, local_heads, capacity)


def gather_kv_heads(cache: Any, *tensors: Tensor) -> tuple[Tensor, ...]:
    """``tensors`` (each ``[batch, kv_heads, ...]``, this rank's heads) with every rank's heads concatenated along
    axis 1, in global head order; unchanged without a shard. Bool tensors travel as uint8."""
    shard = shard_of(cache)
    if shard is None:
        return tensors
    import torch.distributed._functional_collectives as funcol

    all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor  # renamed in torch 2.x
    gathered = []
    for tensor in tensors:
        sent = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor
        full = all_gather(sent.contiguous(), KV_HEAD_AXIS, shard.group_name)
        gathered.append(full.to(torch.bool) if tensor.dtype == torch.bool else full)
    return tuple(gathered)


def local_kv_heads(x: Tensor, cache: Any) -> Tensor:
    """This rank's KV heads (axis 1) of a whole-layer tensor ``x``; ``x`` itself without a shard."""
    shard = shard_of(cache)
    if shard is None:
        return x
    return x.narrow(KV_HEAD_AXIS, shard.first_kv_head, shard.kv_heads)


def first_kv_head(cache: Any) -> int:
    """The global index of the cache's first KV head (0 without a shard)."""
    shard = shard_of(cache)
    return 0 if shard is None else shard.first_kv_head
