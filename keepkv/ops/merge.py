"""The merge op: fold evicted KV entries into kept ones, in place, for every KeepKV variant.

Paper: Tian et al., "KeepKV: Eliminating Output Perturbation in KV Cache Compression for Efficient LLMs
Inference", arXiv 2504.09936 (electoral votes, ZIP-merging and its exactness, Theorem 3); the "spec §N" below
are the sections of keepkv's KeepKV spec: §1 votes, §2 ZIP, §4 EMA reference, §5 variants, §6 GQA, §8 guard.

**Groups.** Per (batch row, KV head), a *group* is one kept target slot ``c`` plus every evicted slot ``e``
merged into it (many-to-one, all in one N-way step). Each member ``i`` has votes ``p_i`` (``ln p_i =
log_votes``) and a reference log-score ``ln s_i``; ``w_i = p_i s_i`` is its vote-weighted mass,
``W = sum_i w_i``, ``P = sum_i p_i`` and ``pi_i = w_i / W``. The merged entry ``r`` gets

- votes ``p_r = P`` (votes add: their sum over the cache is conserved),
- value ``v_r = sum_i pi_i v_i``,
- a key chosen by the variant (below).

**The reference** (what ``ln s_i`` is). Two ways, one meaning each:

- ``ref_log_scores [B, H_kv, C]`` given: any per-slot numbers, e.g. KeepKV's EMA prediction of future scores
  (spec §4). zip applies the paper's formula as it stands, ``lambda = (ln W - ln P) / sum_i pi_i ln s_i``. This
  is exact (Theorem 3) when ``ln s`` is linear in the key, i.e. one query and ``ln s_i = q·k_i/sqrt(d)``; for a
  prediction it is the paper's rule and exact for no particular query.
- ``ref_log_scores=None``: the scores of the real queries ``ref_queries [B, H_kv, G, D]``, the group mean-score of
  spec §6, ``ln s(k) = ln mean_g exp(q_g·k/sqrt(d)) = logsumexp_g(q_g·k/sqrt(d)) - ln G``
  (:func:`keepkv.ops.scores.group_log_scores`); zip then solves ``ln s(lambda kbar) = ln W - ln P`` exactly.

With ``G = 1`` and ``ref_log_scores = q·k/sqrt(d)`` both ways are the same rule. The other variants use the
reference only for the weights ``pi`` (minnorm's key targets always come from ``ref_queries``). A group whose
reference mass ``W`` is 0 (every ``ln s_i = -inf``) weighs its members by votes.

**Variants** (``kbar = sum_i pi_i k_i``; ``l_g(k) = q_g·k/sqrt(d)``; ``Z_g = sum_i p_i exp(l_g(k_i))`` is head
``g``'s softmax denominator, ``o_g`` its output):

========== ==========================================================================================================
zip        ``k_r = lambda kbar`` (ZIP-merging). Then ``p_r s(k_r) = W`` and ``p_r s(k_r) v_r = sum_i w_i v_i``: the
           numerator and denominator of the vote-weighted softmax *for the reference* are unchanged, so the
           reference output ``o_ref = sum_i p_i s_i v_i / sum_i p_i s_i`` is exactly unchanged (Theorem 3).
           ``G = 1``: that is the query's attention output. ``G > 1`` (queries as reference): ``s_i`` is the mean
           score, ``o_ref = sum_g Z_g o_g / sum_g Z_g`` (the denominator-weighted mean of the group's head outputs)
           and ``sum_g Z_g`` are exact; no single head's ``o_g`` or ``Z_g`` is. ``ln s(lambda kbar)`` is convex in
           ``lambda``: Newton's method from the linear estimate ``(ln W - ln P) / sum_i pi_i ln s_i`` (exact after
           one step for ``G = 1``), ``NEWTON_STEPS`` iterations, then a residual check.
convex     ``k_r = kbar`` (the official code). Not exact in general.
keep-key   ``k_r = k_c``, the target's own key (an empty target takes ``kbar``). Not exact in general.
minnorm    ``k_r = kbar + delta``, ``delta`` the least-norm solution of ``l_g(k_r) = t_g`` for every reference
           query at once, ``t_g = ln(sum_i p_i exp(l_g(k_i))) - ln P``:
           ``delta = Q^T (Q Q^T + eps I)^-1 (sqrt(d) t - Q kbar)`` (``Q = [G, D]``; ``eps`` = 16 machine epsilons
           times the mean ``|q_g|^2``). Then ``p_r exp(l_g(k_r)) = Z_g``: **every head's softmax denominator is
           unchanged** (``G <= d`` independent queries, or dependent ones with consistent targets). Numerators: one
           value cannot equal ``G`` different convex combinations ``sum_i pi^g_i v_i``, so the per-head outputs are
           exact only for ``G = 1``, identical queries or identical values. With the group mean-score as reference
           (``ref_log_scores=None`` or equal to it) ``v_r`` makes ``o_ref`` exact too, since the per-head
           denominators sum to the group one. So minnorm keeps what zip keeps plus every ``Z_g``; for ``G = 1``
           both are output-exact.
========== ==========================================================================================================

Merging identical entries (same ``k`` and ``v``) is exact for every query with every variant (``k_r = k``).

**Dominance guard** (``max_evicted_weight = m < 1``; spec §8). Nothing above stops the evicted members of a group
from outweighing the kept target (``sum_e pi_e > pi_c``), so one merge can overwrite a kept fact with its
neighbours. With ``m < 1`` the weights of a group that has a live target are capped before ``kbar`` and ``v_r``
are formed: ``pi_e <- pi_e * min(1, m / sum_e pi_e)``, ``pi_c <- 1 - min(m, sum_e pi_e)``; votes still add.
minnorm's key targets come from the members' logits and votes, not from ``pi``, so every head's softmax
denominator stays exact; the value (and zip's / convex's key) then leans to the kept entry, and the reference
output is exact only for groups the cap did not touch (counted in :class:`MergeStats` as ``capped``).
``m = 1`` (the default of this op) is the unguarded rule.

**Guards and fallbacks** (counted per reason in :class:`MergeStats`; a group counts once, under its first reason):

- ``zero_denominator``: zip's ``|sum_i pi_i ln s_i|`` (queries as reference: every ``|q_g·kbar|/sqrt(d)``) is
  below ``MIN_DENOMINATOR`` (0/0), or the group's reference mass ``W`` is 0.
- ``bad_scale``: zip's ``lambda`` is non-finite, ``<= 0`` or ``> max_scale``, or Newton did not converge (no
  positive root). With ``ref_log_scores`` given, ``lambda < 0`` exactly when ``ln(W / P) < 0 < sum_i pi_i ln s_i``
  (reference log-scores of mixed sign).
- ``bad_correction``: minnorm's key is non-finite or longer than ``max_scale`` times the group's longest key
  (nearly dependent queries with inconsistent targets).
- ``non_finite_key``: the key overflows when cast to the cache dtype (e.g. float16).

An ill-conditioned zip group takes ``zip_fallback``: ``"minnorm"`` (default; when ``ref_queries`` is given: the
logit targets of ``ref_queries`` reached by the smallest key change, so a single-query reference stays exact) or
``"convex"`` (``kbar``: the paper-faithful choice). Any key still unusable becomes ``kbar``, which is always finite
(a convex combination of cache keys). Nothing non-finite is written; ``log_votes`` is ``-inf`` only in empty slots.

**Cost.** Vectorised over batch, heads and merges, ``O(M log M + M (G + D))`` in the number ``M`` of evicted
entries and independent of the capacity ``C``: groups come from sorting the targets, group reductions are
one ``index_add_`` / ``scatter_reduce_`` each over the members sorted by group (:mod:`keepkv.ops.group_reduce`),
only member rows are read and cast, and each buffer is written by index assignment (``keys[b, h, slot] =
rows``). No host sync: :data:`merge_into_kept_compiled` traces to one graph with ``fullgraph=True``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from keepkv.ops.group_reduce import group_amax, group_sum
from keepkv.ops.scores import compute_dtype, log_mean_exp

MERGE_VARIANTS = ("zip", "convex", "keep-key", "minnorm")
ZIP_FALLBACKS = ("minnorm", "convex")
FALLBACK_REASONS = ("zero_denominator", "bad_scale", "bad_correction", "non_finite_key")
MAX_SCALE = 16.0  # a merged key scaled by more than this (zip's lambda; minnorm's length ratio) is ill-conditioned
MIN_DENOMINATOR = 1e-4  # zip: a reference log-score of kbar below this in magnitude is 0/0
NEWTON_STEPS = 12  # zip with G > 1 queries: Newton iterations on the (convex) group log-score of lambda * kbar


def _zeros_counter(size: tuple[int, ...] = ()) -> Tensor:
    """A counter made as an inference tensor, like every later value it takes (compressions run under
    ``torch.inference_mode``): a compiled compression then sees one kind of tensor and never recompiles for it."""
    with torch.inference_mode():
        return torch.zeros(size, dtype=torch.int64)


@dataclass
class MergeStats:
    """Counters accumulated on the device (read them for reports, not in the hot path).

    - ``merged``: evicted live entries folded into a kept one;
    - ``dropped``: evicted live entries dropped without a merge (``merge_mask`` False);
    - ``groups``: targets that received at least one merge;
    - ``fallbacks``: ``int64 [len(FALLBACK_REASONS)]``, groups that did not get their variant's own key, per
      reason (``zero_denominator``, ``bad_scale``, ``bad_correction``, ``non_finite_key``; see the module doc).
      Each group counts under its first reason only, so ``fallbacks.sum()`` is the number of groups that fell back.
    - ``capped``: groups whose evicted weight the dominance guard capped (``max_evicted_weight < 1``).
    """

    merged: Tensor = field(default_factory=_zeros_counter)
    capped: Tensor = field(default_factory=_zeros_counter)
    dropped: Tensor = field(default_factory=_zeros_counter)
    groups: Tensor = field(default_factory=_zeros_counter)
    fallbacks: Tensor = field(default_factory=lambda: _zeros_counter((len(FALLBACK_REASONS),)))

    def as_dict(self) -> dict[str, int]:
        """Host-side summary: ``merged``, ``dropped``, ``groups``, ``capped``, ``fallbacks`` (total) and one
        ``fallbacks_<reason>`` entry per reason."""
        report = {name: int(getattr(self, name)) for name in ("merged", "dropped", "groups", "capped")}
        per_reason = self.fallbacks.tolist()
        report["fallbacks"] = int(sum(per_reason))
        for reason, count in zip(FALLBACK_REASONS, per_reason):
            report[f"fallbacks_{reason}"] = int(count)
        return report


@dataclass(frozen=True)
class _Segments:
    """Members sorted by group (non-members last): ``sort_key [B, H, L]`` is each row's group in ``[0, M]`` (``M``
    for a non-member), ``group [B, H, L]`` the same clamped to ``[0, M)`` (for gathers; non-member rows must be
    masked by ``is_member``).

    Group reductions are the custom ops of :mod:`keepkv.ops.group_reduce`, which return new tensors: in-place
    scatter reductions could be reordered against their readers by inductor (``docs/profile.md``, "Measurements
    behind the code's choices"). Rows are sorted by group (stably: a group's evicted
    members in their listed order, its target last), and each group's sum adds them in that order.
    """

    sort_key: Tensor  # [B, H, L]
    group: Tensor  # [B, H, L]
    is_member: Tensor  # [B, H, L]
    groups: int

    def sum(self, values: Tensor) -> Tensor:
        """``[B, H, L, *rest]`` -> ``[B, H, M, *rest]``: per-group sums (0 for an empty group)."""
        return group_sum(values.contiguous(), self.sort_key, self.groups)[:, :, : self.groups]

    def amax(self, values: Tensor) -> Tensor:
        """Per-group maxima over members (``-inf`` for an empty group)."""
        return group_amax(values.contiguous(), self.sort_key, self.groups)[:, :, : self.groups]

    def spread(self, per_group: Tensor) -> Tensor:
        """``[B, H, M, *rest]`` -> ``[B, H, L, *rest]``: each row gets its group's value."""
        index = self.group.reshape(*self.group.shape, *([1] * (per_group.dim() - 3)))
        return per_group.gather(2, index.expand(*self.group.shape, *per_group.shape[3:]))

    def logsumexp(self, values: Tensor) -> Tensor:
        """Per-group ``logsumexp`` over members (``-inf`` for an empty group), shifted by the group maximum."""
        member = self.is_member.reshape(*self.is_member.shape, *([1] * (values.dim() - 3)))
        masked = values.masked_fill(~member, -float("inf"))
        peak = self.amax(masked)
        shift = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        total = self.sum(torch.exp(masked - self.spread(shift)))
        return torch.where(total > 0, shift + torch.log(total), torch.full_like(total, -float("inf")))


