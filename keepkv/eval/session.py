"""One loaded model shared by every method of a comparison, and the protocols that keep the grid affordable.

- :meth:`EvalModel.shared_prefill`: the context is prefilled ONCE per (model, cell group) with the full cache, into
  :class:`~keepkv.cache.compressed.CompressedLayerCache` buffers that keep the union of the score state the
  methods read (the longest observation window, accumulated attention if any method needs it).
- :meth:`EvalModel.answer`: for one method and budget, a copy of that prefill is compressed once to the budget
  (``GenerationEngine.start_from_prefill``, the kvpress protocol "full prefill, then compress"), the question is
  fed after the compression (``GenerationEngine.extend``), and the answer is decoded greedily with the method's
  decode-time behaviour (compression back to the budget every ``decode_slack`` new tokens).
- :meth:`EvalModel.answer_chunked`: the path of ``generate()`` (no shared prefill): the whole prompt is prefilled in
  chunks, compressed whenever ``budget + chunk`` slots fill and at the end, then the answer is decoded.
- :meth:`EvalModel.engine_for`: a :class:`~keepkv.generate.GenerationEngine` for one configuration over the shared
  weights (eager: ``compile=False``; every budget would be a new compiled graph, 60-90 s each).

Rows of a batch are left-padded; methods treat padding as empty slots, so every row is compressed as if alone
(budgets are computed from the padded width, a difference of a few tokens; the kept entries are measured).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from keepkv.cache.compressed import CompressedLayerCache
from keepkv.cache.manager import CacheManager
from keepkv.cache.methods import FullCache, make_method
from keepkv.eval.results import MethodConfig
from keepkv.generate import GenerationEngine, positions_from_valid
from keepkv.runtime import DEFAULT_RUNTIME


EXACT_CAPACITY = dataclasses.replace(DEFAULT_RUNTIME, capacity_quantum=1)  # eager evaluation: no graph to share


def shared_prefill_manager(config, dtype, device, window: int, accumulate: bool) -> CacheManager:
    """The full cache of a shared prefill (capacity = the prompt, not rounded) that also records a
    ``window``-query observation window and, with ``accumulate``, per-slot accumulated attention: the score state
    of every method of a comparison."""
    return CacheManager(config, dtype, device, FullCache(observe_window=window, accumulate_attention=accumulate),
                        runtime=EXACT_CAPACITY)


@dataclass
class Prefill:
    """A shared prefill: caches, the padded prompt, each row's length and the last prompt token's logits."""

    caches: list[CompressedLayerCache]
    input_ids: Tensor
    valid: Tensor
    lengths: Tensor
    logits: Tensor

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(token ids [B, T], valid [B, T])`` with every row right-aligned (left padding with ``pad_id``)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        valid[i, width - len(r):] = True
    return ids.to(device), valid.to(device)


class EvalModel:
    """A model loaded once (eager, float32) and engines for each method configuration over its weights."""

    def __init__(self, name: str, *, device: str | None = "cpu", prefill_chunk_size: int = 512) -> None:
        from keepkv.models import load

        self.name = name
        self.lm = load(name, compile=False, device=device, prefill_chunk_size=prefill_chunk_size)
        self.network, self.tokenizer, self.config = self.lm.network, self.lm.tokenizer, self.lm.config
        self.prefill_chunk_size = prefill_chunk_size
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @property
    def device(self) -> torch.device:
        return self.lm.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.dtype

    def engine_for(self, config: MethodConfig, budget: float | int, *, decode_slack: int = 64,
                   prefill_chunk_size: int | None = None, query_agnostic: bool = False) -> GenerationEngine:
        """An eager engine for ``config`` at ``budget``; ``query_agnostic``: its compressions run before the
        question is known (the method's :meth:`~keepkv.cache.policy.CompressionMethod.for_query_agnostic`)."""
        chunk = prefill_chunk_size or self.prefill_chunk_size
        method = make_method(config.method, **config.method_options())
        manager = CacheManager(self.config, self.dtype, self.device, method, budget, decode_slack,
                               query_agnostic=query_agnostic)
        return GenerationEngine(self.network, compile=False, prefill_chunk_size=chunk, cache_manager=manager)

    def shared_prefill(self, rows: list[list[int]], configs: list[MethodConfig]) -> Prefill:
        """Prefill left-padded ``rows`` once with the full cache, keeping the score state ``configs`` need."""
        methods = [make_method(c.method, **c.method_options()) for c in configs if not c.is_full]
        window = max([m.query_window for m in methods] or [1])
        accumulate = any(m.needs_accumulated_attention for m in methods)
        manager = shared_prefill_manager(self.config, self.dtype, self.device, window, accumulate)
        engine = GenerationEngine(self.network, compile=False, prefill_chunk_size=self.prefill_chunk_size,
                                  cache_manager=manager)
        input_ids, valid = left_pad(rows, self.pad_id, self.device)
        engine.prepare_caches(input_ids.shape[0], input_ids.shape[1], 0)
        with torch.inference_mode():
            logits, lengths = engine.prefill(input_ids, valid)
        return Prefill(manager.caches, input_ids, valid, lengths, logits)

    def answer(self, prefill: Prefill, config: MethodConfig, budget: float | int, suffixes: list[list[int]],
               max_new_tokens: int, decode_slack: int = 64, *, query_agnostic: bool) -> tuple[list[list[int]], float]:
        """Compress a copy of ``prefill`` for one configuration, feed each row's suffix (left-padded), decode
        greedily until every row emitted an end token or ``max_new_tokens``. ``query_agnostic``: the suffixes hold
        the question (it was not prefilled). Returns (new token ids per row, kept entries per head after the
        compression: mean over layers, rows and KV heads). The cache's decode slack is at least the longest
        suffix, so a question longer than ``decode_slack`` tokens is fed whole after the compression (it is not
        compressed mid-question); decoding then compresses every ``max(decode_slack, suffix)`` new entries."""
        suffix_ids, suffix_valid = left_pad(suffixes, self.pad_id, self.device)
        decode_slack = max(decode_slack, suffix_ids.shape[1])
        engine = self.engine_for(config, budget, decode_slack=decode_slack, query_agnostic=query_agnostic)
        engine.start_from_prefill(prefill.caches, prefill.width, suffix_ids.shape[1] + max_new_tokens)
        kept = float(engine.cache_manager.entries_per_head().float().mean())
        positions = prefill.lengths[:, None] + positions_from_valid(suffix_valid)
        with torch.inference_mode():
            logits = engine.extend(suffix_ids, positions, suffix_valid)[:, -1]
        return self._greedy(engine, logits, positions[:, -1] + 1, max_new_tokens), kept

    def answer_chunked(self, rows: list[list[int]], config: MethodConfig, budget: float | int,
                       max_new_tokens: int, decode_slack: int = 64) -> tuple[list[list[int]], float]:
        """The path of ``generate()``: prefill whole prompts (left-padded ``rows``, question included) in chunks of
        ``prefill_chunk_size``, compressing whenever ``budget + chunk`` slots fill and at the end of prefill, then
        decode greedily. The first answer token comes from the prefill's logits (before the end-of-prefill
        compression), as in ``generate()``. Returns (new token ids per row, kept entries per head after the
        end-of-prefill compression)."""
        from keepkv.sampling import SamplingConfig

        engine = self.engine_for(config, budget, decode_slack=decode_slack)
        input_ids, valid = left_pad(rows, self.pad_id, self.device)
        eos = tuple(self.tokenizer.eos_token_ids)
        steps, kept = [], 0.0
        for token in engine.generate_tokens(input_ids, valid, max_new_tokens, SamplingConfig(), stop_token_ids=eos):
            if not steps:  # the end-of-prefill compression has run
                kept = float(engine.cache_manager.entries_per_head().float().mean())
            steps.append(token)
        return self._until_end(torch.stack(steps, dim=1).tolist()), kept

    def _greedy(self, engine: GenerationEngine, logits: Tensor, next_position: Tensor,
                max_new_tokens: int) -> list[list[int]]:
        """Greedy answers from the first token's ``logits [B, vocab]`` (next positions ``[B]``) until every row
        emitted an end token or ``max_new_tokens``; each row's tokens before its first end token."""
        eos = torch.tensor(list(self.tokenizer.eos_token_ids) or [-1], device=self.device)
        with torch.inference_mode():
            token = logits.argmax(dim=-1)
            finished = torch.isin(token, eos)
            generated = [token]
            for _ in range(max_new_tokens - 1):
                if bool(finished.all()):
                    break
                logits = engine.decode_step(token, next_position)
                next_position = next_position + 1
                token = torch.where(finished, token, logits.argmax(dim=-1))
                finished = finished | torch.isin(token, eos)
                generated.append(token)
        return self._until_end(torch.stack(generated, dim=1).tolist())

    def _until_end(self, steps: list[list[int]]) -> list[list[int]]:
        """Each row's tokens before its first end token."""
        eos_set = set(self.tokenizer.eos_token_ids)
        answers = []
        for row in steps:
            out = []
            for t in row:
                if t in eos_set:
                    break
                out.append(t)
            answers.append(out)
        return answers
