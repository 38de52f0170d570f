"""Tensor parallelism for keepkv's decoder: heads and MLP columns split across ranks (Megatron-LM's scheme,
Shoeybi et al. 2019, applied after loading as gpt-fast does).

With ``W`` ranks, rank ``r`` keeps, in every block,

- attention: query heads ``[r H/W, (r+1) H/W)`` and KV heads ``[r K/W, (r+1) K/W)`` (rows of ``q_proj``,
  ``k_proj``, ``v_proj`` and their biases). Query head ``h`` reads KV head ``h // G`` (GQA), so a rank's query
  heads read exactly its own KV heads and attention needs no communication; the rank's KV cache holds only its
  ``K/W`` heads and the rank compresses them itself;
- ``o_proj``: the matching columns, so the rank's output is a partial sum ``sum_{h in rank} o_h W_O^h``;
  **one all-reduce (sum)** after it gives every rank the full attention output;
- MLP: columns ``[r I/W, (r+1) I/W)`` of ``gate_proj`` / ``up_proj`` (SwiGLU is element-wise, so each rank's
  slice is exact) and the matching input columns of ``down_proj``; **one all-reduce** after ``down_proj``.

Embeddings, norms and ``lm_head`` are replicated: every rank computes the same logits and samples the same token
(the same seed), so no broadcast is needed. Two all-reduces of ``[batch, T, hidden]`` per layer; the collectives
are functional collectives in forward hooks on ``self_attn`` and ``mlp`` (no change to the model code), traced
into the compiled decode step (``torch.compile(fullgraph=True)``) as ordinary ops.

Compression methods read other ranks' heads only where they reduce over heads; those reductions go through
:mod:`keepkv.distributed.heads` (the caches carry the rank's :class:`~keepkv.distributed.heads.HeadShard`).

Results equal the single process's up to float summation order (the all-reduce adds partial sums): greedy tokens
and kept sets match in float32 (``tests/distributed/test_tp.py``). Each rank reads the whole checkpoint and keeps its slice
(peak memory: one full copy of the weights per rank while loading).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from keepkv.distributed.group import TensorParallel
from keepkv.distributed.heads import HeadShard
from keepkv.errors import KeepKVError

if TYPE_CHECKING:
    from keepkv.models.config import ModelConfig
    from keepkv.models.transformer import Transformer


def check_divisible(config: ModelConfig, world_size: int) -> None:
    """A :class:`KeepKVError` unless KV heads (hence query heads) and the MLP width divide by ``world_size``."""
    for what, count in (("KV heads", config.num_kv_heads), ("query heads", config.num_heads),
                        ("MLP columns (intermediate_size)", config.intermediate_size)):
        if count % world_size:
            divisors = [d for d in range(1, config.num_kv_heads + 1)
                        if config.num_kv_heads % d == 0 and config.intermediate_size % d == 0]
            raise KeepKVError(
                f"tensor parallelism over {world_size} ranks needs the model's {what} to divide by {world_size}, "
                f"but this {config.arch} model has {count} ({config.num_heads} query heads, {config.num_kv_heads} "
                f"KV heads); tp sizes that fit it: {', '.join(map(str, divisors))}"
            )


def _keep(linear: nn.Linear, rows: slice | None = None, columns: slice | None = None) -> None:
    """Replace ``linear``'s weight (and bias) by the given rows / input columns (a fresh contiguous copy, so the
    full tensor can be freed)."""
    weight = linear.weight.detach()
    if rows is not None:
        weight = weight[rows]
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.detach()[rows].clone(), requires_grad=False)
    if columns is not None:
        weight = weight[:, columns]
    linear.weight = nn.Parameter(weight.clone(memory_format=torch.contiguous_format), requires_grad=False)
    linear.out_features, linear.in_features = linear.weight.shape


def _block(rank: int, size: int) -> slice:
    return slice(rank * size, (rank + 1) * size)


def shard_network(network: Transformer, tensor_parallel: TensorParallel) -> HeadShard:
    """Keep this rank's heads and MLP columns (module docstring), install the two all-reduces per block, set
    ``network.config`` to the rank's shapes and ``network.head_shard``; returns the shard. In place."""
    config = network.config
    world, rank = tensor_parallel.world_size, tensor_parallel.rank
    check_divisible(config, world)
    heads, kv_heads, columns = config.num_heads // world, config.num_kv_heads // world, config.intermediate_size // world
    dim = config.head_dim
    reduce_output = _all_reduce_hook(tensor_parallel.group_name)
    for block in network.model.layers:
        attention, mlp = block.self_attn, block.mlp
        _keep(attention.q_proj, rows=_block(rank, heads * dim))
        _keep(attention.k_proj, rows=_block(rank, kv_heads * dim))
        _keep(attention.v_proj, rows=_block(rank, kv_heads * dim))
        _keep(attention.o_proj, columns=_block(rank, heads * dim))
        attention.num_heads, attention.num_kv_heads = heads, kv_heads
        _keep(mlp.gate_proj, rows=_block(rank, columns))
        _keep(mlp.up_proj, rows=_block(rank, columns))
        _keep(mlp.down_proj, columns=_block(rank, columns))
        attention.register_forward_hook(reduce_output)
        mlp.register_forward_hook(reduce_output)
    network.full_config = config
    network.config = config.replace(num_heads=heads, num_kv_heads=kv_heads, intermediate_size=columns, head_dim=dim)
    shard = HeadShard(group_name=tensor_parallel.group_name, rank=rank, world_size=world,
                      first_kv_head=rank * kv_heads, kv_heads=kv_heads, total_kv_heads=config.num_kv_heads)
    network.head_shard = shard
    return shard


def _all_reduce_hook(group_name: str):
    """A forward hook replacing a module's output (a partial sum over this rank's heads or columns) by the sum
    over all ranks."""
    import torch.distributed._functional_collectives as funcol

    def all_reduce_output(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return funcol.all_reduce(output, "sum", group_name)

    return all_reduce_output


def head_shard_of(network: nn.Module) -> HeadShard | None:
    """The :class:`HeadShard` of a sharded network, ``None`` for a whole one."""
    return getattr(network, "head_shard", None)
