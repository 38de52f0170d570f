"""Vote-weighted attention: ``softmax(q·k_i / sqrt(d) + ln p_i)`` over a fixed-capacity cache.

KeepKV (Tian et al., arXiv 2504.09936, §3 "electoral votes") gives every cache entry a vote count ``p_i``; the
attention output becomes ``o = sum_i p_i s_i v_i / sum_i p_i s_i`` with ``s_i = exp(q·k_i/sqrt(d))``, i.e. an
additive per-key logit bias ``ln p_i``. keepkv keeps ``log_votes = ln p`` (float32) in the cache: 0 for an
ordinary entry, ``-inf`` for an empty slot.

Visibility is decided from token *positions*, not slot indices, so one rule serves prefill chunks, decode steps,
padding and compressed caches whose slots are no longer in position order:
``visible(q, i) = pos_i <= pos_q  and  pos_q - pos_i < sliding_window``.

Two kernels compute the same thing:
- ``flex``: ``torch.nn.attention.flex_attention`` with the ``score_mod`` from :func:`generate_vote_score_mod`,
  run through ``torch.compile`` (a fused kernel; the eager flex path materialises the score matrix).
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
from torch import Tensor
from torch.nn.attention.flex_attention import flex_attention

from keepkv.compile_limits import allow_graph_per_shape

ATTENTION_KERNELS = ("flex", "reference")

DECODE_KERNEL = "packed"
"""Kernel of the ``flex`` path for one-token queries (decode): ``"packed"`` (default) or ``"flex"``.

Measured (``tools/bench_decode.py --attention``, torch 2.13 CPU, 2 threads, SmolLM2 shapes 9/3 heads, d = 64,
compiled, per layer): at 16k slots flex took 1.18 ms (float32) / 3.94 ms (bfloat16), the packed kernel 1.03 ms /
0.55 ms, SDPA with an equivalent additive bias 2.40 ms / 7.15 ms. Flex's CPU template is built for long query
blocks; with one query row per head it gains nothing from tiling and in bfloat16 runs far below memory bandwidth.
Prefill chunks keep FlexAttention (no ``T x C`` float bias is ever materialised there)."""

ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def generate_vote_score_mod(
    log_votes: Tensor, kv_positions: Tensor, q_positions: Tensor, group_size: int, sliding_window: int | None
) -> ScoreMod:
    """A FlexAttention ``score_mod`` adding each entry's log-votes to its logit and masking invisible entries.

    Args:
        log_votes: ``[batch, kv_heads, capacity]`` float32, ``ln p_i`` (``-inf`` = empty slot).
        kv_positions: ``[batch, kv_heads, capacity]`` integer token position of each slot.
        q_positions: ``[batch, q_len]`` integer token position of each query.
        group_size: query heads per KV head ``G``; inside ``score_mod`` ``h`` is the *query* head.
        sliding_window: ``None`` or the number of most recent positions visible (the query's own included).
    """

    def vote_score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        kv_head = h // group_size
        q_pos = q_positions[b, q_idx]
        kv_pos = kv_positions[b, kv_head, kv_idx]
        visible = kv_pos <= q_pos
        if sliding_window is not None:
            visible = visible & (q_pos - kv_pos < sliding_window)
        return torch.where(visible, score + log_votes[b, kv_head, kv_idx], -float("inf"))

    return vote_score_mod


_compiled_flex_attention = torch.compile(flex_attention, dynamic=False, fullgraph=True)


def vote_attention_flex(
    q: Tensor, keys: Tensor, values: Tensor, log_votes: Tensor, kv_positions: Tensor, q_positions: Tensor,
    sliding_window: int | None = None,
) -> Tensor:
    """Compiled FlexAttention with the vote ``score_mod``.

    Shapes: ``q [B, H, T, D]``, ``keys/values [B, H_kv, C, D]`` (same dtype as ``q``), ``log_votes`` and
    ``kv_positions [B, H_kv, C]``, ``q_positions [B, T]``. Returns ``[B, H, T, D]`` in ``q.dtype``.
    """
    allow_graph_per_shape()  # one graph per (chunk, capacity, dtype, heads): the default limit of 8 is too few
    group_size = q.shape[1] // keys.shape[1]
    score_mod = generate_vote_score_mod(log_votes, kv_positions, q_positions, group_size, sliding_window)
    return _compiled_flex_attention(q, keys, values, score_mod=score_mod, enable_gqa=group_size > 1)


def vote_attention_packed(
    q: Tensor, keys: Tensor, values: Tensor, log_votes: Tensor, kv_positions: Tensor, q_positions: Tensor,
    sliding_window: int | None = None,
) -> Tensor:
    """Grouped ("packed") vote attention for short query blocks: the decode path (same arguments and result as
    :func:`vote_attention_flex`).

    ``Q_g [B, H_kv, G*T, D]`` (the group's query heads stacked, K/V never repeated); logits
    ``Q_g K^T / sqrt(d)`` in the input dtype, then ``+ ln p``, visibility mask, softmax in float32 and ``@ V``
    in the input dtype. Its score matrix is ``[B, H, T, C]``: meant for ``T = 1`` (or a few tokens).
    """
    batch, num_heads, q_len, head_dim = q.shape
    kv_heads = keys.shape[1]
    group_size = num_heads // kv_heads
    q_grouped = q.reshape(batch, kv_heads, group_size * q_len, head_dim)
    logits = torch.matmul(q_grouped, keys.transpose(-1, -2)).float() * (1.0 / math.sqrt(head_dim))
    logits = logits.view(batch, kv_heads, group_size, q_len, -1)
    q_pos = q_positions[:, None, None, :, None]
    kv_pos = kv_positions[:, :, None, None, :]
    visible = kv_pos <= q_pos
    if sliding_window is not None:
        visible = visible & (q_pos - kv_pos < sliding_window)
    logits = torch.where(visible, logits + log_votes[:, :, None, None, :], -float("inf"))
    row_max = logits.amax(dim=-1, keepdim=True)
    weights = torch.exp(logits - torch.where(torch.isfinite(row_max), row_max, 0.0))
    weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    out = torch.matmul(weights.view(batch, kv_heads, group_size * q_len, -1).to(values.dtype), values)
    return out.view(batch, num_heads, q_len, head_dim)


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
