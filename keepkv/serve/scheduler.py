"""The batching worker: one thread owns the model; concurrent requests become the rows of one ``generate`` call.

**Scheme (windowed static batching, not continuous batching).** keepkv's caches hold one write cursor per layer
for the whole batch (:class:`~keepkv.cache.kv_cache.LayerKVCache`) and a compressed cache compresses every row at
the same step, so a row cannot join a batch that is already decoding. The worker therefore:

1. waits for a job, then keeps collecting for ``batch_window`` seconds (or until ``max_batch`` jobs) every queued
   job that shares the first one's cache variant ``(method, kv_budget)`` and sampling settings (greedy requests
   always batch together; others wait for the next batch);
2. runs them as one left-padded batch (a :class:`~keepkv.serve.engine.BatchWork`) through its
   :class:`~keepkv.serve.engine.BatchEngine` (one process: :meth:`~keepkv.generate.GenerationEngine.generate_tokens`;
   ``--tp N``: the same calls replayed in lockstep on every rank, :mod:`keepkv.serve.lockstep`) with
   ``max_new_tokens`` = the largest ``max_tokens`` of the batch; every row stops on its own (end-of-sequence token,
   a stop string, its own ``max_tokens``) and its slot is released at once;
3. stops the batch as soon as every row has finished or been cancelled (a client that disconnects mid-stream
   cancels its job: the worker drops the row at the next step and releases its slot; when no live row is left
   the generation is closed), so a cancelled request never keeps the engine busy on its own.

Requests arriving while a batch decodes wait for the next batch. With ``compile=True`` the batch is padded with
dummy rows to a power of two (at most ``max_batch``) so the decode step compiles one graph per bucket, not per
batch size. Greedy rows of a padded batch give the tokens the same prompt gives alone (float32: up to ties).

While idle the worker calls the engine's ``idle()`` every ``engine.heartbeat_seconds`` (never for one process), and
``shutdown()`` once when it stops. Each job reports through ``deliver(Event)``, called from the worker thread (the
HTTP layer hands it to its event loop thread-safely). ``slots_in_use`` counts admitted jobs not yet finished or cancelled (queued + running).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from keepkv.errors import KeepKVError
from keepkv.serve.engine import BatchEngine, BatchWork, LocalBatchEngine
from keepkv.serve.protocol import JobSpec
from keepkv.serve.variants import ModelVariants


@dataclass(frozen=True)
class Event:
    """What a job receives: new text, and on the last event a ``finish_reason`` (``"stop"`` / ``"length"``) or an
    ``error`` message."""

    text: str = ""
    finish_reason: str | None = None
    error: str | None = None


@dataclass(eq=False)
class Job:
    """One admitted choice: its spec, its delivery callback, and what it generated so far."""

    spec: JobSpec
    deliver: Callable[[Event], None]
    id: int = 0
    completion_tokens: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: bool = False


class RowDecoder:
    """Token ids of one row -> text deltas: holds back an incomplete UTF-8 character and any tail that could start
    a stop string, so the concatenated deltas equal the final text (decoded ids cut at the first stop string)."""

    def __init__(self, tokenizer, eos: set[int], stop: tuple[str, ...], max_tokens: int) -> None:
        self.tokenizer, self.eos, self.stop, self.max_tokens = tokenizer, eos, stop, max_tokens
        self.ids: list[int] = []
        self.emitted = ""

    def _held_back(self, text: str) -> int:
        """Characters at the end of ``text`` that are a proper prefix of some stop string."""
        return max((n for s in self.stop for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)

    def push(self, token_id: int) -> tuple[str, str | None]:
        """``(delta, finish_reason or None)`` after one more token."""
        if token_id in self.eos:
            return self._finish(self.tokenizer.decode(self.ids), "stop")
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        cuts = [text.find(s) for s in self.stop if s in text]
        if cuts:
            return self._finish(text[: min(cuts)], "stop")
        if len(self.ids) >= self.max_tokens:
            return self._finish(text, "length")
        if text.endswith("\ufffd"):
            return "", None  # an incomplete UTF-8 sequence: wait for its next byte
        safe = text[: len(text) - self._held_back(text)]
        delta = safe[len(self.emitted):] if safe.startswith(self.emitted) else ""
        self.emitted += delta
        return delta, None

    def _finish(self, final: str, reason: str) -> tuple[str, str]:
        delta = final[len(self.emitted):] if final.startswith(self.emitted) else ""
        self.emitted += delta
        return delta, reason


def padded_rows(rows: int, max_batch: int) -> int:
    """The next power of two >= ``rows``, at most ``max(max_batch, rows)`` (compiled decode graphs per bucket)."""
    return min(1 << (rows - 1).bit_length(), max(max_batch, rows))


class BatchScheduler:
    """The worker thread and its queue (see the module docstring). ``start()`` before ``submit``; ``stop()`` ends
    the thread and fails every queued job."""

    def __init__(self, variants: ModelVariants, *, max_batch: int = 8, batch_window: float = 0.02,
                 engine: BatchEngine | None = None) -> None:
        if max_batch < 1:
            raise KeepKVError(f"max_batch must be an integer >= 1, got {max_batch}")
        if not batch_window >= 0:
            raise KeepKVError(f"batch_window must be a number of seconds >= 0, got {batch_window}")
        self.variants, self.max_batch, self.batch_window = variants, max_batch, batch_window
        self.engine: BatchEngine = engine if engine is not None else LocalBatchEngine(variants)
        self._pending: deque[Job] = deque()
        self._admitted: set[Job] = set()
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.rows_run = 0
        self.running_rows = 0
        self.cancelled_rows = 0  # running rows dropped because their client went away

    # ---- public -------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="keepkv-serve-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            for job in list(self._pending):
                self._finish(job, Event(error="the server is shutting down"))
            self._pending.clear()

    def submit(self, spec: JobSpec, deliver: Callable[[Event], None]) -> Job:
        """Queue one job; ``deliver`` gets its events from the worker thread."""
        job = Job(spec, deliver, id=next(self._ids))
        with self._cond:
            if self._stopping or self._thread is None or not self._thread.is_alive():
                raise RuntimeError("the batching worker is not running")
            self._admitted.add(job)
            self._pending.append(job)
            self._cond.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """Free ``job``'s slot (a client went away): a queued job is dropped now, a running row at the next step."""
        job.cancelled.set()
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)
                self._release(job)

    @property
    def slots_in_use(self) -> int:
        """Jobs admitted and not yet finished or cancelled (queued + running)."""
        with self._cond:
            return len(self._admitted)

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._pending)

    # ---- worker -------------------------------------------------------------------------------------------
    def _release(self, job: Job) -> None:
        job.done = True
        self._admitted.discard(job)

    def _finish(self, job: Job, event: Event) -> None:
        """Release ``job``'s slot, then deliver its last event (so a client that has its answer sees the slot
        free)."""
        with self._cond:
            self._release(job)
        try:
            job.deliver(event)
        except RuntimeError:
            pass  # the request's event loop is gone: nobody is listening

    def _next_batch(self) -> list[Job] | None:
        """Block for a job, then collect compatible ones for ``batch_window`` seconds (module docstring)."""
        with self._cond:
            while not self._pending and not self._stopping:
                if not self._cond.wait(self.engine.heartbeat_seconds):
                    return []  # idle for a heartbeat: the loop calls engine.idle()
            if self._stopping:
                return None
            deadline = time.monotonic() + self.batch_window
            while True:
                first = self._pending[0]
                key = (first.spec.variant, first.spec.sampling)
                batch = [j for j in self._pending if (j.spec.variant, j.spec.sampling) == key][: self.max_batch]
                left = deadline - time.monotonic()
                if len(batch) >= self.max_batch or left <= 0 or self._stopping:
                    break
                self._cond.wait(left)
                if not self._pending:
                    return []
            for job in batch:
                self._pending.remove(job)
            return batch

    def _loop(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                if batch:
                    self._run(batch)
                else:
                    self.engine.idle()
        finally:
            self.engine.shutdown()

    def _run(self, jobs: list[Job]) -> None:
        self.batches += 1
        self.rows_run += len(jobs)
        self.running_rows = len(jobs)
        try:
            self._generate(jobs)
        except Exception as err:  # noqa: BLE001 -- a failed batch fails its requests, never the server
            message = str(err) if isinstance(err, KeepKVError) else f"{type(err).__name__}: {err}"
            for job in jobs:
                if not job.done:
                    self._finish(job, Event(error=message))
        finally:
            for job in jobs:
                if not job.done:
                    self._finish(job, Event(finish_reason="length"))
            self.running_rows = 0

    def _generate(self, jobs: list[Job]) -> None:
        first = jobs[0].spec
        model = self.variants.get(first.variant)
        tokenizer = model.tokenizer
        eos = set(tokenizer.eos_token_ids)
        rows = [tuple(job.spec.prompt_ids) for job in jobs]
        if model.engine.compile:
            rows += [rows[0]] * (padded_rows(len(rows), self.max_batch) - len(rows))
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        work = BatchWork(tuple(rows), pad_id, first.variant, max(job.spec.max_tokens for job in jobs),
                         first.sampling, tuple(eos))
        decoders = [RowDecoder(tokenizer, eos, job.spec.stop, job.spec.max_tokens) for job in jobs]
        self.engine.start(work)
        try:
            while (token := self.engine.step()) is not None:
                ids = token.tolist()
                for row, job in enumerate(jobs):
                    if job.done:
                        continue
                    if job.cancelled.is_set():
                        with self._cond:
                            self._release(job)
                        self.cancelled_rows += 1
                        continue
                    delta, finish = decoders[row].push(ids[row])
                    if ids[row] not in eos:
                        job.completion_tokens += 1
                    if finish is not None:
                        self._finish(job, Event(delta, finish))
                    elif delta:
                        try:
                            job.deliver(Event(delta))
                        except RuntimeError:
                            job.cancelled.set()
                if all(job.done for job in jobs):
                    break
        finally:
            self.engine.finish()
