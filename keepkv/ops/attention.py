"""Vote-weighted attention: ``softmax(q·k_i / sqrt(d) + ln p_i)`` over a fixed-capacity cache.

KeepKV (Tian et al., arXiv 2504.09936, §3 "electoral votes") gives every cache entry a vote count ``p_i``; the
attention output becomes ``o = sum_i p_i s_i v_i / sum_i p_i s_i`` with ``s_i = exp(q·k_i/sqrt(d))``, i.e. an
additive per-key logit bias ``ln p_i``. keepkv keeps ``log_votes = ln p`` (float32) in the cache: 0 for an
ordinary entry, ``-inf`` for an empty slot.

Visibility is decided from token *positions*, not slot indices, so one rule serves prefill chunks, decode steps,
padding and compressed caches whose slots are no longer in position order:
``visible(q, i) = pos_i <= pos_q  and  pos_q - pos_i < sliding_window``.

Two kernels compute the same thing:
- ``flex``: ``torch.nn.attention.flex_attention`` with the ``score_mod`` from :func:`generate_vote_score_mod`
  (``+ ln p``) and a block mask computed from the positions (:func:`vote_block_mask`: tiles every query sees
  whole skip the ``mask_mod``, tiles nobody sees are skipped), run through ``torch.compile`` (a fused kernel;
  the eager flex path materialises the score matrix).
- ``reference``: a dense eager implementation (float32 softmax) used by tests and by eager runs.
- ``packed``: the decode (``q_len == 1``) path of the ``flex`` kernel: the ``G`` query heads of a KV head are
  folded into one ``[G, D]`` query block (no K/V repeat), ``softmax(Q K^T / sqrt(d) + ln p)`` in float32 then
  ``@ V``. Same maths as ``flex``; chosen for decode because it was measured faster on CPU (see
  :data:`DECODE_KERNEL`).
A query row with nothing visible (a padding token's row) yields zeros in every kernel, never NaN.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from keepkv.compile_limits import allow_graph_per_shape

ATTENTION_KERNELS = ("flex", "reference")

DECODE_KERNEL = "packed"
"""Kernel of the ``flex`` path for one-token queries (decode): ``"packed"`` (default) or ``"flex"``.

Measured (``tools/bench_decode.py attention``, torch 2.13 CPU, Intel Xeon, 2 threads, compiled, per layer,
``results/bench/decode_attention.json``): at 16k slots with SmolLM2 shapes (9/3 heads, d = 64) flex took 2.76 ms
(float32) / 1.61 ms (bfloat16), SDPA with an equivalent additive bias 2.38 / 1.16 ms, the packed kernel 1.06 /
0.98 ms. Flex's CPU template is built for long query blocks; with one query row per head it gains nothing from
tiling. Prefill chunks keep FlexAttention (no ``T x C`` float bias is ever materialised there)."""

ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

FLEX_BLOCK_SIZE = (128, 256)
"""``(query rows, cache slots)`` of one FlexAttention tile, the unit the vote block mask classifies.

