"""KV budgets, in one place: what ``kv_budget`` means in entries per KV head, and the per-layer and per-head
budgets that spend it differently (options any scoring method can take, :class:`BudgetOptions`).

``kv_budget`` is either a fraction of the prompt in ``(0, 1]`` (``0.1`` keeps 10% of the prompt's entries,
rounded up) or an integer ``>= 1``: an absolute number of entries per KV head. ``1.0`` (the whole prompt) is the
full cache: nothing is ever compressed. A method never keeps fewer entries than it protects (attention sinks +
recent window + the newest token); a budget below that is an error naming the minimum.

Limits, checked before any cache is allocated (:func:`entries_for_budget`):

- an integer budget above the model's context (``max_position_embeddings``) is refused with a
  :class:`~keepkv.errors.KeepKVError`: no prompt plus its new tokens can ever fill it, so it is a mistake (a
  fraction meant as a percentage, a byte count), not a request;
- any budget is capped at ``prompt + max_new_tokens`` entries, all a generation can ever hold (never below the
  protected entries): a budget at least as long as the prompt compresses nothing at prefill and gets buffers no
  larger than the full cache's, and is still a valid compressed run if decoding grows past it.

A batch shares one budget, computed from its longest prompt (the padded width): with a fraction ``f`` every row may
keep ``ceil(f * longest)`` entries, more than ``ceil(f * its own length)`` for the shorter rows (the cache manager
records each row's own budget as ``row_budgets``).

Two published ways of spending the same total ``B`` differently are options of every scorer that mixes in
:class:`BudgetOptions`:

**PyramidKV layer budgets** (Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
Funneling", arXiv 2406.02069), ``layer_budgets="pyramid"``: with ``P`` protected entries per head (sinks + recent
window: PyramidKV's observation window) and ``R = B - P`` selectable ones, layer ``l`` of ``L`` keeps
``P + R_l`` where ``R_l`` falls linearly with depth from ``max`` to ``min``::

    min = R / beta,   max = 2 R - min,   R_l = max - (max - min) * l / (L - 1)     (beta = 20)

so ``mean_l R_l = R``. keepkv rounds the ``R_l`` by largest remainder (ties to the shallower layer), so the
integer budgets are non-increasing and their mean is **exactly** ``B`` (the reference code floors the step and
loses up to ``L - 1`` entries in total). Memory: the manager pads every layer's buffer to the largest layer's
slots (one shape for the compiled graphs, :mod:`keepkv.cache.manager`).

**Ada-KV head budgets** (Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for
Efficient LLM Inference", NeurIPS 2025, arXiv 2407.11550), ``head_budgets="adakv"``: a layer's ``H_kv * B``
entries are shared between its KV heads, per batch row. Every head keeps its protected entries and first its own
top ``floor(adakv_floor * R)`` (``adakv_floor = 0.2``, the paper's safeguard); the remaining
``H_kv * R - sum floors`` go to the highest scores over *all* heads (one global top-k over the flattened
``[heads * slots]`` scores; ties by head, then slot). The scores must be comparable across heads (normalised
attention is: SnapKV, H2O, CriticalKV's stage scores).

What Ada-KV's padded storage saves — honestly: **no memory.** keepkv's buffers are ``[batch, kv_heads,
capacity]``; a head that keeps fewer entries leaves slots empty (``log_votes = -inf``, masked in attention), and
a head that keeps more needs a longer buffer. The longest a head may grow is ``adakv_head_cap * B`` (default
``2 B``), so each head's buffer has ``ceil(adakv_head_cap * B)`` slots: resident KV memory is ``(2B + W) / (B + W)``
times uniform's, and attention still reads every slot (dense reference and FlexAttention ``score_mod`` alike).
What Ada-KV buys is *quality at the same number of live entries* (``H_kv * B`` per layer, what a paged/varlen
layout would store); ``adakv_head_cap = 1`` gives uniform budgets back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from keepkv.cache.compressed import CompressedLayerCache
from keepkv.cache.policy import CompressionMethod
from keepkv.distributed.heads import gather_kv_heads, local_kv_heads
from keepkv.errors import KeepKVError

LAYER_BUDGETS = ("uniform", "pyramid", "cosine")
HEAD_BUDGETS = ("uniform", "adakv")


def largest_remainder(shares: list[float], total: int) -> list[int]:
    """Integers ``n_l`` with ``sum n_l = total`` and ``|n_l - shares_l| < 1`` (``shares`` sum to ``total``).

    Each share is floored; the leftover units go to the largest fractional parts, ties to the lower index.
    """
    floors = [math.floor(share) for share in shares]
    leftover = total - sum(floors)
    by_fraction = sorted(range(len(shares)), key=lambda i: (-(shares[i] - floors[i]), i))
    for i in by_fraction[:leftover]:
        floors[i] += 1
    return floors


def pyramid_layer_budgets(budget: int, num_layers: int, protected: int, beta: int = 20) -> list[int]:
    """PyramidKV's per-layer budgets (module docstring): ``protected + R_l``, mean exactly ``budget``."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    selectable = budget - protected
    if selectable <= 0 or num_layers == 1:
        return [budget] * num_layers
    smallest = selectable / beta
    largest = 2 * selectable - smallest
    shares = [largest - (largest - smallest) * layer / (num_layers - 1) for layer in range(num_layers)]
    return [protected + r for r in largest_remainder(shares, selectable * num_layers)]


