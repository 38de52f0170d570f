"""Small scoring kernels shared by KeepKV's merge path: group reference log-scores, cosine matching, log-space EMA.

Paper: Tian et al., "KeepKV: Eliminating Output Perturbation in KV Cache Compression for Efficient LLMs
Inference", arXiv 2504.09936 (spec ``shared/spec/keepkv.md`` §3, §4, §6).

Shapes: ``[batch, kv_heads, n, head_dim]`` for keys, ``[batch, kv_heads, G, head_dim]`` (or
``[batch, kv_heads, G, T, head_dim]``) for the ``G`` query heads of each KV head's GQA group. Every function works
in float32 (float64 when its inputs are float64), on the inputs' device, with no host synchronisation, so each
one can be traced by ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "compute_dtype",
    "cosine_match",
    "ema_log_debias",
    "ema_log_scores",
    "ema_log_update",
    "group_log_scores",
    "head_logits",
]


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any tensor is float64, else float32 (the precision of all merge / scoring maths)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def head_logits(queries: Tensor, keys: Tensor) -> Tensor:
    """Per query head logits ``l_{g,i} = q_g·k_i / sqrt(d)``.

    Args:
        queries: ``[B, H_kv, G, D]`` or ``[B, H_kv, G, T, D]``.
        keys: ``[B, H_kv, N, D]``.
    Returns:
        ``[B, H_kv, G, N]`` or ``[B, H_kv, G, T, N]`` in the compute dtype.
    """
    dtype = compute_dtype(queries, keys)
    keys = keys.to(dtype)
    queries = queries.to(dtype)
    scale = 1.0 / math.sqrt(keys.shape[-1])
    if queries.dim() == 4:
        return torch.matmul(queries, keys.transpose(-1, -2)) * scale
    return torch.matmul(queries, keys[:, :, None].transpose(-1, -2)) * scale


def group_log_scores(queries: Tensor, keys: Tensor) -> Tensor:
    """Reference log-score of a GQA group (spec §6): the log of the group's mean unnormalised score,

    ``ln s_i = ln( (1/G) sum_g exp(q_g·k_i / sqrt(d)) ) = logsumexp_g(q_g·k_i / sqrt(d)) - ln G``.

    With ``G = 1`` this is the plain logit ``q·k_i / sqrt(d)``, the paper's ``ln s_i``.

    Args:
        queries: ``[B, H_kv, G, D]`` (-> ``[B, H_kv, N]``) or ``[B, H_kv, G, T, D]`` (-> ``[B, H_kv, T, N]``).
        keys: ``[B, H_kv, N, D]``.
    """
    logits = head_logits(queries, keys)
    return torch.logsumexp(logits, dim=2) - math.log(logits.shape[2])


def cosine_match(
    evicted_keys: Tensor, kept_keys: Tensor, threshold: float | Tensor,
    kept_valid: Tensor | None = None, evicted_valid: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Match each evicted key to its most cosine-similar kept key (spec §3 step 2; the paper's ``T = 0.8``).

    ``best_e = argmax_c cos(k_e, k_c)`` over the valid kept keys (the first index among exact ties), and
    ``merge_e = cos(k_e, k_best) > threshold`` (strictly), and both entries valid. A zero key has cosine 0 with
    every key.

    Args:
        evicted_keys: ``[B, H_kv, E, D]``; kept_keys: ``[B, H_kv, K, D]``.
        threshold: a float, or a tensor broadcastable to ``[B, H_kv, E]`` (a tensor avoids recompiles when the
            value changes under ``torch.compile``).
        kept_valid: ``[B, H_kv, K]`` bool (default all True); evicted_valid: ``[B, H_kv, E]`` bool.
    Returns:
        ``(best [B, H_kv, E] int64 index into the kept axis, similarity [B, H_kv, E], merge_mask [B, H_kv, E])``.
        With no valid kept key, ``best`` is 0, ``similarity`` is ``-inf`` and ``merge_mask`` is False.
    """
    dtype = compute_dtype(evicted_keys, kept_keys)
    eps = torch.finfo(dtype).tiny ** 0.5
    evicted = evicted_keys.to(dtype)
    kept = kept_keys.to(dtype)
    evicted = evicted / torch.linalg.vector_norm(evicted, dim=-1, keepdim=True).clamp_min(eps)
    kept = kept / torch.linalg.vector_norm(kept, dim=-1, keepdim=True).clamp_min(eps)
    similarity = torch.matmul(evicted, kept.transpose(-1, -2))  # [B, H, E, K]
    if kept_valid is not None:
        similarity = similarity.masked_fill(~kept_valid[:, :, None, :], -float("inf"))
    best = torch.argmax(similarity, dim=-1)
    best_similarity = similarity.gather(-1, best[..., None])[..., 0]
    merge_mask = best_similarity > threshold
    if evicted_valid is not None:
        merge_mask = merge_mask & evicted_valid
    return best, best_similarity, merge_mask


