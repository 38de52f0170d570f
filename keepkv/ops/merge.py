"""The merge op: fold evicted KV entries into kept ones, in place, for every KeepKV variant.

Paper: Tian et al., "KeepKV: Eliminating Output Perturbation in KV Cache Compression for Efficient LLMs
Inference", arXiv 2504.09936 (spec ``shared/spec/keepkv.md`` §2 and §5).

Notation per (batch row, KV head): a *group* is a kept target slot ``c`` plus every evicted slot ``e`` merged
into it (many-to-one). Each member ``i`` has votes ``p_i`` (``ln p_i = log_votes``) and a reference log-score
``ln s_i`` (``q·k_i/sqrt(d)`` for a reference query ``q``, or a prediction of it such as KeepKV's EMA), so its
vote-weighted mass is ``w_i = p_i s_i`` and ``pi_i = w_i / W`` with ``W = sum_i w_i``, ``P = sum_i p_i``.
The merged entry ``r`` gets

- votes ``p_r = P`` (votes add: their sum is conserved),
- value ``v_r = sum_i pi_i v_i``,
- key, by variant:

  ========== ==================================================================================================
  zip        ``k_r = lambda * kbar``, ``kbar = sum_i pi_i k_i``, ``lambda = (ln W - ln P) / sum_i pi_i ln s_i``
             (the paper's Eq. for ZIP-merging, Theorem 3). When ``ln s_i = q·k_i/sqrt(d)`` the denominator is
             ``q·kbar/sqrt(d)``, so ``p_r exp(q·k_r/sqrt(d)) = W`` and ``p_r s_r v_r = sum_i w_i v_i``: the
             softmax numerator and denominator for ``q`` are unchanged, the output for ``q`` is exactly the same.
  convex     ``k_r = kbar`` (the official code; not exact in general).
  keep-key   ``k_r = k_c``, the target's own key (not exact in general).
  minnorm    ``k_r = kbar + delta``, ``delta`` the least-norm correction with ``q_j·k_r/sqrt(d) = ln(sum_i p_i
             exp(q_j·k_i/sqrt(d))) - ln P`` for every reference query ``q_j`` at once (``ref_queries``, e.g. the
             ``G`` query heads of a GQA group): ``delta = Q^T (Q Q^T + eps I)^-1 (sqrt(d) t - Q kbar)``. Each
             query's softmax *denominator* is then unchanged (exact for ``R <= d`` independent queries). The
             output is exact for a query whose weights ``pi`` are the ones used for ``v_r`` — with one reference
             query (``G = 1``) that is every output; with ``G > 1`` heads sharing one value no single ``v_r`` can
             reproduce ``G`` different convex combinations, so only the denominators are exact per head.
  ========== ==================================================================================================

Guards: zip's scale is ill-conditioned when ``|sum_i pi_i ln s_i|`` is tiny (0/0) or ``lambda <= 0`` or
``lambda > max_scale`` (reference log-scores of mixed sign: ~6% of groups on SmolLM2's real activations). Such a
group takes the ``minnorm`` key for the same reference queries instead — the same logit target, reached by the
smallest key change, so the merge stays exact for the reference query — or, without reference queries, the
``convex`` key. A non-finite key (after the cast to the cache dtype) falls back to ``convex``. Every fallback
is counted in :class:`MergeStats`. No NaN or inf is ever written: keys/values are finite, ``log_votes`` is ``-inf`` only for
empty slots. Maths in float32 (float64 for float64 caches) and log space; cast back at the end.

Everything is vectorised over batch, heads and merges (group sums via ``scatter_add`` / ``scatter_reduce``), with
no host sync, so :data:`merge_into_kept_compiled` compiles to one fused graph (``fullgraph=True``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

MERGE_VARIANTS = ("zip", "convex", "keep-key", "minnorm")
MAX_SCALE = 16.0  # zip: a key rescaled by more than this is treated as ill-conditioned
MIN_DENOMINATOR = 1e-4  # zip: |sum_i pi_i ln s_i| below this is 0/0


@dataclass
class MergeStats:
    """Counters accumulated on the device (read them for reports, not in the hot path).

    ``merged``: evicted entries folded into a kept one; ``dropped``: evicted entries dropped without a merge;
    ``groups``: targets that received at least one merge; ``fallbacks``: groups whose zip / minnorm key was
    ill-conditioned (0/0, negative or huge scale, non-finite) and that used the convex key instead.
    """

    merged: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    dropped: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    groups: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    fallbacks: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))

    def as_dict(self) -> dict[str, int]:
        return {name: int(getattr(self, name)) for name in ("merged", "dropped", "groups", "fallbacks")}


def _group_logsumexp(values: Tensor, member_of: Tensor, is_member: Tensor, size: int) -> Tensor:
    """``out[..., c] = logsumexp(values[..., i] for members i of group c)`` (``-inf`` for empty groups).

    ``values [..., N, *rest]``, ``member_of [..., N]`` group index of each item, ``is_member [..., N]``.
    """
    rest = values.shape[member_of.dim():]
    index = member_of.reshape(*member_of.shape, *([1] * len(rest))).expand_as(values)
    masked = values.masked_fill(~is_member.reshape(*is_member.shape, *([1] * len(rest))), -float("inf"))
    shape = (*member_of.shape[:-1], size, *rest)
    peak = torch.full(shape, -float("inf"), dtype=values.dtype, device=values.device)
    peak = peak.scatter_reduce(member_of.dim() - 1, index, masked, reduce="amax", include_self=True)
    shift = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.zeros(shape, dtype=values.dtype, device=values.device)
    total = total.scatter_add(member_of.dim() - 1, index, torch.exp(masked - shift.gather(member_of.dim() - 1, index)))
    return torch.where(total > 0, shift + torch.log(total), -float("inf"))


def _minnorm_keys(
    key_mean: Tensor, member_keys: Tensor, log_p: Tensor, log_P: Tensor, member_of: Tensor, is_member: Tensor,
    queries: Tensor, capacity: int,
) -> tuple[Tensor, Tensor]:
    """``kbar + delta`` with the least-norm ``delta`` such that for every reference query ``q_j``
    ``q_j·k_r/sqrt(d) = ln(sum_i p_i exp(q_j·k_i/sqrt(d))) - ln P`` (per group), and whether it is finite.

    ``delta = Q^T (Q Q^T + eps I)^-1 (sqrt(d) t - Q kbar)``; ``eps`` is a ridge of 16 machine epsilons (relative to
    the queries' squared norm) so that dependent queries (e.g. identical heads) stay solvable without costing
    exactness. Returns ``([B, H, C, D], [B, H, C] bool)``.
    """
    dim = key_mean.shape[-1]
    scale = dim ** 0.5
    member_logits = torch.matmul(member_keys, queries.transpose(-1, -2)) / scale  # [B, H, C+M, R]
    log_targets = _group_logsumexp(log_p[..., None] + member_logits, member_of, is_member, capacity)
    log_targets = log_targets - log_P[..., None]  # [B, H, C, R]
    residual = scale * log_targets - torch.matmul(key_mean, queries.transpose(-1, -2))
    gram = torch.matmul(queries, queries.transpose(-1, -2))
    ridge = 16 * torch.finfo(gram.dtype).eps * gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    coefficients = torch.linalg.solve(gram + ridge[..., None, None] * eye, residual.transpose(-1, -2))
    corrected = key_mean + torch.matmul(coefficients.transpose(-1, -2), queries)
    finite = torch.isfinite(corrected).all(-1) & torch.isfinite(log_targets).all(-1)
    return corrected, finite


def merge_into_kept(
    keys: Tensor, values: Tensor, log_votes: Tensor, evicted_idx: Tensor, target_idx: Tensor, merge_mask: Tensor,
    ref_log_scores: Tensor, ref_queries: Tensor | None, variant: str = "zip", *, stats: MergeStats | None = None,
    max_scale: float = MAX_SCALE,
) -> None:
    """Merge ``keys/values/log_votes`` entries ``evicted_idx`` into ``target_idx`` in place (see module doc).

    Args:
        keys, values: ``[B, H_kv, C, D]`` cache buffers (any float dtype); log_votes ``[B, H_kv, C]`` float32.
        evicted_idx, target_idx: ``[B, H_kv, M]`` slots; targets must not be evicted. Many-to-one allowed.
        merge_mask: ``[B, H_kv, M]`` bool; False = drop that evicted entry without merging.
        ref_log_scores: ``[B, H_kv, C]`` ``ln s_i`` of every slot for the reference (weights ``pi``, zip's scale).
        ref_queries: ``[B, H_kv, R, D]`` reference queries for ``minnorm`` (ignored by the other variants).
        variant: one of :data:`MERGE_VARIANTS`.
    Evicted slots (merged or dropped) become empty: ``log_votes = -inf``, zero key and value.
    """
    if variant not in MERGE_VARIANTS:
        raise ValueError(f"unknown merge variant {variant!r}; allowed: {', '.join(MERGE_VARIANTS)}")
    if variant == "minnorm" and ref_queries is None:
        raise ValueError("the minnorm variant needs ref_queries [batch, kv_heads, R, head_dim]")
    compute = torch.float64 if keys.dtype == torch.float64 else torch.float32
    batch, heads, capacity, dim = keys.shape

    # members: every slot is the "target" of itself; merged evicted slots are members of their target's group
    slots = torch.arange(capacity, device=keys.device).expand(batch, heads, capacity)
    member_of = torch.cat((slots, target_idx), dim=-1)  # [B, H, C + M]
    member_slot = torch.cat((slots, evicted_idx), dim=-1)
    is_member = torch.cat((torch.isfinite(log_votes), merge_mask), dim=-1)
    merges_received = torch.zeros(batch, heads, capacity, dtype=torch.int32, device=keys.device)
    receives = merges_received.scatter_add(2, target_idx, merge_mask.to(torch.int32)) > 0  # [B, H, C]

    evicted_live = torch.isfinite(log_votes.gather(2, evicted_idx))
    log_p = log_votes.to(compute).gather(2, member_slot)
    log_s = ref_log_scores.to(compute).gather(2, member_slot)
    log_s = torch.nan_to_num(log_s, nan=-float("inf"))
    log_w = log_p + log_s
    log_P = _group_logsumexp(log_p, member_of, is_member, capacity)  # [B, H, C]
    log_W = _group_logsumexp(log_w, member_of, is_member, capacity)
    weight = torch.exp(log_w - log_W.gather(2, member_of)).masked_fill(~is_member, 0.0)  # pi_i, [B, H, C+M]
    weight = torch.nan_to_num(weight, nan=0.0)
    # a group whose reference mass is 0 (every score -inf) weighs its members by votes instead
    massless = ~torch.isfinite(log_W)
    vote_weight = torch.exp(log_p - log_P.gather(2, member_of)).masked_fill(~is_member, 0.0)
    weight = torch.where(massless.gather(2, member_of), torch.nan_to_num(vote_weight, nan=0.0), weight)

    member_keys = keys.to(compute).gather(2, member_slot[..., None].expand(-1, -1, -1, dim))
    member_values = values.to(compute).gather(2, member_slot[..., None].expand(-1, -1, -1, dim))
    group_index = member_of[..., None].expand(-1, -1, -1, dim)
    zeros = torch.zeros(batch, heads, capacity, dim, dtype=compute, device=keys.device)
    key_mean = zeros.scatter_add(2, group_index, weight[..., None] * member_keys)  # kbar
    value_mean = zeros.scatter_add(2, group_index, weight[..., None] * member_values)  # v_r

    minnorm_keys, minnorm_ok = None, None
    if variant == "minnorm" or (variant == "zip" and ref_queries is not None):
        minnorm_keys, minnorm_ok = _minnorm_keys(
            key_mean, member_keys, log_p, log_P, member_of, is_member, ref_queries.to(compute), capacity
        )
    fallback = torch.zeros_like(receives)
    if variant == "zip":
        denominator = torch.zeros(batch, heads, capacity, dtype=compute, device=keys.device)
        finite_log_s = torch.where(torch.isfinite(log_s), log_s, torch.zeros_like(log_s))
        denominator = denominator.scatter_add(2, member_of, weight * finite_log_s)
        safe = denominator.abs() >= MIN_DENOMINATOR
        lam = (log_W - log_P) / torch.where(safe, denominator, torch.ones_like(denominator))
        good = safe & torch.isfinite(lam) & (lam > 0) & (lam <= max_scale) & ~massless
        if minnorm_keys is not None:
            second_choice = torch.where(minnorm_ok[..., None], minnorm_keys, key_mean)
        else:
            second_choice = key_mean
        new_keys = torch.where(good[..., None], lam[..., None] * key_mean, second_choice)
        fallback = ~good
    elif variant == "minnorm":
        new_keys = torch.where(minnorm_ok[..., None], minnorm_keys, key_mean)
        fallback = ~minnorm_ok
    elif variant == "keep-key":
        new_keys = keys.to(compute)
    else:
        new_keys = key_mean

    cast_keys = new_keys.to(keys.dtype)
    bad_cast = ~torch.isfinite(cast_keys).all(-1)
    cast_keys = torch.where(bad_cast[..., None], key_mean.to(keys.dtype), cast_keys)
    fallback = (fallback | bad_cast) & receives
    cast_values = value_mean.to(values.dtype)

    write = receives[..., None]
    keys.copy_(torch.where(write, cast_keys, keys))
    values.copy_(torch.where(write, cast_values, values))
    log_votes.copy_(torch.where(receives, log_P.to(log_votes.dtype), log_votes))
    # evicted slots (merged or dropped) become empty
    batch_index = torch.arange(batch, device=keys.device)[:, None, None].expand_as(evicted_idx)
    head_index = torch.arange(heads, device=keys.device)[None, :, None].expand_as(evicted_idx)
    keys[batch_index, head_index, evicted_idx] = 0
    values[batch_index, head_index, evicted_idx] = 0
    log_votes[batch_index, head_index, evicted_idx] = -float("inf")

    if stats is not None:
        stats.merged = stats.merged.to(keys.device) + merge_mask.sum()
        stats.dropped = stats.dropped.to(keys.device) + (evicted_live & ~merge_mask).sum()
        stats.groups = stats.groups.to(keys.device) + receives.sum()
        stats.fallbacks = stats.fallbacks.to(keys.device) + fallback.sum()


merge_into_kept_compiled = torch.compile(merge_into_kept, fullgraph=True, dynamic=False)