def _form_groups(target_idx: Tensor, merging: Tensor, capacity: int) -> tuple[Tensor, Tensor, Tensor]:
    """Compact group ids in ``[0, M)`` by sorting the targets (``O(M log M)``, independent of the capacity).

    Returns ``(group_of [B, H, M]`` the group of each entry, ``group_slot [B, H, M]`` the target slot of group
    ``j``, ``group_valid [B, H, M]``). Non-merging entries share a sentinel group (slot ``capacity``), never valid.
    """
    merges = target_idx.shape[-1]
    sort_key = torch.where(merging, target_idx, torch.full_like(target_idx, capacity))
    sorted_key, order = torch.sort(sort_key, dim=-1, stable=True)
    starts = torch.cat((torch.ones_like(sorted_key[..., :1]), (sorted_key[..., 1:] != sorted_key[..., :-1]).long()), -1)
    run = torch.cumsum(starts, dim=-1) - 1  # group id along the sorted order, non-decreasing
    group_of = run.gather(2, torch.argsort(order, dim=-1))
    wanted = torch.arange(merges, device=target_idx.device).expand_as(run).contiguous()
    first = torch.searchsorted(run.contiguous(), wanted)  # first sorted position of group j (M if none)
    group_slot = sorted_key.gather(2, first.clamp(max=merges - 1))
    group_slot = torch.where(first < merges, group_slot, torch.full_like(group_slot, capacity))
    return group_of, group_slot, group_slot < capacity