def ema_log_update(log_state: Tensor, log_score: Tensor, alpha: float, update: Tensor | None = None) -> Tensor:
    """One step of KeepKV's score EMA (spec §4), ``S_t = a S_{t-1} + (1 - a) s_t``, in log space:

    ``ln S_t = logaddexp(ln a + ln S_{t-1}, ln(1 - a) + ln s_t)``. Start from ``ln S_0 = -inf``.

    Args:
        log_state: ``ln S_{t-1}`` (any shape); log_score: ``ln s_t`` (same shape, ``-inf`` allowed).
        alpha: the decay ``a`` in ``(0, 1)``.
        update: optional bool mask; where False the state is returned unchanged (entry not seen by this query).
    Returns the (not bias-corrected) new state; see :func:`ema_log_debias`.
    """
    new_state = torch.logaddexp(log_state + math.log(alpha), log_score + math.log1p(-alpha))
    if update is not None:
        new_state = torch.where(update, new_state, log_state)
    return new_state


def ema_log_debias(log_state: Tensor, steps: Tensor, alpha: float) -> Tensor:
    """Bias correction of the EMA (spec §4): ``ln(S_t / (1 - a^t)) = ln S_t - ln(1 - a^t)``.

    ``steps``: the number ``t`` of updates each entry received (integer tensor broadcastable to ``log_state``);
    ``-inf`` where ``t == 0``. The corrected EMA of a constant score ``s`` is exactly ``s``.
    """
    steps_f = steps.to(log_state.dtype)
    correction = torch.log1p(-torch.exp(steps_f.clamp_min(1) * math.log(alpha)))
    return torch.where(steps > 0, log_state - correction, torch.full_like(log_state, -float("inf")))


def ema_log_scores(log_scores: Tensor, alpha: float, visible: Tensor | None = None) -> Tensor:
    """The bias-corrected EMA of ``exp(log_scores)`` over a window of queries (axis -2, oldest first).

    Equals running :func:`ema_log_update` over the window (skipping queries that did not see an entry) and then
    :func:`ema_log_debias` with the number ``m`` of queries that saw it, in closed form:
    ``ln S = logsumexp_j( ln(1 - a) + n_j ln a + ln s_j ) - ln(1 - a^m)``, ``n_j`` = visible queries after ``j``.

    Args:
        log_scores: ``[..., T, N]`` log-scores (e.g. :func:`group_log_scores` of the window queries).
        alpha: the decay ``a``.
        visible: ``[..., T, N]`` bool (broadcastable), which query saw which entry (default all).
    Returns ``[..., N]``; ``-inf`` where no query saw the entry.
    """
    if visible is None:
        visible = torch.ones_like(log_scores, dtype=torch.bool)
    visible = visible.expand_as(log_scores)
    counts = visible.to(torch.int64)
    later = counts.flip(-2).cumsum(-2).flip(-2) - counts
    terms = math.log1p(-alpha) + later.to(log_scores.dtype) * math.log(alpha) + log_scores
    terms = terms.masked_fill(~visible, -float("inf"))
    return ema_log_debias(torch.logsumexp(terms, dim=-2), counts.sum(-2), alpha)
