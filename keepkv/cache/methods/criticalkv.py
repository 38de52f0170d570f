"""CriticalKV (Feng et al., "Identify Critical KV Cache in LLM Inference from an Output Perturbation
Perspective", arXiv 2502.03805): select entries by their effect on the attention output after ``W_O``.

The perturbation of the layer output when entry ``i`` is dropped grows with its attention weight *and* with the
size of what it writes into the residual stream, ``||v_i W_O^h||_1``, where ``W_O^h`` is query head ``h``'s
``(head_dim x hidden)`` slice of the output projection. Two stages per KV head, on a base scorer (SnapKV's
pooled observation-window attention, :mod:`keepkv.cache.methods.snapkv`):

1. keep the top ``floor(stage1_fraction * R)`` selectable entries by the base score (``stage1_fraction = 0.5``;
   ``R`` = the head's budget minus its protected entries: the window is kept on top, as in the reference code);
2. fill the remaining ``R - stage1`` by the output-aware score

       critical_i = mean over the group's query heads h of (A_h[i] + epsilon) * ||v_i W_O^h||_1,   epsilon = 1e-4

   with ``A_h[i]`` the same pooled window-mean attention as the base score (query head ``h``).

Composes with Ada-KV (``head_budgets="adakv"``: per-head budgets from the base scores first, then both stages
per head with that head's budget), PyramidKV layer budgets, and KeepKV (``criticalkv+keepkv``: CriticalKV picks
kept / evicted, KeepKV merges). Compresses once after prefill, like its SnapKV base.

The model's ``o_proj`` weights come from :meth:`bind_model` (the cache manager's ``bind_network``; or
:meth:`bind_output_projections` directly). ``||v W_O^h||_1`` is computed at compression time in blocks of slots
so that the ``[slots, heads, hidden]`` products stay below ~64 MB.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from keepkv.cache.compressed import CompressedLayerCache
from keepkv.cache.methods.snapkv import SnapKV
from keepkv.cache.policy import split_by_order
from keepkv.errors import KeepKVError

PROJECTION_BLOCK_ELEMENTS = 1 << 24  # float32 elements of one block of v W_O products (64 MB)


def value_output_norms(values: Tensor, output_projection: Tensor, group: int) -> Tensor:
    """``||v_i W_O^h||_1`` for every slot and query head: ``[batch, kv_heads, group, capacity]`` float32.

    Args:
        values: ``[batch, kv_heads, capacity, head_dim]``.
        output_projection: ``o_proj.weight``, ``[hidden, heads * head_dim]`` (``out = attn @ weight.T``); query
            head ``h = kv_head * group + g`` reads KV head ``h // group`` (grouped-query attention).
    """
    batch, kv_heads, capacity, dim = values.shape
    hidden = output_projection.shape[0]
    per_head = output_projection.float().reshape(hidden, kv_heads, group, dim).permute(1, 2, 3, 0)  # [Hkv, G, d, hid]
    block = max(1, PROJECTION_BLOCK_ELEMENTS // max(1, batch * kv_heads * group * hidden))
    norms = []
    for start in range(0, capacity, block):
        chunk = values[:, :, start : start + block].float()  # [B, Hkv, n, d]
        projected = torch.einsum("bknd,kgdh->bkgnh", chunk, per_head)
        norms.append(projected.abs().sum(dim=-1))
    return torch.cat(norms, dim=-1)


def bound_output_projection(weights: list[Tensor] | None, layer: int, method: str) -> Tensor:
    """``layer``'s ``o_proj.weight`` from the references a method bound (``bind_model``), or a :class:`KeepKVError`
    saying which is missing: no weights bound at all, or none for that layer."""
    if weights is None:
        raise KeepKVError(f"{method} needs the model's o_proj weights: call CacheManager.bind_network(network) "
                          f"(or the method's bind_model) before compressing")
    if not 0 <= layer < len(weights):
        raise KeepKVError(f"{method}: no o_proj weight bound for layer {layer} (bound: {len(weights)} layers)")
    return weights[layer]


def network_output_projections(network: nn.Module) -> list[Tensor]:
    """Every layer's ``o_proj.weight`` of ``network`` (references, not copies), in layer order."""
    return [attention.o_proj.weight for attention in network.attention_layers]


