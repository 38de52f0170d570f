"""The scoring maths every compression method shares: logits, group log-scores, cosine matching, score EMA,
pooling along the cache.

One implementation of each formula, used by the cache (:mod:`keepkv.cache.compressed`: the window and query
attention), the methods (:mod:`keepkv.cache.methods`: KeepKV's reference scores and matching, D2O's matching,
SnapKV's and KeepKV's pooling), the merge op (:mod:`keepkv.ops.merge`) and the reference attention
(:mod:`keepkv.ops.attention`). It lives in ``ops`` because it is pure tensor maths on plain tensors (no cache or
method object), like the merge and attention kernels that call it.

Paper: Tian et al., "KeepKV: Eliminating Output Perturbation in KV Cache Compression for Efficient LLMs
Inference", arXiv 2504.09936 (KeepKV spec §3 matching, §4 EMA, §6 GQA group score).

Shapes: ``[batch, kv_heads, n, head_dim]`` for keys, ``[batch, kv_heads, G, head_dim]`` (or
``[batch, kv_heads, G, T, head_dim]``) for the ``G`` query heads of each KV head's GQA group. Every function works
in float32 (float64 when its inputs are float64), on the inputs' device, with no host synchronisation, so each
one can be traced by ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "POOLINGS",
    "compute_dtype",
    "cosine_best_match",
    "cosine_match",
    "ema_log_debias",
    "ema_log_scores",
    "ema_log_update",
    "group_log_scores",
    "head_logits",
    "log_mean_exp",
    "pool_along_slots",
]

POOLINGS = ("maxpool", "avgpool")


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any tensor is float64, else float32 (the precision of all merge / scoring maths)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def head_logits(queries: Tensor, keys: Tensor) -> Tensor:
    """Per query head logits ``l_{g,i} = q_g·k_i / sqrt(d)``, in the compute dtype.

    Args:
        queries: ``[B, H_kv, G, D]`` or ``[B, H_kv, G, T, D]`` (the ``G`` query heads of each KV head).
        keys: ``[B, H_kv, N, D]``.
    Returns:
        ``[B, H_kv, G, N]`` or ``[B, H_kv, G, T, N]``. The ``G x T`` query rows of a KV head go through one
        ``[G*T, D] x [D, N]`` product (keys read once per KV head).
    """
    dtype = compute_dtype(queries, keys)
    batch, kv_heads, count, dim = keys.shape
    rows = queries.to(dtype).reshape(batch, kv_heads, -1, dim)
    logits = torch.matmul(rows, keys.to(dtype).transpose(-1, -2)) / math.sqrt(dim)
    return logits.view(*queries.shape[:-1], count)


def log_mean_exp(logits: Tensor, dim: int) -> Tensor:
    """``ln mean_g exp(l_g) = logsumexp_g(l_g) - ln G`` along ``dim``: the log of a GQA group's mean score
    (spec §6) from its per-head logits (``-inf`` stays ``-inf``)."""
    return torch.logsumexp(logits, dim=dim) - math.log(logits.shape[dim])


def group_log_scores(queries: Tensor, keys: Tensor) -> Tensor:
    """Reference log-score of a GQA group (spec §6): the log of the group's mean unnormalised score,

    ``ln s_i = ln( (1/G) sum_g exp(q_g·k_i / sqrt(d)) ) = logsumexp_g(q_g·k_i / sqrt(d)) - ln G``.

    With ``G = 1`` this is the plain logit ``q·k_i / sqrt(d)``, the paper's ``ln s_i``.

    Args:
        queries: ``[B, H_kv, G, D]`` (-> ``[B, H_kv, N]``) or ``[B, H_kv, G, T, D]`` (-> ``[B, H_kv, T, N]``).
        keys: ``[B, H_kv, N, D]``.
    """
    return log_mean_exp(head_logits(queries, keys), dim=2)


def cosine_best_match(evicted_keys: Tensor, kept_keys: Tensor, kept_valid: Tensor | None = None
                      ) -> tuple[Tensor, Tensor]:
    """Each evicted key's most cosine-similar valid kept key: ``best_e = argmax_c cos(k_e, k_c)`` (the first
    index among exact ties) and that similarity. A zero key has cosine 0 with every key.

    Args:
        evicted_keys: ``[B, H_kv, E, D]``; kept_keys: ``[B, H_kv, K, D]``; kept_valid: ``[B, H_kv, K]`` bool (full
            shapes, not broadcast). An invalid kept key never wins, whatever it holds (even non-finite).
    Returns:
        ``(best [B, H_kv, E] int64 index into the kept axis, similarity [B, H_kv, E])``; with no valid kept key
        ``best`` is 0 and ``similarity`` is ``-inf``.
    """
    dtype = compute_dtype(evicted_keys, kept_keys)
    evicted = F.normalize(evicted_keys.to(dtype), dim=-1)
    kept = F.normalize(kept_keys.to(dtype), dim=-1)
    if kept_valid is None:
        similarity = torch.matmul(evicted, kept.transpose(-1, -2))  # [B, H, E, K]
    else:
        # the mask as the matmul's additive input (0 or -inf per kept key): computed once per kept key, where a
        # masked_fill after the matmul is fused by inductor into the max and recomputed for every evicted row
        batch, heads, count, dim = evicted.shape
        kept_count = kept.shape[2]
        kept = torch.where(kept_valid[..., None], kept, 0.0)  # -inf + a non-finite product would be NaN
        bias = torch.where(kept_valid, 0.0, -float("inf")).to(dtype).reshape(batch * heads, 1, kept_count)
        similarity = torch.baddbmm(bias, evicted.reshape(batch * heads, count, dim),
                                   kept.reshape(batch * heads, kept_count, dim).transpose(-1, -2))
        similarity = similarity.reshape(batch, heads, count, kept_count)
    best_similarity, best = similarity.max(dim=-1)
    return best, best_similarity


def cosine_match(
    evicted_keys: Tensor, kept_keys: Tensor, threshold: float | Tensor,
    kept_valid: Tensor | None = None, evicted_valid: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """KeepKV's matching (spec §3 step 2; the paper's ``T = 0.8``): :func:`cosine_best_match`, merged only if
    ``min(cos(k_e, k_best), 1) > threshold`` (strictly) and the evicted entry is valid. The cosine is capped at 1
    for the test because rounding can put two parallel keys' cosine a few ulps above it: ``threshold=1`` merges
    nothing (a configuration's own base selector), whatever the keys.

    Args:
        threshold: a float, or a tensor broadcastable to ``[B, H_kv, E]`` (a tensor avoids recompiles when the
            value changes under ``torch.compile``); evicted_valid: ``[B, H_kv, E]`` bool (default all True).
    Returns:
        ``(best, similarity, merge_mask)`` ``[B, H_kv, E]``; ``merge_mask`` is False where no kept key is valid.
    """
    best, best_similarity = cosine_best_match(evicted_keys, kept_keys, kept_valid)
    merge_mask = best_similarity.clamp(max=1.0) > threshold
    if evicted_valid is not None:
        merge_mask = evicted_valid & merge_mask
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
    correction = torch.log1p(-torch.pow(torch.full_like(log_state, alpha), steps.clamp_min(1)))
    return torch.where(steps > 0, log_state - correction, -float("inf"))


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


def pool_along_slots(scores: Tensor, kernel_size: int, pooling: str) -> Tensor:
    """SnapKV's 1-D pooling of scores along the cache (last axis; stride 1, ``kernel_size // 2`` zero padding,
    same length), so the neighbours of an important entry score with it. ``pooling`` is one of :data:`POOLINGS`.

    ``avgpool`` divides by ``kernel_size`` at the borders too (the padding counts), ``maxpool`` ignores the
    padding; for non-negative scores both equal pooling with zeros outside.
    """
    if kernel_size <= 1:
        return scores
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    if pooling == "maxpool":
        pooled = F.max_pool1d(flat, kernel_size, stride=1, padding=kernel_size // 2)
    else:
        pooled = F.avg_pool1d(flat, kernel_size, stride=1, padding=kernel_size // 2, count_include_pad=True)
    return pooled.reshape(shape)