def cosine_layer_budgets(budget: int, num_layers: int, protected: int, decay: float = 0.8) -> list[int]:
    """The official KeepKV code's PyramidInfer-style cosine schedule: ``protected + R_l`` with ``mean_l R_l = R``
    (``R = budget - protected``) and

        R_l  proportional to  (1 - decay) (cos(pi l / L) + 1) / 2 + decay

    (``decay = 0.8``, the reference code's default: the last layer keeps about 0.8 of the first layer's
    selectable entries). The reference code also scales a constant "recent" share with the same factor; keepkv's
    protected entries (sinks + window) are that constant part, identical in every layer. Largest-remainder
    rounding: the integer budgets average to exactly ``budget``.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must lie in [0, 1], got {decay}")
    selectable = budget - protected
    if selectable <= 0 or num_layers == 1:
        return [budget] * num_layers
    weights = [(1 - decay) * (math.cos(math.pi * layer / num_layers) + 1) / 2 + decay for layer in range(num_layers)]
    total = selectable * num_layers
    shares = [total * w / sum(weights) for w in weights]
    return [protected + r for r in largest_remainder(shares, total)]


def layer_budget_schedule(kind: str, budget: int, num_layers: int, protected: int, *, pyramid_beta: int = 20,
                          cosine_decay: float = 0.8) -> list[int]:
    """Per-layer budgets of a named schedule (``LAYER_BUDGETS``): uniform, PyramidKV's linear, KeepKV's cosine."""
    if kind == "pyramid":
        return pyramid_layer_budgets(budget, num_layers, protected, pyramid_beta)
    if kind == "cosine":
        return cosine_layer_budgets(budget, num_layers, protected, cosine_decay)
    return [budget] * num_layers


def check_layer_budget_options(method: str, layer_budgets: str, cosine_decay: float, pyramid_beta: int) -> None:
    """Raise a :class:`~keepkv.errors.KeepKVError` naming ``method`` and the allowed values unless
    ``layer_budgets`` is one of ``LAYER_BUDGETS``, ``cosine_decay`` lies in ``[0, 1]`` and ``pyramid_beta >= 1``."""
    if layer_budgets not in LAYER_BUDGETS:
        raise KeepKVError(f"{method}: unknown layer_budgets {layer_budgets!r}; allowed: {', '.join(LAYER_BUDGETS)}")
    if not 0.0 <= float(cosine_decay) <= 1.0:
        raise KeepKVError(f"{method}: cosine_decay must lie in [0, 1], got {cosine_decay}")
    if pyramid_beta < 1:
        raise KeepKVError(f"{method}: pyramid_beta must be an integer >= 1, got {pyramid_beta}")


def adakv_head_budgets(keep_priority: Tensor, protected: Tensor, live: Tensor, layer_budget: int,
                       floor_fraction: float, head_slots: int) -> Tensor:
    """Ada-KV's per-head entry counts ``[batch, kv_heads]`` int64 (module docstring).

    Args:
        keep_priority: ``[batch, kv_heads, capacity]`` scores, ``+inf`` where protected, ``-inf`` where empty.
        protected, live: ``[batch, kv_heads, capacity]`` bool.
        layer_budget: ``B``, entries per head on average; a batch row keeps at most ``kv_heads * B``.
        floor_fraction: share of each head's selectable budget ``R = B - P`` it keeps first (Ada-KV: 0.2).
        head_slots: the most entries one head may keep (its buffer length).
    """
    batch, kv_heads, capacity = keep_priority.shape
    protected_count = (protected & live).sum(dim=-1)  # [B, H]
    candidate = live & ~protected
    selectable = (layer_budget - protected_count).clamp_min(0)
    head_room = (head_slots - protected_count).clamp_min(0)  # most candidates a head may keep
    candidate_scores = torch.where(candidate, keep_priority, -float("inf"))
    sorted_scores, _ = torch.sort(candidate_scores, dim=-1, descending=True, stable=True)
    rank = torch.arange(capacity, device=keep_priority.device)
    candidates = candidate.sum(dim=-1)  # candidate scores are finite: they sort first
    is_candidate = rank < candidates[..., None]
    # floor(f * R) in float32 with a margin against 0.7 * 10 = 6.9999995
    floor = torch.floor(floor_fraction * selectable.float() + 1e-4).long()
    floor = torch.minimum(torch.minimum(floor, head_room), candidates)
    pool = (selectable.sum(dim=-1) - floor.sum(dim=-1)).clamp_min(0)  # [B]
    # the rest of each head's ranking, up to its room, competes globally (flattened heads x slots, stable)
    competing = is_candidate & (rank >= floor[..., None]) & (rank < head_room[..., None])
    flat_scores = torch.where(competing, sorted_scores, -float("inf")).reshape(batch, kv_heads * capacity)
    global_order = torch.sort(flat_scores, dim=-1, descending=True, stable=True).indices
    taken_in_order = (torch.arange(kv_heads * capacity, device=keep_priority.device) < pool[:, None]) & (
        competing.reshape(batch, -1).gather(1, global_order)
    )
    taken = torch.zeros_like(taken_in_order).scatter(1, global_order, taken_in_order).view(batch, kv_heads, capacity)
    return protected_count + floor + taken.sum(dim=-1)


def validate_budget(kv_budget: float | int | None) -> float | int | None:
    """Check the *form* of a budget (before any prompt is seen); returns it unchanged."""
    if kv_budget is None:
        return None
    if isinstance(kv_budget, bool) or not isinstance(kv_budget, (int, float)):
        raise KeepKVError(f"kv_budget must be a fraction in (0, 1] or an integer >= 1, got {kv_budget!r}")
    if isinstance(kv_budget, float) and not (0.0 < kv_budget <= 1.0):
        raise KeepKVError(
            f"kv_budget={kv_budget} is not allowed: a fraction must lie in (0, 1] (0.1 keeps 10% of the prompt); "
            "for an absolute size pass an integer >= 1"
        )
    if isinstance(kv_budget, int) and kv_budget < 1:
        raise KeepKVError(f"kv_budget={kv_budget} is not allowed: an absolute budget is an integer >= 1")
    return kv_budget


def is_full_budget(kv_budget: float | int | None) -> bool:
    """``None`` and the fraction ``1.0`` keep every entry."""
    return kv_budget is None or (isinstance(kv_budget, float) and kv_budget == 1.0)


def entries_for_budget(kv_budget: float | int, prompt_tokens: int, protected: int, *, max_new_tokens: int = 0,
                       max_context: int | None = None) -> int:
    """Entries per KV head for a prompt of ``prompt_tokens``: ``ceil(f * prompt)`` or the integer itself, capped at
    ``max(protected, prompt_tokens + max_new_tokens)`` (module docstring).

    Raises :class:`~keepkv.errors.KeepKVError` if the asked budget is fewer than ``protected`` (sinks + recent
    window + 1), naming the minimum, or if an integer budget exceeds ``max_context`` (the model's context).
    """
    if max_context is not None and not isinstance(kv_budget, float) and int(kv_budget) > max_context:
        raise KeepKVError(
            f"kv_budget={kv_budget} entries per head is more than the model's context of {max_context} tokens: "
            f"an absolute budget is an integer between the method's protected entries and {max_context} "
            "(a fraction in (0, 1] keeps that share of the prompt)"
        )
    entries = math.ceil(kv_budget * prompt_tokens) if isinstance(kv_budget, float) else int(kv_budget)
    if entries < protected:
        what = f"{kv_budget:g} of a {prompt_tokens}-token prompt = {entries}" if isinstance(kv_budget, float) \
            else f"{entries}"
        raise KeepKVError(
            f"kv_budget {what} entries per head is below this method's {protected} protected entries "
            f"(attention sinks + recent window + newest token): ask for at least {protected} entries"
        )
    return min(entries, max(protected, prompt_tokens + max_new_tokens))


@dataclass
class BudgetOptions(CompressionMethod):
    """Budget-shaping options for scoring methods (module docstring):

    - ``layer_budgets``: ``"uniform"`` (default), ``"pyramid"`` (PyramidKV schedule, ``pyramid_beta = 20``) or
      ``"cosine"`` (the official KeepKV code's schedule, ``cosine_decay = 0.8``: :func:`cosine_layer_budgets`);
    - ``head_budgets``: ``"uniform"`` (default) or ``"adakv"`` (``adakv_floor = 0.2`` of each head's selectable
      budget kept first, heads at most ``adakv_head_cap = 2.0`` times the layer budget).
    """

    layer_budgets: str = "uniform"
    pyramid_beta: int = 20
    cosine_decay: float = 0.8
    head_budgets: str = "uniform"
    adakv_floor: float = 0.2
    adakv_head_cap: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_layer_budget_options(self.name, self.layer_budgets, self.cosine_decay, self.pyramid_beta)
        if self.head_budgets not in HEAD_BUDGETS:
            raise KeepKVError(f"{self.name}: unknown head_budgets {self.head_budgets!r}; allowed: "
                              f"{', '.join(HEAD_BUDGETS)}")
        if not 0.0 <= float(self.adakv_floor) <= 1.0:
            raise KeepKVError(f"{self.name}: adakv_floor must lie in [0, 1], got {self.adakv_floor}")
        if not float(self.adakv_head_cap) >= 1.0:
            raise KeepKVError(f"{self.name}: adakv_head_cap must be >= 1, got {self.adakv_head_cap}")

    def plan_layer_budgets(self, budget: int, num_layers: int) -> list[int]:
        return layer_budget_schedule(self.layer_budgets, budget, num_layers, self.protected_entries,
                                     pyramid_beta=self.pyramid_beta, cosine_decay=float(self.cosine_decay))

    def slots_for_budget(self, layer_budget: int) -> int:
        if self.head_budgets == "adakv":
            return math.ceil(float(self.adakv_head_cap) * layer_budget)
        return layer_budget

    def plan_head_budgets(self, cache: CompressedLayerCache, layer: int, budget: int, keep_priority: Tensor,
                          protected: Tensor, live: Tensor) -> Tensor | None:
        if self.head_budgets != "adakv":
            return None
        head_slots = min(self.slots_for_budget(budget), cache.capacity)
        heads = gather_kv_heads(cache, keep_priority, protected, live)  # every rank's heads under TP, else as is
        return local_kv_heads(adakv_head_budgets(*heads, budget, float(self.adakv_floor), head_slots), cache)
