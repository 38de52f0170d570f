"""FlexAttention modifiers of vote attention: the ``score_mod`` (``+ ln p``), the visibility ``mask_mod`` and
the block mask computed from the data.

KeepKV's votes (Tian et al., arXiv 2504.09936, §3) enter attention as a per-slot logit bias ``ln p_i``
(:func:`generate_vote_score_mod`); which slots a query sees is decided from token positions
(:func:`generate_visibility_mask_mod`), and :func:`vote_block_mask` tells FlexAttention, tile by tile, where that
test can be skipped (every pair visible) and where nothing needs computing at all. Factories return named
closures over the cache's tensors (attention-gym's ``generate_*`` style), so a compiled graph reads the tensors'
current values and never recompiles when they change.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

FLEX_BLOCK_SIZE = (128, 256)
"""Default ``(query rows, cache slots)`` of one FlexAttention tile, the unit the vote block mask classifies
(``RuntimeOptions.flex_block_size``; ``docs/profile.md``, "Measurements behind the code's choices")."""


def generate_vote_score_mod(log_votes: Tensor, group_size: int) -> ScoreMod:
    """A FlexAttention ``score_mod`` adding each entry's log-votes to its logit: ``score + ln p_i``.

    Args:
        log_votes: ``[batch, kv_heads, capacity]`` float32, ``ln p_i`` (``-inf`` = empty slot, so an empty slot
            never takes weight even inside a tile the block mask marks fully visible).
        group_size: query heads per KV head ``G``; inside ``score_mod`` ``h`` is the *query* head.
    """

    def vote_score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score + log_votes[b, h // group_size, kv_idx]

    return vote_score_mod


def visible(kv_pos: Tensor, q_pos: Tensor, sliding_window: int | None) -> Tensor:
    """The visibility rule of every kernel (broadcasting): ``pos_i <= pos_q`` and, with a sliding window,
    ``pos_q - pos_i < sliding_window``."""
    seen = kv_pos <= q_pos
    if sliding_window is not None:
        seen = seen & (q_pos - kv_pos < sliding_window)
    return seen


def generate_visibility_mask_mod(
    kv_positions: Tensor, q_positions: Tensor, group_size: int, sliding_window: int | None
) -> MaskMod:
    """A FlexAttention ``mask_mod``: ``pos_i <= pos_q`` (and ``pos_q - pos_i < sliding_window``).

    Args:
        kv_positions: ``[batch, kv_heads, capacity]`` integer token position of each slot.
        q_positions: ``[batch, q_len]`` integer token position of each query.
        group_size: query heads per KV head ``G``.
        sliding_window: ``None`` or the number of most recent positions visible (the query's own included).
    """

    def visibility_mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return visible(kv_positions[b, h // group_size, kv_idx], q_positions[b, q_idx], sliding_window)

    return visibility_mask_mod


def _block_extremes(values: Tensor, present: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Per block of ``block`` consecutive entries of the last axis: (min, max) over the present entries
    (``+big, -big`` for a block with none)."""
    big = torch.iinfo(torch.int64).max // 4
    length = values.shape[-1]
    pad = -length % block
    low = F.pad(torch.where(present, values, big), (0, pad), value=big)
    high = F.pad(torch.where(present, values, -big), (0, pad), value=-big)
    shape = (*values.shape[:-1], (length + pad) // block, block)
    return low.view(shape).amin(-1), high.view(shape).amax(-1)


def _first_true_indices(flags: Tensor) -> tuple[Tensor, Tensor]:
    """``(count, indices)`` of the set entries of the last axis, the set ones first (in order): BlockMask's
    ``kv_num_blocks`` / ``kv_indices`` layout."""
    count = flags.sum(-1, dtype=torch.int32)
    order = torch.argsort((~flags).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return count, order


def vote_block_mask(
    log_votes: Tensor, kv_positions: Tensor, q_positions: Tensor, num_heads: int, sliding_window: int | None,
    block_size: tuple[int, int] = FLEX_BLOCK_SIZE,
) -> BlockMask:
    """The block mask of vote attention, computed from the data (positions and empty slots), not from indices.

    Each ``(query block, slot block)`` tile is classified from the extreme positions of its queries and of its
    non-empty slots (``ln p > -inf``), per batch row and KV head:

    - *full*, every pair visible: ``max pos_i <= min pos_q`` (and ``max pos_q - min pos_i < window``): flex skips
      the ``mask_mod`` there and only the ``score_mod`` (``+ ln p``) runs;
    - *skipped*, no pair visible: ``min pos_i > max pos_q`` (or ``min pos_q - max pos_i >= window``), or no
      non-empty slot: never computed;
    - *partial*, otherwise: :func:`generate_visibility_mask_mod` decides each pair.

    The classification is exact (empty slots inside a full tile get ``-inf`` from the ``score_mod``), so the
    result equals the dense definition whatever the slot order: a compressed cache whose slots are out of
    position order only has more partial tiles. In a prefill chunk every slot older than the chunk lies in full
    tiles, and the tail of empty slots of a fixed-capacity buffer is skipped.
    """
    batch, kv_heads, capacity = kv_positions.shape
    q_len = q_positions.shape[1]
    q_block, kv_block = block_size
    group_size = num_heads // kv_heads
    present = ~torch.isneginf(log_votes)
    kv_low, kv_high = _block_extremes(kv_positions.long(), present, kv_block)  # [B, H_kv, n_kv]
    q_low, q_high = _block_extremes(q_positions.long(), torch.ones_like(q_positions, dtype=torch.bool), q_block)
    kv_low, kv_high = kv_low[:, :, None, :], kv_high[:, :, None, :]
    q_low, q_high = q_low[:, None, :, None], q_high[:, None, :, None]  # [B, 1, n_q, 1]
    full = kv_high <= q_low
    some = kv_low <= q_high
    if sliding_window is not None:
        full = full & (q_high - kv_low < sliding_window)
        some = some & (q_low - kv_high < sliding_window)
    some = some & (kv_low <= kv_high)  # a tile of empty slots only is skipped
    full = full & some
    partial = some & ~full
    partial_count, partial_index = _first_true_indices(partial.repeat_interleave(group_size, dim=1))
    full_count, full_index = _first_true_indices(full.repeat_interleave(group_size, dim=1))
    return BlockMask.from_kv_blocks(
        partial_count, partial_index, full_count, full_index, BLOCK_SIZE=block_size,
        mask_mod=generate_visibility_mask_mod(kv_positions, q_positions, group_size, sliding_window),
        seq_lengths=(q_len, capacity),
    )
