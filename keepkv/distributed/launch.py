"""Running a ``keepkv`` subcommand as one rank of a tensor-parallel group (``--tp N`` under torchrun).

:func:`tensor_parallel_command` wraps a subcommand's ``run(args)``: with ``args.tp > 1`` it

- joins the process group (:func:`keepkv.distributed.group.init_tensor_parallel`; the model loader then shards
  the network, ``load(..., tp=N)``);
- lets rank 0 alone write to stdout and stderr (the other ranks run the same generation silently; an error on
  another rank is still printed, prefixed with its rank, on that rank's own stderr);
- gives every rank rank 0's sampling seed when the command samples (``--temperature`` > 0) without ``--seed``
  (each rank must draw the same tokens);
- turns a collective that fails because a peer died or timed out into a
  :class:`~keepkv.errors.KeepKVError` (``keepkv: error: tensor parallelism: rank R lost its peers ...``, exit 2).

With ``tp`` 1 (or absent) it is the subcommand itself.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable
from typing import Any

from keepkv.errors import KeepKVError


def tensor_parallel_command(run: Callable[[Any], int]) -> Callable[[Any], int]:
    """``run`` as a tensor-parallel rank when ``args.tp > 1`` (module docstring)."""

    @functools.wraps(run)
    def ranked(args: Any) -> int:
        tp = getattr(args, "tp", 1) or 1
        if tp == 1:
            return run(args)
        from keepkv.distributed.group import init_tensor_parallel, peer_failure_as_error

        handle = init_tensor_parallel(tp, getattr(args, "device", None))
        with peer_failure_as_error(handle.rank, handle.timeout_seconds):
            _agree_on_seed(args, handle)
        if handle.rank == 0:
            with peer_failure_as_error(handle.rank, handle.timeout_seconds):
                return run(args)
        stderr = sys.stderr
        try:
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                with peer_failure_as_error(handle.rank, handle.timeout_seconds):
                    return run(args)
        except KeepKVError as err:
            print(f"keepkv: error: [rank {handle.rank}] {err}", file=stderr)
            return 2

    return ranked


def _agree_on_seed(args: Any, handle: Any) -> None:
    """``args.seed`` = a seed drawn by rank 0 when ``args`` samples (``temperature > 0``) without one."""
    if getattr(args, "seed", 0) is not None or not (getattr(args, "temperature", 0.0) or 0.0) > 0:
        return
    import secrets

    import torch.distributed as dist

    from keepkv.sampling import MAX_SEED

    box = [secrets.randbelow(MAX_SEED + 1) if handle.rank == 0 else None]
    dist.broadcast_object_list(box, src=0, device=handle.device)
    args.seed = box[0]