Measured (``tools/bench_prefill.py attention`` cases, SmolLM2 heads, a 512-query chunk against 16k slots,
float32): 128 x 256 and 256 x 512 tiles within 2% of each other, 512 x 1024 tiles 10% slower; flex's default
(no block mask: one tile of the whole chunk x the whole cache) 2.4x slower."""


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
        q_pos = q_positions[b, q_idx]
        kv_pos = kv_positions[b, h // group_size, kv_idx]
        visible = kv_pos <= q_pos
        if sliding_window is not None:
            visible = visible & (q_pos - kv_pos < sliding_window)
        return visible

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


def _flex_with_vote_block_mask(
    q: Tensor, keys: Tensor, values: Tensor, log_votes: Tensor, kv_positions: Tensor, q_positions: Tensor,
    sliding_window: int | None, block_size: tuple[int, int],
) -> Tensor:
    group_size = q.shape[1] // keys.shape[1]
    block_mask = vote_block_mask(log_votes, kv_positions, q_positions, q.shape[1], sliding_window, block_size)
    score_mod = generate_vote_score_mod(log_votes, group_size)
    return flex_attention(q, keys, values, score_mod=score_mod, block_mask=block_mask, enable_gqa=group_size > 1)


# One graph builds the block mask and runs the fused flex kernel. ``assert_indirect_indexing`` off: the
# ``score_mod`` / ``mask_mod`` reads are indexed by the template's own ``b, h // G, q_idx, kv_idx`` (in range by
# construction), and the per-16-scores bounds check cost 10% (float32) to 25% (bfloat16) of a prefill chunk.
_compiled_flex_attention = torch.compile(
    _flex_with_vote_block_mask, dynamic=False, fullgraph=True, options={"assert_indirect_indexing": False}
)


def vote_attention_flex(
    q: Tensor, keys: Tensor, values: Tensor, log_votes: Tensor, kv_positions: Tensor, q_positions: Tensor,
    sliding_window: int | None = None, block_size: tuple[int, int] = FLEX_BLOCK_SIZE,
) -> Tensor:
    """Compiled FlexAttention: the vote ``score_mod`` (``+ ln p``) and the data-dependent
    :func:`vote_block_mask` (visibility), built and run in one compiled graph.

    Shapes: ``q [B, H, T, D]``, ``keys/values [B, H_kv, C, D]`` (same dtype as ``q``), ``log_votes`` and
    ``kv_positions [B, H_kv, C]``, ``q_positions [B, T]``; ``block_size`` the tile (query rows, slots).
    Returns ``[B, H, T, D]`` in ``q.dtype``.
    """
    allow_graph_per_shape()  # one graph per (chunk, capacity, dtype, heads): the default limit of 8 is too few
    return _compiled_flex_attention(
        q, keys, values, log_votes, kv_positions, q_positions, sliding_window, tuple(block_size)
    )


DECODE_PIECES = 8
"""The packed kernel cuts the cache into this many equal pieces (plus a short tail) so its matrix products get
``kv_heads x pieces`` independent batch items instead of ``kv_heads`` (3 for SmolLM2, 2 for Qwen2.5): with 2
threads and 3 heads one thread idled half the time. Measured (SmolLM2 heads, 16k slots, compiled, per layer):
1307 -> 1051 us (float32), 1110 -> 906 us (bfloat16); 4 to 16 pieces within 4% of each other."""

_MIN_PIECE = 128  # below pieces of this many slots the split buys nothing: fewer pieces (down to 1)


def _grouped_logits(q_grouped: Tensor, keys: Tensor, log_votes: Tensor, kv_positions: Tensor, q_pos: Tensor,
                    sliding_window: int | None, scale: float) -> Tensor:
    """``Q_g K^T * scale + ln p`` (float32), ``-inf`` where not visible; leading dims broadcast, ``q_pos``
    ``[..., rows, 1]`` against slots ``[..., 1, n]``."""
    logits = torch.matmul(q_grouped, keys.transpose(-1, -2)).float() * scale
    kv_pos = kv_positions.unsqueeze(-2)
    visible = kv_pos <= q_pos
    if sliding_window is not None:
        visible = visible & (q_pos - kv_pos < sliding_window)
    return torch.where(visible, logits + log_votes.unsqueeze(-2), -float("inf"))


def vote_attention_packed(
    q: Tensor, keys: Tensor, values: Tensor, log_votes: Tensor, kv_positions: Tensor, q_positions: Tensor,
    sliding_window: int | None = None,
) -> Tensor:
    """Grouped ("packed") vote attention for short query blocks: the decode path (same arguments and result as
    :func:`vote_attention_flex`).

    ``Q_g [B, H_kv, G*T, D]`` (the group's query heads stacked, K/V never repeated); logits
    ``Q_g K^T / sqrt(d)`` in the input dtype, then ``+ ln p``, visibility mask, softmax in float32 and ``@ V``
    in the input dtype. The ``C`` slots are viewed (no copy) as :data:`DECODE_PIECES` pieces plus a tail of
    ``C mod pieces``; one softmax spans all of them (shared row max and denominator) and the pieces' ``@ V``
    partial sums are added in float32. Its score matrix is ``[B, H, T, C]``: meant for ``T = 1`` (or a few
    tokens).
    """
    batch, num_heads, q_len, head_dim = q.shape
    kv_heads, capacity = keys.shape[1], keys.shape[2]
    rows = num_heads // kv_heads * q_len
    pieces = max(1, min(DECODE_PIECES, capacity // _MIN_PIECE))
    piece, main = capacity // pieces, capacity // pieces * pieces
    scale = 1.0 / math.sqrt(head_dim)
    q_grouped = q.reshape(batch, kv_heads, 1, rows, head_dim)
    q_pos = q_positions.repeat(1, num_heads // kv_heads)[:, None, None, :, None]  # row (g, t) -> pos_t

    def split(t: Tensor) -> Tensor:  # [B, H_kv, C, ...] -> [B, H_kv, pieces, piece, ...] over the first `main`
        return t[:, :, :main].view(batch, kv_heads, pieces, piece, *t.shape[3:])

    parts = [(split(keys), split(values), split(log_votes), split(kv_positions))]
    if main < capacity:
        parts.append(tuple(t[:, :, main:].unsqueeze(2) for t in (keys, values, log_votes, kv_positions)))
    logits = [_grouped_logits(q_grouped, k, lv, kp, q_pos, sliding_window, scale) for k, _, lv, kp in parts]
    row_max = torch.stack([lg.amax(dim=(2, 4), keepdim=True) for lg in logits]).amax(0)
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
    weights = [torch.exp(lg - row_max) for lg in logits]
    denominator = sum(w.sum(dim=(2, 4), keepdim=True) for w in weights)
    denominator = denominator.clamp_min(torch.finfo(torch.float32).tiny)
    out = sum(torch.matmul((w / denominator).to(values.dtype), v).float().sum(2)
              for w, (_, v, _, _) in zip(weights, parts))
    return out.to(q.dtype).view(batch, num_heads, q_len, head_dim)


def vote_attention_reference(
    q: Tensor, keys: Tensor, values: Tensor, log_votes: Tensor, kv_positions: Tensor, q_positions: Tensor,
    sliding_window: int | None = None,
) -> Tensor:
    """Dense eager reference of :func:`vote_attention_flex` (same arguments, same result).

    Logits, bias and softmax in float32 (float64 if ``q`` is float64); a row with no visible entry gives 0.
    """
    batch, num_heads, q_len, head_dim = q.shape
    kv_heads = keys.shape[1]
    group_size = num_heads // kv_heads
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_grouped = q.to(compute_dtype).reshape(batch, kv_heads, group_size * q_len, head_dim)
    logits = torch.matmul(q_grouped, keys.to(compute_dtype).transpose(-1, -2)) / math.sqrt(head_dim)
    logits = logits.reshape(batch, kv_heads, group_size, q_len, -1)
    q_pos = q_positions[:, None, None, :, None]
    kv_pos = kv_positions[:, :, None, None, :]
    visible = kv_pos <= q_pos
    if sliding_window is not None:
        visible = visible & (q_pos - kv_pos < sliding_window)
    # the bias (ln p where visible, -inf elsewhere) is built at [B, H_kv, 1, T, C] and added in place: eager
    # prefill chunks are dominated by passes over the [B, H_kv, G, T, C] logits, so they are kept few
    bias = log_votes[:, :, None, None, :].to(compute_dtype).masked_fill(~visible, -float("inf"))
    logits.add_(bias)
    weights = torch.softmax(logits, dim=-1)
    has_entries = torch.isfinite(bias).any(dim=-1, keepdim=True)  # a visible, non-empty slot
    weights = weights.masked_fill_(~has_entries, 0.0)  # a row without one is NaN after softmax: 0
    weights = weights.reshape(batch, kv_heads, group_size * q_len, -1)
    out = torch.matmul(weights, values.to(compute_dtype))
    return out.reshape(batch, num_heads, q_len, head_dim).to(q.dtype)


def vote_attention(
    q: Tensor, keys: Tensor, values: Tensor, log_votes: Tensor, kv_positions: Tensor, q_positions: Tensor,
    sliding_window: int | None = None, kernel: str = "flex",
) -> Tensor:
    """Vote-weighted attention with the chosen kernel (``"flex"`` or ``"reference"``); see the module doc.

    ``"flex"`` runs one-token queries (decode) through :data:`DECODE_KERNEL` (``packed`` by default)."""
    if kernel == "flex":
        if q.shape[2] == 1 and DECODE_KERNEL == "packed":
            return vote_attention_packed(q, keys, values, log_votes, kv_positions, q_positions, sliding_window)
        return vote_attention_flex(q, keys, values, log_votes, kv_positions, q_positions, sliding_window)
    if kernel == "reference":
        return vote_attention_reference(q, keys, values, log_votes, kv_positions, q_positions, sliding_window)
    raise ValueError(f"unknown attention kernel {kernel!r}; allowed: {', '.join(ATTENTION_KERNELS)}")
