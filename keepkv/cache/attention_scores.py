"""Attention recomputed from a cache's stored keys and observed queries (the scores compression methods rank by).

:class:`AttentionScores` is a part of :class:`~keepkv.cache.compressed.CompressedLayerCache` (its observation state
lives there): pure functions of the buffers ``keys``, ``log_votes``, ``positions``, ``window_queries`` and
``window_positions``, nothing written.

- :meth:`~AttentionScores.window_log_scores`: ``ln s_{t,i} = q_t·k_i / sqrt(d)`` for every window query ``t`` and
  slot ``i``, ``-inf`` where ``i`` is invisible to ``t`` (later position, empty slot, outside the sliding window);
  computed once per compression inside :meth:`~AttentionScores.reuse_window_scores`;
- :meth:`~AttentionScores.window_attention` (and its window mean), :meth:`~AttentionScores.newest_query_attention`
  and :meth:`~AttentionScores.query_attention`: the vote-weighted attention probabilities the model computes.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor

from keepkv.cache.kv_cache import POSITION_DTYPE
from keepkv.ops.flex_mods import visible as positions_visible
from keepkv.ops.scores import head_logits


class AttentionScores:
    """Attention recomputation over a :class:`~keepkv.cache.compressed.CompressedLayerCache`'s buffers."""

    keys: Tensor
    log_votes: Tensor
    positions: Tensor
    window_queries: Tensor
    window_positions: Tensor
    sliding_window: int | None
    _window_scores_memo: list[Tensor] | None

    def query_attention(self, queries: Tensor, positions: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Vote-weighted attention of arbitrary rotated ``queries [batch, heads, T, dim]`` (at ``positions
        [batch, T]``, real where ``valid``) over the current slots, exactly as the model computes it:

        ``A[g, t, i] = p_i exp(q_{g,t}·k_i/sqrt(d)) / sum_j p_j exp(q_{g,t}·k_j/sqrt(d))`` over the slots visible
        to ``t``. Returns ``(attention [batch, kv_heads, group, T, capacity] float32, visible [batch, kv_heads, 1,
        T, capacity] bool)``; rows of padding queries are 0.
        """
        batch, kv_heads, _, dim = self.keys.shape
        grouped = queries.reshape(batch, kv_heads, -1, *queries.shape[2:])  # [B, Hkv, G, T, D]
        logits = head_logits(grouped, self.keys)
        q_pos = positions.to(POSITION_DTYPE)[:, None, None, :, None]
        kv_pos = self.positions[:, :, None, None, :]
        live = torch.isfinite(self.log_votes)[:, :, None, None, :]
        visible = positions_visible(kv_pos, q_pos, self.sliding_window) & valid[:, None, None, :, None] & live
        # few passes over the [B, H_kv, G, T, C] block (it is the largest tensor of a prefill chunk): the bias
        # ln p / -inf is built at [B, H_kv, 1, T, C] and added in place, then one softmax; a row with no visible
        # slot (padding query) is all -inf, gives NaN in softmax, and is set to 0
        logits.add_(self.log_votes[:, :, None, None, :].masked_fill(~visible, -float("inf")))
        attention = torch.softmax(logits, dim=-1)
        attention = attention.masked_fill_(~visible.any(dim=-1, keepdim=True), 0.0)
        return attention, visible

    def visible_from_window(self) -> Tensor:
        """``[batch, 1, w, capacity]`` bool: slot ``i`` is visible to window query ``t``."""
        q_pos = self.window_positions[:, None, :, None]
        kv_pos = self.positions[:, :, None, :]
        live = torch.isfinite(self.log_votes)[:, :, None, :]
        return positions_visible(kv_pos, q_pos, self.sliding_window) & (q_pos >= 0) & live

    @contextlib.contextmanager
    def reuse_window_scores(self) -> Iterator[None]:
        """Within this block :meth:`window_log_scores` is computed once and reused (a compression asks for it
        from its scorer and again for KeepKV's merge reference: the same ``[G*w, D] x [D, C]`` product twice).
        Valid while keys, positions and window do not change: a compression scores everything before it merges."""
        self._window_scores_memo = []
        try:
            yield
        finally:
            self._window_scores_memo = None

    def window_log_scores(self) -> Tensor:
        """``[batch, kv_heads, group, w, capacity]`` float32 logits ``q_t·k_i/sqrt(d)`` (``-inf`` if invisible)."""
        memo = self._window_scores_memo
        if memo:
            return memo[0]
        logits = self._window_log_scores()
        if memo is not None:
            memo.append(logits)
        return logits

    def _window_log_scores(self) -> Tensor:
        batch, kv_heads = self.keys.shape[:2]
        logits = head_logits(self.window_queries.view(batch, kv_heads, -1, *self.window_queries.shape[2:]), self.keys)
        return logits.masked_fill(~self.visible_from_window()[:, :, None], -float("inf"))

    def window_attention(self) -> Tensor:
        """``[batch, kv_heads, group, w, capacity]`` vote-weighted attention probabilities of the window queries
        (rows of absent queries are 0)."""
        logits = self.window_log_scores() + self.log_votes[:, :, None, None, :]
        row_max = logits.amax(dim=-1, keepdim=True)
        weights = torch.exp(logits - torch.where(torch.isfinite(row_max), row_max, 0.0))
        return weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)

    def window_mean_attention(self) -> Tensor:
        """``[batch, kv_heads, group, capacity]``: each query head's attention averaged over the row's present
        window queries (:meth:`window_attention`; 0 for rows without queries)."""
        present = (self.window_positions >= 0).sum(dim=1).clamp_min(1).to(torch.float32)  # [B]
        return self.window_attention().sum(dim=3) / present[:, None, None, None]

    def newest_query_attention(self) -> Tensor:
        """``[batch, kv_heads, group, capacity]``: attention of each row's newest window query (TOVA, CaM)."""
        newest_queries = self.window_queries[:, :, -1:]
        newest_positions = self.window_positions[:, -1:]
        attention, _ = self.query_attention(newest_queries, newest_positions, newest_positions >= 0)
        return attention[:, :, :, 0]
