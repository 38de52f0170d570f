"""The tensor-parallel process group: started from torchrun's environment, the same code on CPU and GPU.

``torchrun --nproc-per-node N ...`` (or its multi-node rendezvous) starts N processes and gives each ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_tensor_parallel` joins them into
the default process group (``env://``) with

- backend ``gloo`` on CPU, ``nccl`` on CUDA (the device type comes from ``device``: ``None`` means CUDA when
  available); a CUDA rank uses ``cuda:LOCAL_RANK``;
- a timeout (``KEEPKV_TP_TIMEOUT`` seconds, default :data:`DEFAULT_TIMEOUT_SECONDS`): a collective that waits
  longer for a peer fails instead of hanging. A peer that *dies* is usually noticed at once (its connections
  close); :func:`peer_failure_as_error` turns either into a :class:`~keepkv.errors.KeepKVError` naming the rank.

It is idempotent (a second model in the same process reuses the group) and registers
``destroy_process_group`` at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from keepkv.errors import KeepKVError

TIMEOUT_ENV = "KEEPKV_TP_TIMEOUT"
DEFAULT_TIMEOUT_SECONDS = 600.0
"""Seconds a collective waits for its peers (a cold ``torch.compile`` on a busy CPU can delay one rank for
minutes, so the default is generous); ``KEEPKV_TP_TIMEOUT`` overrides it."""


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in the tensor-parallel group (``group_name``: the default group's name, as the
    functional collectives take it)."""

    rank: int
    world_size: int
    device: torch.device
    backend: str
    group_name: str
    timeout_seconds: float


def timeout_seconds() -> float:
    """``KEEPKV_TP_TIMEOUT`` (a positive number of seconds) or :data:`DEFAULT_TIMEOUT_SECONDS`."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise KeepKVError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return value


def _environment(tp: int) -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` from torchrun's variables, checked against ``tp``."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise KeepKVError(
            f"tp={tp} needs {tp} processes started by torchrun (it sets RANK and WORLD_SIZE), e.g. "
            f"`torchrun --nproc-per-node {tp} -m keepkv generate MODEL --tp {tp} ...`; in one process use tp=1"
        )
    try:
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except (KeyError, ValueError):
        raise KeepKVError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them)") from None
    if world != tp:
        raise KeepKVError(f"tp={tp} but torchrun started {world} processes (WORLD_SIZE): tensor parallelism uses "
                          f"every process, so pass --nproc-per-node {tp} (or --tp {world})")
    return rank, world, local


def init_tensor_parallel(tp: int, device: torch.device | str | None = None) -> TensorParallel:
    """Join (or reuse) the default process group of ``tp`` processes; see the module docstring."""
    import torch.distributed as dist

    if not dist.is_available():
        raise KeepKVError("this torch build has no torch.distributed, which tensor parallelism needs")
    rank, world, local_rank = _environment(tp)
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind not in ("cpu", "cuda"):
        raise KeepKVError(f"tensor parallelism runs on cpu (gloo) or cuda (nccl), not {kind!r}")
    if kind == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise KeepKVError(f"rank {rank} has LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} "
                              "CUDA devices are visible")
        torch_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(torch_device)
    else:
        torch_device = torch.device("cpu")
    backend = "nccl" if kind == "cuda" else "gloo"
    seconds = timeout_seconds()
    if dist.is_initialized():
        if dist.get_world_size() != world:
            raise KeepKVError(f"a process group of {dist.get_world_size()} ranks already exists; tp={tp} needs {world}")
    else:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds),
                                device_id=torch_device if kind == "cuda" else None)
        atexit.register(_destroy)
    return TensorParallel(rank=rank, world_size=world, device=torch_device, backend=dist.get_backend(),
                          group_name=dist.group.WORLD.group_name, timeout_seconds=seconds)


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def is_peer_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because a peer died, hung past the timeout or lost its link."""
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        word in text for word in ("gloo", "nccl", "connection closed", "connection reset", "timed out", "broken pipe")
    )


@contextlib.contextmanager
def peer_failure_as_error(rank: int, seconds: float) -> Iterator[None]:
    """Inside: a collective failing because of another rank becomes a :class:`KeepKVError` naming this rank."""
    try:
        yield
    except Exception as error:
        if isinstance(error, KeepKVError) or not is_peer_failure(error):
            raise
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise KeepKVError(
            f"tensor parallelism: rank {rank} lost its peers: another rank died, failed or did not answer within "
            f"{seconds:g}s ({TIMEOUT_ENV}); see that rank's own error. ({type(error).__name__}: {first_line})"
        ) from None
