"""keepkv beyond one process: tensor parallelism on ``torch.distributed``.

- :mod:`keepkv.distributed.group`: the process group from torchrun's environment (gloo on CPU, NCCL on CUDA),
  timeouts, peer failures as :class:`~keepkv.errors.KeepKVError`;
- :mod:`keepkv.distributed.tp`: sharding a loaded :class:`~keepkv.models.transformer.Transformer` (heads and MLP
  columns; two all-reduces per block);
- :mod:`keepkv.distributed.heads`: the cross-head reductions of the compression methods, agreed across ranks
  (no-ops in one process);
- :mod:`keepkv.distributed.launch`: ``keepkv generate --tp N`` as one rank of the group.

Use: ``torchrun --nproc-per-node 2 -m keepkv generate MODEL --tp 2 --kv-budget 0.1 --prompt ...``, or in
Python (each of the torchrun processes): ``load(MODEL, kv_budget=0.1, tp=2)``.
"""

from keepkv.distributed.group import TensorParallel, init_tensor_parallel
from keepkv.distributed.heads import HeadShard
from keepkv.distributed.tp import shard_network

__all__ = ["HeadShard", "TensorParallel", "init_tensor_parallel", "shard_network"]