def _segments(member_group: Tensor, is_member: Tensor, groups: int) -> tuple[Tensor, _Segments]:
    """Sort members by group (non-members last): ``(order [B, H, L], segments)``; apply ``order`` along dim 2 to
    every per-member tensor before using ``segments``."""
    key = torch.where(is_member, member_group, torch.full_like(member_group, groups))
    sorted_key, order = torch.sort(key, dim=-1, stable=True)
    segments = _Segments(sorted_key, sorted_key.clamp(max=groups - 1), is_member.gather(2, order), groups)
    return order, segments


def cap_evicted_weight(weight: Tensor, is_target: Tensor, segments: _Segments, max_evicted_weight: float
                       ) -> tuple[Tensor, Tensor]:
    """The dominance guard (module doc): member weights ``pi [B, H, L]`` with the evicted share of every group
    that has a target capped at ``max_evicted_weight`` (the target takes the rest); and which groups were capped
    ``[B, H, M]``. Each group's weights still sum to 1."""
    evicted_share = segments.sum(torch.where(is_target, 0.0, weight))  # [B, H, M]
    has_target = segments.sum(is_target.to(weight.dtype)) > 0
    capped = has_target & (evicted_share > max_evicted_weight)
    scale = torch.where(capped, max_evicted_weight / evicted_share.clamp_min(torch.finfo(weight.dtype).tiny), 1.0)
    excess = torch.where(capped, evicted_share - max_evicted_weight, 0.0)
    weight = torch.where(is_target, weight + segments.spread(excess), weight * segments.spread(scale))
    return weight, capped


