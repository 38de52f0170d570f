"""KeepKV (Tian et al., "KeepKV: Eliminating Output Perturbation in KV Cache Compression for Efficient LLMs
Inference", arXiv 2504.09936; AAAI-26): merge instead of evict, with electoral votes and ZIP merging.

At each compression of a layer, per batch row and KV head (KeepKV spec §3):

1. **Base selection** splits the live entries into kept ``C`` and evicted ``E``: sinks (4) and the recent window
   (``window``, 32) are protected; the rest is ranked by the paper's PyramidInfer-style recent-query attention
   ``score_i = mean over the window queries t and the group's query heads g of A_{g,t,i}``
   (vote-weighted attention probabilities: an entry holding ``p`` votes counts ``p`` times), max-pooled along the
   cache and, by default, times ``||v_i||_1`` (``value_norm_power``, VATP's value weighting). By default
   (``selection="layer"``) the ranking is the mean of that score over the layer's KV heads, so every head keeps
   the same tokens: a fact that spans several tokens (a 7-digit number) is kept or lost whole, where per-head
   ranking (``selection="head"``, the paper's) keeps different pieces of it in different heads;
   ``selection="blend"`` ranks each head by ``(1 - beta)`` times its own score plus ``beta`` times the layer's mean
   score of the same token (``layer_share``), and ``selection="floor"`` gives the ``layer_share`` of each head's
   free budget to the layer's top tokens by that mean and the rest to the head's own ranking.
2. **Matching**: each evicted key ``k_e`` goes to ``c* = argmax_{c in C} cos(k_e, k_c)``; it is merged only if
   that cosine exceeds ``similarity_threshold`` (``T = 0.8``), otherwise it is simply evicted.
3. **Merging**: all evicted entries sharing a target are merged into it in one N-way step
   (:func:`keepkv.ops.merge.merge_into_kept`) with the chosen ``variant`` (``zip`` = the paper's rule, ``convex``
   = the official code, ``keep-key``, ``minnorm``); votes add: ``p_r = p_c + sum_e p_e``.

**Defaults** are chosen by measurement (``docs/keepkv-quality.md``: commands, numbers and intervals; pooling by
task accuracy, at a small cost in next-token KL): the ``minnorm`` key (the smallest key change that keeps every
query head's softmax denominator), layer-shared selection, SnapKV's max-pooling of the scores along the cache
(``kernel_size=7``: a token's neighbours are kept with it, so a number or a name survives whole), one merge
reference, the newest queries (``reference="last"``: the key and the value weights both come from them, so the
compressing step is exact for them; the paper's EMA weights made that step's next-token KL 3.7-9.1 on
Qwen2.5-Coder-1.5B passages), and each entry's score weighted by its value's L1 norm (``value_norm_power=1``,
VATP's weighting: an entry counts by what it writes into the output as well as by how much it is attended).
``variant="zip", selection="head", kernel_size=1, reference="ema", value_norm_power=0`` reproduces the paper.

Reference scores for the merge (spec §4; maths in :mod:`keepkv.ops.scores`): ``reference="ema"`` predicts each
entry's future unnormalised score with the paper's exponential moving average over the observation window (the
last ``window`` queries, oldest first)
``S_t = alpha S_{t-1} + (1 - alpha) s_t``, bias-corrected by ``1 / (1 - alpha^m)`` where ``m`` is the number of
window queries that saw the entry; kept in log space and computed lazily at each compression from the stored
window queries (the same numbers as a per-step EMA truncated to the window; no extra work in the decode step).
It sets the value weights (and zip's scale), while minnorm's key targets still come from the newest queries.
``reference="last"`` (the default) uses the newest query of each query head for both (single-step losslessness,
Theorem 3).

GQA (spec §6): scores of a KV head are the group mean ``s_i = mean_g exp(q_g·k_i/sqrt(d))``, i.e. the reference
log-score is ``logsumexp_g(l_{g,i}) - ln G``; ``zip`` is exact for that reference, ``minnorm`` additionally
keeps the softmax denominator of every query head of the group, using each head's newest query (see
:mod:`keepkv.ops.merge`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from keepkv.cache.budgets import check_layer_budget_options, layer_budget_schedule
from keepkv.cache.compressed import CompressedLayerCache
from keepkv.cache.methods.criticalkv import (
    bound_output_projection, layer_output_projection, network_output_projections, value_output_norms,
)
from keepkv.cache.policy import CompressionMethod, recent_entries
from keepkv.checks import is_real
from keepkv.distributed.heads import head_mean, head_mean_by_position
from keepkv.errors import KeepKVError
from keepkv.ops.merge import MERGE_VARIANTS, MergeStats, merge_into_kept, merge_into_kept_compiled
from keepkv.ops.scores import cosine_match, ema_log_scores, log_mean_exp, pool_along_slots

REFERENCES = ("ema", "last")
SELECTIONS = ("layer", "head", "blend", "floor")
SHARE_SELECTIONS = ("blend", "floor")  # the selections that read layer_share
SCORE_NORMALIZATIONS = ("per-token", "total")
VALUE_WEIGHTINGS = ("value", "output")
LAYER_SHARE_DEFAULT = 0.5  # selection="blend"'s beta and "floor"'s share of the budget when not given
FLOOR_SHARE_STEPS = 10_000  # "floor" reads layer_share rounded to a multiple of 1 / FLOOR_SHARE_STEPS
OUTPUT_WEIGHTING = "keepkv (value_weighting='output')"  # the name its refusals give


@dataclass
class KeepKV(CompressionMethod):
    """Options:

    - ``variant`` (zip | convex | keep-key | minnorm): the merged key (:mod:`keepkv.ops.merge`);
    - ``similarity_threshold`` (``T``, 0.8): the cosine above which an evicted entry merges;
    - ``reference`` (last | ema): the merge reference. ``last`` (default): the newest query of every query head
      of the group, for both the key target and the value weights (one reference: the compressing step is exact
      for it, zip and minnorm alike). ``ema``: the paper's predicted scores set the weights (and zip's scale);
      minnorm's key targets still come from the newest queries (a mix, kept to reproduce the paper);
    - ``alpha`` (EMA decay, 0.9), ``sinks`` (4), ``window`` (32);
    - ``selection`` (layer | head | blend | floor): ``layer`` ranks every KV head of a layer by the mean of their
      scores, so all heads keep the same tokens (as TOVA does); ``head`` ranks each KV head separately (the paper's);
      ``blend`` ranks KV head ``h`` by ``(1 - beta) score_h + beta mean_h' score_h'`` with ``beta = layer_share``
      (0.5), where ``mean_h' score_h'`` is the layer's mean score of the same token (heads matched by position, a
      head that no longer holds the token counting 0: :func:`keepkv.distributed.heads.head_mean_by_position`): a
      token the whole layer ranks high gains rank in every head (so a needle tends to be kept in every head, as
      with ``layer``; nothing guarantees it for ``beta < 1``) while a token one head alone needs (one digit of a
      value a head reads) keeps most of its rank in that head (as with ``head``). The head's own score is also one
      of the mean's terms, so its weight is ``1 - beta + beta / kv_heads``. The blend is of the scores as computed,
      not normalised per head, so a head whose own scores are small next to the layer mean ranks close to the
      layer order. ``beta = 0`` is ``head`` exactly; ``beta = 1`` gives every head the layer's mean, as ``layer``
      does while the heads hold the same tokens in the same slots (which ``layer`` keeps true), up to float
      rounding (a sum divided by the head count against ``mean``: near-ties may break differently); ``floor``
      splits the budget instead of the score: each KV head first keeps its ``floor(layer_share * free)`` tokens of
      highest layer mean (the same position-matched mean; ``free`` is the budget minus the protected entries), so
      the layer's top tokens are kept in every head that still holds them, then fills the rest of its budget by
      its own score (:meth:`floor_slots`). Only those ``floor(layer_share * free)`` tokens are guaranteed (none
      when that is below 1; the share is rounded to a multiple of ``1 / FLOOR_SHARE_STEPS``, so the count is exact
      integer arithmetic). ``layer_share = 0`` is ``head``; ``1`` keeps ``layer``'s set while the heads hold the
      same tokens (near-ties aside);
    - ``layer_share`` (``beta`` in [0, 1], 0.5): the layer mean's share of ``selection="blend"``'s score, the
      layer's share of the free budget with ``selection="floor"``; read only by those two (another value with
      another selection is refused);
    - ``last_query_weight`` (``lambda``, 0): the selection score is ``(1 - lambda)`` times the window mean
      above plus ``lambda`` times the attention of the newest query alone (TOVA's score, averaged over the
      group's query heads); the protected window stays. ``lambda = 1`` ranks by the newest query only;
    - ``agnostic_last_query_weight`` (1.0): the ``last_query_weight`` used when the question is not in the
      compressed prompt (:meth:`for_query_agnostic`: a context compressed for questions asked later). The window
      mean is right when the window holds the question (its queries look for the answer) and wrong when it holds
      the context's last sentences; the newest query alone then ranks like TOVA's score (``docs/keepkv-quality.md``);
    - ``score_normalization`` (per-token | total): ``per-token`` divides a merged entry's attention by its votes,
      as the official code averages a cluster's scores per token, so a cluster does not survive by its size;
    - ``max_evicted_weight`` (``m``, 1.0 = unguarded): the dominance guard of the merge, the evicted members of
      a group weigh at most ``m`` in total and the kept entry at least ``1 - m`` (:mod:`keepkv.ops.merge`);
    - ``layer_budgets`` (uniform | pyramid | cosine): per-layer budgets averaging the requested one; ``cosine``
      (``cosine_decay`` 0.8) is the official code's PyramidInfer-style schedule, ``pyramid`` PyramidKV's
      (:mod:`keepkv.cache.budgets`); layers with different budgets compress eagerly (``keepkv.cache.manager``);
    - ``kernel_size`` (7; 1 = none, odd): SnapKV's max-pooling of the scores along the cache before ranking, so the
      neighbours of an important token (the other digits of a number) are kept with it
      (:func:`keepkv.ops.scores.pool_along_slots`; protected and empty slots count as 0).
    - ``value_norm_power`` (``gamma`` in [0, 4], 1; 0 = attention only, the paper's): each head's (pooled) score
      of an entry is multiplied by ``||v_i||_1 ** gamma``, that head's value's L1 norm, before the mean over the
      layer's heads: an entry matters by how much it writes into the output, not only by how much it is
      attended. This is VATP's ``||v_i||_1`` weighting (Guo et al., "Attention Score is not All You Need for
      Token Importance Indicator in KV Cache Reduction: Value Also Matters", EMNLP 2024: accumulated attention
      times ``||v_i||_1``, per head) applied to KeepKV's score; it reads only the cache (CriticalKV's
      ``||v_i W_O||_1`` is ``value_weighting="output"`` below). The norms are not normalised per head, so in the
      layer mean a head counts in proportion to the size of what its values write (a head writing twice as much
      weighs ``2 ** gamma`` times as much): a choice, the one measured (``docs/keepkv-quality.md``).
    - ``value_weighting`` (value | output): what ``value_norm_power`` weights by. ``value`` (default): the KV
      head's ``||v_i||_1`` as above. ``output``: CriticalKV's ``||v_i W_O^g||_1``, what entry ``i`` writes into
      the residual stream through query head ``g``'s slice of the layer's output projection
      (:func:`keepkv.cache.methods.criticalkv.value_output_norms`), applied per query head before the group
      mean: ``score_i = mean_g pool(A_g)[i] * ||v_i W_O^g||_1 ** gamma``. It reads the model's ``o_proj`` weights
      (:meth:`bind_model`); the compression hands the layer's weight to the compiled graph as a tensor argument
      through the cache (:meth:`~keepkv.cache.policy.CompressionMethod.compress`), so one graph still serves every
      layer; ``value_norm_power=0`` ignores it. Cost: ``kv_heads * group * slots * head_dim *
      hidden`` multiply-adds per layer at every compression (chunked prefill and every ``decode_slack`` decode
      steps), where CriticalKV pays them once after prefill; as a merger (``X+keepkv``) the option is never read.
    - ``recent_fraction`` (``rho`` in [0, 1], 0 = only ``window``): the newest ``floor(rho * budget)`` positions
      of a compression to ``budget`` (at most ``budget - sinks``) are protected like the window, H2O's recent
      share (:func:`keepkv.cache.policy.recent_entries`): StreamingLLM's recency inside a score-ranked budget,
      the rest of the budget ranked as above. The pooling of ``kernel_size`` zeroes every slot the compression
      protects (the recent share included), so a protected slot never lends its score to an older neighbour.

    Defaults: the measured best configuration (module docstring, ``docs/keepkv-quality.md``)."""

    name = "keepkv"
    is_eviction_selector = False  # KeepKV merges; as a selector for X+keepkv use a plain eviction scorer
    layer_free = True  # scores, match and merge read only the cache (value_weighting="output": the layer's o_proj
    # too, handed over on the cache): compiled, one graph serves every layer
    variant: str = "minnorm"
    similarity_threshold: float = 0.8
    reference: str = "last"
    alpha: float = 0.9
    selection: str = "layer"
    layer_share: float = LAYER_SHARE_DEFAULT
    score_normalization: str = "total"
    last_query_weight: float = 0.0
    agnostic_last_query_weight: float = 1.0
    max_evicted_weight: float = 1.0
    kernel_size: int = 7
    value_norm_power: float = 1.0
    layer_budgets: str = "uniform"
    cosine_decay: float = 0.8
    pyramid_beta: int = 20
    recent_fraction: float = 0.0
    value_weighting: str = "value"

    def __setattr__(self, name: str, value) -> None:
        """Fields are set as usual; setting ``last_query_weight`` (``lambda``; in ``__init__`` too) also refreshes
        :attr:`last_query_mix`, the float32 tensor ``[1 - lambda, lambda]`` (each rounded from the Python float,
        as a Python scalar would be) that :meth:`scores` reads."""
        super().__setattr__(name, value)
        if name == "last_query_weight":
            weight = float(value) if is_real(value) else float("nan")  # __post_init__ refuses a non-number
            with torch.inference_mode():  # one kind of tensor, like the merge counters (no recompile for it)
                super().__setattr__("last_query_mix", torch.tensor([1.0 - weight, weight], dtype=torch.float32))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in MERGE_VARIANTS:
            raise KeepKVError(f"keepkv: unknown variant {self.variant!r}; allowed: {', '.join(MERGE_VARIANTS)}")
        if self.reference not in REFERENCES:
            raise KeepKVError(f"keepkv: unknown reference {self.reference!r}; allowed: {', '.join(REFERENCES)}")
        if not -1.0 <= float(self.similarity_threshold) <= 1.0:
            raise KeepKVError(f"keepkv: similarity_threshold must lie in [-1, 1], got {self.similarity_threshold}")
        if not 0.0 < float(self.alpha) < 1.0:
            raise KeepKVError(f"keepkv: alpha must lie in (0, 1), got {self.alpha}")
        if self.selection not in SELECTIONS:
            raise KeepKVError(f"keepkv: unknown selection {self.selection!r}; allowed: {', '.join(SELECTIONS)}")
        if not 0.0 <= float(self.layer_share) <= 1.0:  # a non-number is refused by CompressionMethod already
            raise KeepKVError(f"keepkv: layer_share must be a number in [0, 1] (the layer mean's share of "
                              f"selection='blend', the layer's share of the budget with 'floor'), "
                              f"got {self.layer_share!r}")
        if self.selection not in SHARE_SELECTIONS and float(self.layer_share) != LAYER_SHARE_DEFAULT:
            ranks = "every head by the layer mean" if self.selection == "layer" else "each head alone"
            raise KeepKVError(f"keepkv: layer_share is read only with selection='blend' or 'floor' (selection="
                              f"{self.selection!r} ranks {ranks}); pass one of those with it")
        if self.score_normalization not in SCORE_NORMALIZATIONS:
            raise KeepKVError(f"keepkv: unknown score_normalization {self.score_normalization!r}; allowed: "
                              f"{', '.join(SCORE_NORMALIZATIONS)}")
        if not 0.0 <= float(self.last_query_weight) <= 1.0:
            raise KeepKVError(f"keepkv: last_query_weight must lie in [0, 1], got {self.last_query_weight}")
        if not 0.0 <= float(self.agnostic_last_query_weight) <= 1.0:
            raise KeepKVError(f"keepkv: agnostic_last_query_weight must lie in [0, 1], "
                              f"got {self.agnostic_last_query_weight}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise KeepKVError(f"keepkv: kernel_size must be an odd integer >= 1, got {self.kernel_size}")
        if not 0.0 < float(self.max_evicted_weight) <= 1.0:
            raise KeepKVError(f"keepkv: max_evicted_weight must lie in (0, 1] (1 = no guard), "
                              f"got {self.max_evicted_weight}")
        if not 0.0 <= float(self.value_norm_power) <= 4.0:
            raise KeepKVError(f"keepkv: value_norm_power must lie in [0, 4] (0 = attention only, 1 = VATP's ||v||_1 "
                              f"weighting), got {self.value_norm_power}")
        if not 0.0 <= float(self.recent_fraction) <= 1.0:
            raise KeepKVError(f"keepkv: recent_fraction must lie in [0, 1] (0 = the window only), "
                              f"got {self.recent_fraction}")
        if self.value_weighting not in VALUE_WEIGHTINGS:
            raise KeepKVError(f"keepkv: unknown value_weighting {self.value_weighting!r}; allowed: "
                              f"{', '.join(VALUE_WEIGHTINGS)}")
        check_layer_budget_options(self.name, self.layer_budgets, self.cosine_decay, self.pyramid_beta)
        self.stats = MergeStats()
        self.output_projections: list[Tensor] | None = None

    @property
    def weights_by_output(self) -> bool:
        """Whether the selection weights scores by ``||v W_O^g||_1`` (``value_weighting="output"`` with a
        non-zero ``value_norm_power``)."""
        return self.value_weighting == "output" and float(self.value_norm_power) != 0.0

    def output_projection_for(self, layer: int) -> Tensor | None:
        """``layer``'s bound ``o_proj.weight`` when the selection weights by it (:attr:`weights_by_output`)."""
        if not self.weights_by_output:
            return None
        return bound_output_projection(self.output_projections, layer, OUTPUT_WEIGHTING)

    def bind_model(self, network: nn.Module) -> None:
        """Keep references to every layer's ``o_proj.weight`` (read only with ``value_weighting="output"``)."""
        self.output_projections = network_output_projections(network)

    def recent_window(self, budget: int | None) -> int:
        """Newest positions protected at a compression to ``budget``: ``floor(recent_fraction * budget)``, at least
        the window, at most ``budget - sinks`` (:func:`~keepkv.cache.policy.recent_entries`; the window alone
        without a budget)."""
        return recent_entries(budget, float(self.recent_fraction), self.window, self.sinks)

    def for_query_agnostic(self) -> CompressionMethod:
        """A copy ranking with ``last_query_weight = agnostic_last_query_weight`` (``self`` when the two weights
        agree; in ``X+keepkv`` the selector ranks, see :class:`keepkv.cache.compose.Selected`). The copy records
        its merges in this method's ``stats``."""
        if self.agnostic_last_query_weight == self.last_query_weight:
            return self
        copy = dataclasses.replace(self, last_query_weight=self.agnostic_last_query_weight)
        copy.stats = self.stats
        copy.output_projections = self.output_projections
        # the two differ only in last_query_mix (a graph input): one compiled compression serves both
        copy._compiled_entries = self.compiled_compression()
        return copy

    def plan_layer_budgets(self, budget: int, num_layers: int) -> list[int]:
        """This method's ``layer_budgets`` schedule (:func:`keepkv.cache.budgets.layer_budget_schedule`; ``cosine``
        is the official code's)."""
        return layer_budget_schedule(self.layer_budgets, budget, num_layers, self.protected_entries,
                                     pyramid_beta=self.pyramid_beta, cosine_decay=float(self.cosine_decay))

    def ranking_scores(self, cache: CompressedLayerCache, layer: int, protected: Tensor) -> Tensor:
        """:meth:`scores` pooled over the slots this compression does not protect (``protected``: its budget's
        sinks, window and recent share)."""
        return self.scores(cache, layer, protected)

    def scores(self, cache: CompressedLayerCache, layer: int, protected: Tensor | None = None) -> Tensor:
        """``[batch, kv_heads, capacity]`` float32, in the order computed: the mean vote-weighted attention of the
        window queries and the group's query heads, mixed with the newest query's attention by
        ``last_query_weight``; divided by the entry's votes with ``score_normalization="per-token"``; max-pooled
        along the cache with ``kernel_size > 1`` over the live slots outside ``protected`` (default: the sinks and
        the window, :meth:`protected_mask` without a budget; a compression passes its own); times
        ``||v_i||_1 ** value_norm_power`` (each head's own values; empty slots score 0) when that power is not 0;
        then, with ``selection="layer"``, the mean over the layer's KV heads (the same for every head), with
        ``selection="blend"`` ``(1 - layer_share)`` times the head's own score plus ``layer_share`` times that mean
        taken token by token (heads matched by position); with ``selection="head"`` or ``"floor"`` the head's own
        score (``floor`` adds the layer's share of the budget in :meth:`keep_priority`). With
        ``value_weighting="output"`` every step up to the weighting is taken per query head of the group, the
        weight is ``||v_i W_O^g||_1 ** value_norm_power`` (``layer``'s ``o_proj``) and the group mean comes after it."""
        attention = cache.window_attention()  # [B, Hkv, G, w, C]
        present = (cache.window_positions >= 0).sum(dim=1).clamp_min(1)  # [B]
        by_output = self.weights_by_output
        if by_output:  # per query head until the output weights: [B, Hkv, G, C]
            scores = attention.sum(dim=3) / present[:, None, None, None]
            newest = attention[:, :, :, -1]
        else:  # the group mean at once: [B, Hkv, C]
            scores = attention.sum(dim=(2, 3)) / (present[:, None, None] * attention.shape[2])
            newest = attention[:, :, :, -1].mean(dim=2)
        # the newest query is the window's last row; the weights are a tensor (a graph input, not constants: the
        # method and its for_query_agnostic copy share one compiled graph). With lambda = 0 (or 1) the mix is
        # exactly the window mean (or the newest query's attention): the attentions are finite
        mix = self.last_query_mix.to(scores.device)
        scores = mix[0] * scores + mix[1] * newest
        live = torch.isfinite(cache.log_votes)  # empty slots hold -inf votes
        def per_slot(slots: Tensor) -> Tensor:  # a [B, Hkv, C] slot tensor broadcast against the scores
            return slots[:, :, None] if by_output else slots

        if self.score_normalization == "per-token":
            per_token = torch.exp(-cache.log_votes.masked_fill(~live, 0.0))
            scores = torch.where(per_slot(live), scores * per_slot(per_token), 0.0)
        if self.kernel_size > 1:
            if protected is None:
                protected = self.protected_mask(cache)
            scores = pool_along_slots(scores * per_slot(live & ~protected), self.kernel_size, "maxpool")
        if by_output:
            weight = layer_output_projection(cache, self.output_projections, layer, OUTPUT_WEIGHTING)
            norms = value_output_norms(cache.values, weight, cache.group_size)
            weighted = scores * norms.pow(float(self.value_norm_power))  # [B, Hkv, G, C]
            scores = torch.where(live, weighted.mean(dim=2), 0.0)
        elif self.value_norm_power:
            value_norms = torch.linalg.vector_norm(cache.values, 1, dim=-1, dtype=torch.float32)  # [B, Hkv, C]
            # an empty slot scores 0 whatever its stale value holds
            scores = torch.where(live, scores * value_norms.pow(float(self.value_norm_power)), 0.0)
        if self.selection == "layer":
            scores = head_mean(scores, cache, dim=1).expand_as(scores)  # over every rank's heads under TP
        elif self.selection == "blend":  # heads hold different tokens after a blended compression: match by position
            share = float(self.layer_share)
            scores = (1.0 - share) * scores + share * head_mean_by_position(scores, cache)
        return scores  # selection="floor": each head's own scores; keep_priority adds the layer's floor

    def keep_priority(self, cache: CompressedLayerCache, layer: int, budget: int, protected: Tensor,
                      live: Tensor) -> Tensor:
        """The shared ranking (``+inf`` protected, ``-inf`` empty, else :meth:`ranking_scores`); with
        ``selection="floor"`` the head's :meth:`floor_slots` rank at ``+inf`` too, above all its other unprotected
        slots, and the rest of the budget is filled by the head's own score. Protected plus floor entries never
        exceed the budget, so every floor slot is kept."""
        ranking = super().keep_priority(cache, layer, budget, protected, live)
        if self.selection != "floor":
            return ranking
        return torch.where(self.floor_slots(cache, budget, protected, live, ranking), float("inf"), ranking)

    def floor_slots(self, cache: CompressedLayerCache, budget: int, protected: Tensor, live: Tensor,
                    ranking: Tensor) -> Tensor:
        """``[batch, kv_heads, capacity]`` bool: each head's ``floor(layer_share * free)`` live unprotected slots of
        highest *layer* score, the layer's mean of the heads' own scores (``ranking``) of the same token, heads
        matched by position (:func:`keepkv.distributed.heads.head_mean_by_position`); ``free`` is ``budget`` minus
        the head's protected entries (every head of KeepKV has the one budget: no per-head budgets). The count is
        integer arithmetic (``layer_share`` in steps of ``1 / FLOOR_SHARE_STEPS``); ties of the layer score break
        by slot order."""
        candidates = live & ~protected
        own = torch.where(candidates, ranking, 0.0)
        layer_scores = torch.where(candidates, head_mean_by_position(own, cache), -float("inf"))
        order = torch.sort(layer_scores, dim=-1, descending=True, stable=True).indices
        places = torch.arange(order.shape[-1], device=order.device).expand_as(order)
        slot_rank = torch.empty_like(order).scatter_(-1, order, places)  # each slot's place in the layer order
        free = (budget - protected.sum(dim=-1, keepdim=True)).clamp_min(0)
        share_steps = round(float(self.layer_share) * FLOOR_SHARE_STEPS)
        floor_size = free * share_steps // FLOOR_SHARE_STEPS  # floor(layer_share * free), exact
        return candidates & (slot_rank < floor_size)

    def reference_log_scores(self, cache: CompressedLayerCache) -> Tensor | None:
        """``[batch, kv_heads, capacity]`` float32 predicted ``ln s_i`` (the EMA), or ``None`` for
        ``reference="last"``: the merge then takes the newest queries as its one reference."""
        if self.reference == "last":
            return None
        log_scores = log_mean_exp(cache.window_log_scores(), dim=2)  # group log-scores [B, Hkv, w, C]
        return ema_log_scores(log_scores, float(self.alpha), cache.visible_from_window())

    def match(self, cache: CompressedLayerCache, kept_slots: Tensor, kept_valid: Tensor, evicted_slots: Tensor,
              evicted_valid: Tensor) -> tuple[Tensor, Tensor]:
        """``(target_slots, merge_mask)`` ``[batch, kv_heads, E]``: each evicted entry's most cosine-similar kept
        entry, and whether it is merged (similarity above the threshold; both entries live)."""
        dim = cache.keys.shape[-1]
        kept_keys = cache.keys.gather(2, kept_slots[..., None].expand(-1, -1, -1, dim))
        evicted_keys = cache.keys.gather(2, evicted_slots[..., None].expand(-1, -1, -1, dim))
        best, _, merge_mask = cosine_match(evicted_keys, kept_keys, float(self.similarity_threshold), kept_valid,
                                           evicted_valid)
        return kept_slots.gather(2, best), merge_mask

    def merge(self, cache: CompressedLayerCache, layer: int, kept_slots: Tensor, kept_valid: Tensor,
              evicted_slots: Tensor, evicted_valid: Tensor, compiled: bool = False) -> None:
        if evicted_slots.shape[-1] == 0:
            return
        target_slots, merge_mask = self.match(cache, kept_slots, kept_valid, evicted_slots, evicted_valid)
        batch, kv_heads, _, dim = cache.keys.shape
        newest_queries = cache.window_queries[:, :, -1].reshape(batch, kv_heads, cache.group_size, dim)
        merge = merge_into_kept_compiled if compiled else merge_into_kept
        merge(
            cache.keys, cache.values, cache.log_votes, evicted_slots, target_slots, merge_mask,
            self.reference_log_scores(cache), newest_queries, self.variant, stats=self.stats,
            max_evicted_weight=float(self.max_evicted_weight),
        )
