"""``keepkv serve --tp N``: rank 0 serves HTTP and schedules; every rank runs each engine call in lockstep.

Under tensor parallelism (:mod:`keepkv.distributed`) every rank holds a slice of every layer, so every forward
must run on all ranks at once, with the same inputs, in the same order (each layer all-reduces its attention and
MLP outputs). The server keeps that simple:

- **rank 0** runs uvicorn, the routes and the batching worker (:mod:`keepkv.serve.scheduler`) exactly as one
  process does; its worker drives a :class:`LockstepEngine`, which *announces* every
  :class:`~keepkv.serve.engine.BatchEngine` call (``("start", BatchWork)``, ``("step",)``, ``("finish",)``,
  ``("idle",)``, ``("shutdown",)``) to the other ranks and then runs it on its own shard;
- **every other rank** runs :func:`follow`: receive the next call, run it on its own
  :class:`~keepkv.serve.engine.LocalBatchEngine`, until ``("shutdown",)``. It never sees a request or a token:
  rank 0 alone decodes text; the followers' tokens equal rank 0's because the replicated ``lm_head`` reads the
  all-reduced hidden state and sampling uses the seed rank 0 fixed in the work
  (:meth:`~keepkv.serve.engine.BatchWork.with_fixed_seed`).

**Transport.** :class:`ControlChannel`: ``torch.distributed.broadcast_object_list`` from rank 0 over a gloo group
made for the purpose (``dist.new_group(backend="gloo")``; CPU objects whatever the model's device, so the same
code serves gloo/CPU and NCCL/GPU, where the model's all-reduces stay on NCCL). Cost: one broadcast of a small
pickled message (a size, then the bytes) per engine call, i.e. per decode step of a batch, not per row; the
tokens themselves never travel.

**Faults.** The control group has the tensor-parallel timeout (``KEEPKV_TP_TIMEOUT``,
:mod:`keepkv.distributed.group`). While no batch runs, rank 0 sends ``("idle",)`` every
:attr:`ControlChannel.heartbeat_seconds` (a quarter of the timeout, at most :data:`MAX_HEARTBEAT_SECONDS`), so a
healthy idle server never times out and a dead follower is noticed within a heartbeat. Work that keepkv's checks
refuse (a :class:`~keepkv.errors.KeepKVError` from the engine, e.g. a budget below a method's protected entries)
is refused alike on every rank before any collective: the batch fails, serving goes on. Any other failure of an
engine call, or of the channel, ends the group (the ranks can no longer be known to be in step): a follower exits
with ``keepkv: error: [rank R] tensor parallelism: rank R lost its peers ...`` (or the error itself), rank 0
fails the running requests with that message, stops the server (``on_failure``) and exits with status 2.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from keepkv.distributed.group import TensorParallel, peer_failure_as_error
from keepkv.errors import KeepKVError
from keepkv.serve.engine import BatchWork, LocalBatchEngine

MAX_HEARTBEAT_SECONDS = 2.0
log = logging.getLogger("keepkv.serve")

Message = tuple  # ("start", BatchWork) | ("step",) | ("finish",) | ("idle",) | ("shutdown",)


@dataclass
class ControlChannel:
    """Rank 0's announcements to the other ranks: a gloo process group of the tensor-parallel ranks."""

    group: Any
    rank: int
    timeout_seconds: float

    @classmethod
    def create(cls, tensor_parallel: TensorParallel) -> ControlChannel:
        """The channel of this rank (a collective call: every rank makes it, in the same order)."""
        import datetime

        import torch.distributed as dist

        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=tensor_parallel.timeout_seconds))
        return cls(group, tensor_parallel.rank, tensor_parallel.timeout_seconds)

    @property
    def heartbeat_seconds(self) -> float:
        return min(MAX_HEARTBEAT_SECONDS, self.timeout_seconds / 4)

    def send(self, message: Message) -> None:
        """Rank 0: broadcast ``message`` to every other rank."""
        self._broadcast(message)

    def receive(self) -> Message:
        """Another rank: wait for rank 0's next message."""
        return self._broadcast(None)

    def _broadcast(self, message: Message | None) -> Message:
        import torch.distributed as dist

        box = [message]
        with peer_failure_as_error(self.rank, self.timeout_seconds):
            dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


class LockstepEngine:
    """Rank 0's :class:`~keepkv.serve.engine.BatchEngine`: announce each call, then run it on ``local``. After a
    failure every call raises it again without touching the group; ``on_failure(error)`` is called once."""

    def __init__(self, local: LocalBatchEngine, channel: ControlChannel,
                 on_failure: Callable[[KeepKVError], None] | None = None) -> None:
        self.local, self.channel, self.on_failure = local, channel, on_failure
        self.heartbeat_seconds: float | None = channel.heartbeat_seconds
        self.failure: KeepKVError | None = None

    def _call(self, message: Message, run: Callable[[], Any]) -> Any:
        if self.failure is not None:
            raise self.failure
        try:
            self.channel.send(message)
        except KeepKVError as error:  # a peer died or timed out (ControlChannel names it)
            self._fail(error)
            raise
        try:
            return run()
        except KeepKVError:
            raise  # the work refused by keepkv's checks: every rank refuses it alike; the batch fails, serving goes on
        except Exception as error:  # noqa: BLE001 -- a collective or the model failed: the ranks are out of step
            failure = KeepKVError(
                f"tensor parallelism: rank 0 lost its peers or failed during {message[0]!r} "
                f"({type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}); the ranks can no "
                "longer be known to be in step, so the server stops (see the other ranks' errors)")
            self._fail(failure)
            raise failure from None

    def _fail(self, failure: KeepKVError) -> None:
        self.failure = failure
        log.error("%s", failure)
        if self.on_failure is not None:
            self.on_failure(failure)

    def start(self, work: BatchWork) -> None:
        work = work.with_fixed_seed()
        self._call(("start", work), lambda: self.local.start(work))

    def step(self) -> Tensor | None:
        return self._call(("step",), self.local.step)

    def finish(self) -> None:
        if self.failure is None:
            self._call(("finish",), self.local.finish)
        else:
            self.local.finish()

    def idle(self) -> None:
        if self.failure is None:
            try:
                self._call(("idle",), lambda: None)
            except KeepKVError:
                pass  # recorded in self.failure; the server is stopping

    def shutdown(self) -> None:
        if self.failure is None:
            try:
                self._call(("shutdown",), self.local.shutdown)
            except KeepKVError:
                pass
        self.local.shutdown()


def follow(local: LocalBatchEngine, channel: ControlChannel) -> None:
    """Another rank: replay rank 0's engine calls on ``local`` until ``("shutdown",)`` (module docstring). A
    :class:`~keepkv.errors.KeepKVError` of a call (the work refused by keepkv's checks, as rank 0 refuses it too) is
    skipped; a peer failure or any other error propagates (the caller exits non-zero; rank 0 then sees a peer
    failure)."""
    calls = {"start": local.start, "step": local.step, "finish": local.finish, "idle": lambda: None}
    while True:
        kind, *payload = channel.receive()
        if kind == "shutdown":
            local.shutdown()
            return
        if kind not in calls:
            raise KeepKVError(f"tensor parallelism: rank {channel.rank} got an unknown control message {kind!r}")
        try:
            calls[kind](*payload)
        except KeepKVError as error:
            log.debug("rank %d: %s refused: %s", channel.rank, kind, error)