def layer_output_projection(cache: CompressedLayerCache, weights: list[Tensor] | None, layer: int,
                            method: str) -> Tensor:
    """The ``o_proj.weight`` of the layer ``cache`` holds: the one a running compression handed to the cache
    (``cache.output_projection``, set by :meth:`~keepkv.cache.policy.CompressionMethod.compress`; inside a compiled
    compression a graph input), else ``layer``'s bound reference (:func:`bound_output_projection`: a direct call
    of a method's scores)."""
    if cache.output_projection is not None:
        return cache.output_projection
    return bound_output_projection(weights, layer, method)


@dataclass
class CriticalKV(SnapKV):
    """Options: ``stage1_fraction`` (0.5), ``epsilon`` (1e-4), and SnapKV's (``window`` 32, ``kernel_size`` 7,
    ``pooling`` maxpool, ``sinks`` 0) and budget options."""

    name = "criticalkv"
    stage1_fraction: float = 0.5
    epsilon: float = 1e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= float(self.stage1_fraction) <= 1.0:
            raise KeepKVError(f"{self.name}: stage1_fraction must lie in [0, 1], got {self.stage1_fraction}")
        if not float(self.epsilon) >= 0.0:
            raise KeepKVError(f"{self.name}: epsilon must be >= 0, got {self.epsilon}")
        self.output_projections: list[Tensor] | None = None

    def bind_model(self, network: nn.Module) -> None:
        self.bind_output_projections(network_output_projections(network))

    def bind_output_projections(self, weights: list[Tensor]) -> None:
        """One ``o_proj.weight [hidden, heads * head_dim]`` per layer (references, not copies)."""
        self.output_projections = list(weights)

    def output_projection_for(self, layer: int) -> Tensor:
        return bound_output_projection(self.output_projections, layer, self.name)

    def critical_scores(self, cache: CompressedLayerCache, layer: int) -> Tensor:
        """``[batch, kv_heads, capacity]``: ``mean_g (A_g[i] + epsilon) * ||v_i W_O^g||_1`` (stage 2)."""
        weight = layer_output_projection(cache, self.output_projections, layer, self.name)
        attention = self.pooled_head_attention(cache)  # [B, Hkv, G, C]
        norms = value_output_norms(cache.values, weight, cache.group_size)
        return ((attention + float(self.epsilon)) * norms).mean(dim=2)

    def select(self, cache: CompressedLayerCache, layer: int, budget: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        live = torch.isfinite(cache.log_votes)
        protected = self.protected_mask(cache, budget)
        base_priority = self.keep_priority(cache, layer, budget, protected, live)
        head_budgets = self.plan_head_budgets(cache, layer, budget, base_priority, protected, live)
        per_head = head_budgets if head_budgets is not None else torch.full_like(live[..., 0], budget, dtype=torch.long)
        protected_count = protected.sum(dim=-1)
        selectable = (per_head - protected_count).clamp_min(0)
        stage1 = torch.floor(float(self.stage1_fraction) * selectable.float() + 1e-4).long()
        # stage 1: each head's top `stage1` selectable entries by the base score (protected entries rank first)
        base_order = torch.sort(base_priority, dim=-1, descending=True, stable=True).indices
        base_rank = torch.empty_like(base_order).scatter_(
            2, base_order, torch.arange(cache.capacity, device=base_order.device).expand_as(base_order)
        )
        in_stage1 = live & ~protected & (base_rank < (protected_count + stage1)[..., None])
        # stage 2: the rest by the critical score; tiers protected > stage 1 > others > empty, stable by position
        critical = self.critical_scores(cache, layer).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        tier = torch.where(protected, 3, torch.where(in_stage1, 2, torch.where(live, 1, 0)))
        by_score = torch.sort(critical, dim=-1, descending=True, stable=True).indices
        by_tier = torch.sort(tier.gather(2, by_score), dim=-1, descending=True, stable=True).indices
        order = by_score.gather(2, by_tier)
        return split_by_order(cache, order, live, budget, head_budgets, self.slots_for_budget(budget))