def _minnorm_keys(
    key_mean: Tensor, member_logits: Tensor, log_p: Tensor, log_P: Tensor, segments: _Segments, queries: Tensor,
    longest: Tensor, max_scale: float,
) -> tuple[Tensor, Tensor]:
    """``kbar + delta``, ``delta`` least-norm with ``q_g·k_r/sqrt(d) = ln(sum_i p_i exp(l_{g,i})) - ln P`` for all
    ``g``, and whether it is usable (finite, not longer than ``max_scale * longest``). ``[B, H, M, D]``, ``[B, H, M]``.

    The Gram matrix ``Q Q^T`` is shared by all groups of a (batch, head): one ``G x G`` solve per head, with a
    ridge of 16 machine epsilons (relative to the mean ``|q_g|^2``) so that dependent queries stay solvable.
    """
    scale = math.sqrt(key_mean.shape[-1])
    log_targets = segments.logsumexp(log_p[..., None] + member_logits)
    log_targets = log_targets - log_P[..., None]  # [B, H, M, G]
    queries_t = queries.transpose(-1, -2)
    residual = scale * log_targets - torch.matmul(key_mean, queries_t)  # [B, H, M, G]
    residual = torch.where(torch.isfinite(residual), residual, torch.zeros_like(residual))
    gram = torch.matmul(queries, queries_t)  # [B, H, G, G]
    ridge = 16 * torch.finfo(gram.dtype).eps * gram.diagonal(dim1=-2, dim2=-1).mean(-1)
    ridge = ridge.clamp_min(torch.finfo(gram.dtype).tiny)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    coefficients, info = torch.linalg.solve_ex(gram + ridge[..., None, None] * eye, residual.transpose(-1, -2))
    corrected = key_mean + torch.matmul(coefficients.transpose(-1, -2), queries)
    usable = torch.isfinite(corrected).all(-1) & torch.isfinite(log_targets).all(-1) & (info == 0)[..., None]
    usable = usable & (torch.linalg.vector_norm(corrected, dim=-1) <= max_scale * longest)
    return corrected, usable


