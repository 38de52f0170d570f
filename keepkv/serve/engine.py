"""The engine seam of ``keepkv serve``: every model call the batching worker makes, as a small replayable interface.

The worker (:mod:`keepkv.serve.scheduler`) decides *what* to run; a :class:`BatchEngine` runs it. A batch is
described completely by a :class:`BatchWork` (plain Python values: token ids, the cache variant, sampling with a
fixed seed), and its life is three calls:

- ``start(work)``: set the batch up on its cache variant (nothing runs yet);
- ``step()``: the next ``[rows]`` token tensor (the first step allocates the caches, prefills and samples the first
  token; every later one is one decode step), or ``None`` when
  the generation has ended (``max_new_tokens`` reached or every row hit a stop token);
- ``finish()``: end the batch (after the last step, or early when every row finished or was cancelled); nothing of
  the batch is referenced afterwards (the caches are reused by the variant's next batch).

``idle()`` is called about every :attr:`BatchEngine.heartbeat_seconds` while no batch runs (``None``: never) and
``shutdown()`` once when the worker stops. :class:`LocalBatchEngine` is the one-process engine (``idle`` and
``shutdown`` do nothing). Because a batch depends on nothing but its :class:`BatchWork` and the order of these
calls, another process holding the same model can replay them: that is how tensor-parallel ranks follow rank 0
(:mod:`keepkv.serve.lockstep`).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import Tensor

from keepkv.generate import GenerationStats
from keepkv.sampling import MAX_SEED, SamplingConfig
from keepkv.serve.variants import ModelVariants, VariantKey


@dataclass(frozen=True)
class BatchWork:
    """One batch: its rows' prompt token ids (left-padded with ``pad_id`` to the longest), the cache variant,
    ``max_new_tokens``, sampling and the stop token ids. Plain values only (it is sent between processes)."""

    rows: tuple[tuple[int, ...], ...]
    pad_id: int
    variant: VariantKey
    max_new_tokens: int
    sampling: SamplingConfig
    stop_token_ids: tuple[int, ...]

    def tensors(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(input_ids, valid)``, both ``[rows, width]`` on ``device``: left padding, as
        :meth:`~keepkv.models.language_model.LanguageModel.encode_prompts` pads."""
        width = max(len(ids) for ids in self.rows)
        input_ids = torch.full((len(self.rows), width), self.pad_id, dtype=torch.long)
        valid = torch.zeros((len(self.rows), width), dtype=torch.bool)
        for row, ids in enumerate(self.rows):
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            valid[row, width - len(ids):] = True
        return input_ids.to(device), valid.to(device)

    def with_fixed_seed(self) -> BatchWork:
        """The same work with a drawn seed when it samples without one (so that replaying it elsewhere samples the
        same tokens); greedy or seeded work is returned unchanged."""
        if self.sampling.greedy or self.sampling.seed is not None:
            return self
        seed = secrets.randbelow(MAX_SEED + 1)
        return replace(self, sampling=replace(self.sampling, seed=seed))


class BatchEngine(Protocol):
    """What the batching worker calls (module docstring)."""

    heartbeat_seconds: float | None

    def start(self, work: BatchWork) -> None: ...

    def step(self) -> Tensor | None: ...

    def finish(self) -> None: ...

    def idle(self) -> None: ...

    def shutdown(self) -> None: ...


class LocalBatchEngine:
    """Runs batches on this process's model: :meth:`~keepkv.generate.GenerationEngine.generate_tokens` of the
    work's variant (:class:`~keepkv.serve.variants.ModelVariants`), one token tensor per :meth:`step`."""

    heartbeat_seconds: float | None = None

    def __init__(self, variants: ModelVariants) -> None:
        self.variants = variants
        self._tokens: Iterator[Tensor] | None = None

    def start(self, work: BatchWork) -> None:
        self.finish()
        model = self.variants.get(work.variant)
        model.last_stats = GenerationStats()
        input_ids, valid = work.tensors(model.device)
        self._tokens = model.engine.generate_tokens(input_ids, valid, work.max_new_tokens, work.sampling,
                                                    work.stop_token_ids, model.last_stats)

    def step(self) -> Tensor | None:
        if self._tokens is None:
            return None
        return next(self._tokens, None)

    def finish(self) -> None:
        if self._tokens is not None:
            tokens, self._tokens = self._tokens, None
            tokens.close()

    def idle(self) -> None:
        pass

    def shutdown(self) -> None:
        self.finish()