def _zip_scale_from_queries(
    key_mean: Tensor, queries: Tensor, log_target: Tensor, linear_estimate: Tensor, max_scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Solve ``logsumexp_g(lambda a_g) - ln G = t`` (``a_g = q_g·kbar/sqrt(d)``) for ``lambda > 0``.

    ``f(lambda) = logsumexp_g(lambda a_g)`` is convex, so Newton's method from any start with ``f' != 0`` lands on
    the side ``f >= t`` after one step and then converges monotonically (quadratically near the root); for
    ``G = 1`` it is exact after one step. Returns ``(lambda, converged, zero_denominator)`` ``[B, H, M]``.
    """
    dtype = key_mean.dtype
    group = queries.shape[2]
    a = torch.matmul(key_mean, queries.transpose(-1, -2)) / math.sqrt(key_mean.shape[-1])  # [B, H, M, G]
    zero_denominator = a.abs().amax(-1) < MIN_DENOMINATOR
    target = log_target + math.log(group)
    start_ok = torch.isfinite(linear_estimate) & (linear_estimate > 0) & (linear_estimate <= max_scale)
    lam = torch.where(start_ok, linear_estimate, torch.ones_like(linear_estimate))
    bound = 4 * max_scale
    for _ in range(NEWTON_STEPS):
        z = lam[..., None] * a
        residual = torch.logsumexp(z, dim=-1) - target
        slope = (torch.softmax(z, dim=-1) * a).sum(-1)
        step = torch.where(slope != 0, residual / torch.where(slope != 0, slope, torch.ones_like(slope)), 0.0)
        lam = (lam - step).clamp(-bound, bound)
    z = lam[..., None] * a
    residual = torch.logsumexp(z, dim=-1) - target
    tolerance = 64 * torch.finfo(dtype).eps * (1 + target.abs() + z.abs().amax(-1))
    converged = residual.abs() <= tolerance
    return lam, converged, zero_denominator


def merge_into_kept(
    keys: Tensor, values: Tensor, log_votes: Tensor, evicted_idx: Tensor, target_idx: Tensor, merge_mask: Tensor,
    ref_log_scores: Tensor | None, ref_queries: Tensor | None, variant: str = "zip", *,
    stats: MergeStats | None = None, max_scale: float = MAX_SCALE, zip_fallback: str = "minnorm",
    max_evicted_weight: float = 1.0,
) -> None:
    """Merge the entries at ``evicted_idx`` into those at ``target_idx``, in place (see the module doc).

    Args:
        keys, values: ``[B, H_kv, C, D]`` cache buffers (float32 / bfloat16 / float16 / float64; keys RoPE-rotated).
        log_votes: ``[B, H_kv, C]`` float32 (float64 allowed), ``ln p`` (``-inf`` = empty slot).
        evicted_idx: ``[B, H_kv, M]`` slots to empty (every one, merged or not). A slot may be listed more than
            once (padding of ``M``) as long as at most one of its occurrences has ``merge_mask`` True.
        target_idx: ``[B, H_kv, M]`` the kept slot each evicted entry merges into; never an evicted slot. Many
            evicted entries may share a target (one N-way merge per target). Ignored where ``merge_mask`` is False.
        merge_mask: ``[B, H_kv, M]`` bool; False = drop that evicted entry without merging (below the cosine
            threshold, or padding of ``M``). An evicted slot that is already empty merges nothing.
        ref_log_scores: ``[B, H_kv, C]`` reference ``ln s_i`` per slot (e.g. predicted by the EMA), or ``None`` to
            use the group mean-score of ``ref_queries``. Sets the weights ``pi`` of every variant and zip's scale.
        ref_queries: ``[B, H_kv, G, D]`` the reference queries of each KV head's group (RoPE-rotated like the
            keys). Needed by ``minnorm``, by ``ref_log_scores=None`` and by zip's ``"minnorm"`` fallback.
        variant: one of :data:`MERGE_VARIANTS`.
        stats: optional :class:`MergeStats` to accumulate into (device tensors, no host sync).
        max_scale: bound on zip's ``lambda`` and on minnorm's key length relative to the group's longest key.
        zip_fallback: key of an ill-conditioned zip group, one of :data:`ZIP_FALLBACKS`.
        max_evicted_weight: the dominance guard's bound on the evicted members' total weight in a group with a live
            target, in ``(0, 1]`` (``1`` = unguarded; see the module doc).

    After the call every target that received a merge holds the merged key, value and ``ln P``; every evicted
    slot is empty (``log_votes = -inf``, zero key and value); all other slots are untouched.
    """
    if variant not in MERGE_VARIANTS:
        raise ValueError(f"unknown merge variant {variant!r}; allowed: {', '.join(MERGE_VARIANTS)}")
    if zip_fallback not in ZIP_FALLBACKS:
        raise ValueError(f"unknown zip fallback {zip_fallback!r}; allowed: {', '.join(ZIP_FALLBACKS)}")
    if variant == "minnorm" and ref_queries is None:
        raise ValueError("the minnorm variant needs ref_queries [batch, kv_heads, G, head_dim]")
    if ref_log_scores is None and ref_queries is None:
        raise ValueError("merge_into_kept needs ref_log_scores [batch, kv_heads, capacity] or ref_queries")
    if not 0.0 < max_evicted_weight <= 1.0:
        raise ValueError(f"max_evicted_weight must lie in (0, 1], got {max_evicted_weight}")
    batch, heads, capacity, dim = keys.shape
    merges = evicted_idx.shape[-1]
    if merges == 0:
        return
    device = keys.device
    compute = compute_dtype(keys, log_votes)
    neg_inf = -float("inf")

    # groups: one per distinct target that receives at least one live evicted entry
    evicted_log_p = log_votes.gather(2, evicted_idx)
    evicted_live = torch.isfinite(evicted_log_p)
    merging = merge_mask & evicted_live
    if stats is not None:  # live evicted slots, each counted once (evicted_idx may repeat a slot as padding)
        listed = torch.sort(evicted_idx, dim=-1).values
        first = torch.cat((torch.ones_like(listed[..., :1], dtype=torch.bool), listed[..., 1:] != listed[..., :-1]), -1)
        live_listed = (first & torch.isfinite(log_votes.gather(2, listed))).sum()
    group_of, group_slot, group_valid = _form_groups(target_idx, merging, capacity)
    target_slot = torch.where(group_valid, group_slot, torch.zeros_like(group_slot))
    target_log_p = log_votes.gather(2, target_slot)
    target_live = group_valid & torch.isfinite(target_log_p)

    # members: the M evicted entries and the M group targets, sorted by group (non-members last)
    member_slot = torch.cat((evicted_idx, target_slot), dim=-1)  # [B, H, 2M]
    member_group = torch.cat((group_of, torch.arange(merges, device=device).expand(batch, heads, merges)), dim=-1)
    order, segments = _segments(member_group, torch.cat((merging, target_live), dim=-1), merges)
    member_slot = member_slot.gather(2, order)
    is_member = segments.is_member
    log_p = log_votes.gather(2, member_slot).to(compute).masked_fill(~is_member, neg_inf)
    row_index = member_slot[..., None].expand(batch, heads, 2 * merges, dim)
    member_keys = keys.gather(2, row_index).to(compute)
    member_values = values.gather(2, row_index).to(compute)
    member_keys = torch.where(is_member[..., None], member_keys, torch.zeros_like(member_keys))
    member_values = torch.where(is_member[..., None], member_values, torch.zeros_like(member_values))

    queries = ref_queries.to(compute) if ref_queries is not None else None
    member_logits = None
    if queries is not None:
        member_logits = torch.matmul(member_keys, queries.transpose(-1, -2)) / math.sqrt(dim)  # [B, H, 2M, G]
    if ref_log_scores is not None:
        log_s = ref_log_scores.gather(2, member_slot).to(compute)
    else:
        log_s = log_mean_exp(member_logits, dim=-1)  # the group mean-score of spec §6
    log_s = torch.nan_to_num(log_s, nan=neg_inf, posinf=torch.finfo(compute).max / 4, neginf=neg_inf)

    # pi_i = w_i / W (log space); a group with W = 0 (every reference score 0) weighs by votes instead
    log_w = log_p + log_s
    log_P = segments.logsumexp(log_p)  # [B, H, M]
    log_W = segments.logsumexp(log_w)
    massless = ~torch.isfinite(log_W)
    by_mass = torch.exp(log_w - segments.spread(log_W))
    by_votes = torch.exp(log_p - segments.spread(log_P))
    weight = torch.where(segments.spread(massless), by_votes, by_mass)
    weight = torch.where(is_member, weight, torch.zeros_like(weight))  # pi_i, [B, H, 2M]
    capped = torch.zeros_like(group_valid)
    if max_evicted_weight < 1.0:
        is_target = is_member & (order >= merges)  # the second half of member_slot holds the targets
        weight, capped = cap_evicted_weight(weight, is_target, segments, max_evicted_weight)

    key_mean = segments.sum(weight[..., None] * member_keys)  # kbar [B, H, M, D]
    value_mean = segments.sum(weight[..., None] * member_values)  # v_r

    false = torch.zeros_like(group_valid)
    zero_denominator, bad_scale, bad_correction = false, false, false
    need_minnorm = variant == "minnorm" or (variant == "zip" and zip_fallback == "minnorm" and queries is not None)
    if need_minnorm:
        longest = segments.amax(torch.linalg.vector_norm(member_keys, dim=-1))
        minnorm_keys, minnorm_ok = _minnorm_keys(
            key_mean, member_logits, log_p, log_P, segments, queries, longest, max_scale
        )
    if variant == "zip":
        log_target = log_W - log_P  # ln(W / P): the merged entry's reference log-score
        finite_log_s = torch.where(torch.isfinite(log_s), log_s, torch.zeros_like(log_s))
        linear_denominator = segments.sum(weight * finite_log_s)  # sum_i pi_i ln s_i
        linear_ok = linear_denominator.abs() >= MIN_DENOMINATOR
        lam = log_target / torch.where(linear_ok, linear_denominator, torch.ones_like(linear_denominator))
        if ref_log_scores is None:
            lam, converged, queries_zero = _zip_scale_from_queries(key_mean, queries, log_target, lam, max_scale)
            zero_denominator = massless | queries_zero
        else:
            converged = torch.ones_like(linear_ok)
            zero_denominator = massless | ~linear_ok
        good = torch.isfinite(lam) & (lam > 0) & (lam <= max_scale) & converged & ~zero_denominator
        bad_scale = ~good & ~zero_denominator
        second_choice = torch.where(minnorm_ok[..., None], minnorm_keys, key_mean) if need_minnorm else key_mean
        new_keys = torch.where(good[..., None], lam[..., None] * key_mean, second_choice)
    elif variant == "minnorm":
        bad_correction = ~minnorm_ok
        new_keys = torch.where(minnorm_ok[..., None], minnorm_keys, key_mean)
    elif variant == "keep-key":
        target_keys = keys.gather(2, target_slot[..., None].expand(batch, heads, merges, dim)).to(compute)
        new_keys = torch.where(target_live[..., None], target_keys, key_mean)
    else:
        new_keys = key_mean

    cast_keys = new_keys.to(keys.dtype)
    bad_cast = ~torch.isfinite(cast_keys).all(-1)
    cast_keys = torch.where(bad_cast[..., None], key_mean.to(keys.dtype), cast_keys)

    # index assignments (O(M)): group rows to their targets, then the empty state to every evicted slot. An
    # invalid group row j writes the empty state to evicted slot j, which is emptied anyway (same value).
    destination = torch.where(group_valid, target_slot, evicted_idx)
    batch_index = torch.arange(batch, device=device)[:, None, None].expand_as(destination)
    head_index = torch.arange(heads, device=device)[None, :, None].expand_as(destination)
    write = group_valid[..., None]
    key_rows = torch.where(write, cast_keys, torch.zeros((), dtype=keys.dtype, device=device))
    value_rows = torch.where(write, value_mean.to(values.dtype), torch.zeros((), dtype=values.dtype, device=device))
    vote_rows = torch.where(group_valid, log_P.to(log_votes.dtype), neg_inf)
    keys[batch_index, head_index, destination] = key_rows
    values[batch_index, head_index, destination] = value_rows
    log_votes[batch_index, head_index, destination] = vote_rows
    keys[batch_index, head_index, evicted_idx] = 0
    values[batch_index, head_index, evicted_idx] = 0
    log_votes[batch_index, head_index, evicted_idx] = neg_inf

    if stats is not None:
        reasons = torch.stack((zero_denominator, bad_scale, bad_correction, bad_cast), dim=0) & group_valid
        first = reasons & (torch.cumsum(reasons.to(torch.int64), dim=0) == 1)
        stats.merged = stats.merged.to(device) + merging.sum()
        stats.dropped = stats.dropped.to(device) + live_listed - merging.sum()
        stats.groups = stats.groups.to(device) + group_valid.sum()
        stats.capped = stats.capped.to(device) + (capped & group_valid).sum()
        stats.fallbacks = stats.fallbacks.to(device) + first.flatten(1).sum(-1)


merge_into_kept_compiled = torch.compile(merge_into_kept, fullgraph=True, dynamic=False)
"""``torch.compile(merge_into_kept, fullgraph=True, dynamic=False)``: one graph per (shapes, variant, options)."""
