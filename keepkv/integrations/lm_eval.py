"""keepkv's engine as an lm-evaluation-harness model (``pip install 'keepkv[lm-eval]'``), registered as ``keepkv``.

```bash
python -m keepkv.integrations.lm_eval --model keepkv \\
    --model_args pretrained=SmolLM2-135M-Instruct,kv_budget=0.2,method=keepkv --tasks lambada_openai
```
```python
import lm_eval
import keepkv.integrations.lm_eval  # noqa: F401  (registers the model name "keepkv" with lm-eval)
results = lm_eval.simple_evaluate(model="keepkv", model_args="pretrained=SmolLM2-135M-Instruct,kv_budget=0.2",
                                  tasks=["lambada_openai"])
```

**How the name reaches lm-eval.** lm-eval 0.4.13 (the release this was written against) resolves ``--model`` in
its own registry and scans no plugin entry points, so importing this module registers the name (the ``@register``
call at the bottom), and ``python -m keepkv.integrations.lm_eval ARGS`` is the ``lm_eval`` command line (``ARGS``
exactly as for ``lm_eval``) with the name registered first. keepkv's ``pyproject.toml`` also declares the
``lm_eval.models`` entry point ``keepkv``, which lm-eval versions that discover plugins through that group
find without the import. Only this module imports ``lm_eval``; keepkv's core never does.

**model_args.** ``pretrained`` (required): a registry name, a hub repo id, a Hugging Face folder or a ``.gguf``
file, as for :func:`keepkv.models.load` (or, from Python, an already loaded
:class:`~keepkv.models.LanguageModel`, whose weights are shared). Everything ``load`` accepts passes through:
``kv_budget``, ``method``, ``dtype``, ``device``, ``compile``, ``prefill_chunk_size``, ``decode_slack``,
``prefill_compression``, ``revision``, ``local_files_only`` and any option of the method (``window=64``,
``variant=zip`` ...). Besides: ``batch_size`` (lm-eval's ``--batch_size``; ``auto`` means ``max_batch_size``,
default 8), ``max_length`` (default: the model's context), ``max_gen_toks`` (default 256, when a task gives none)
and ``seed`` (sampling tasks only). A name that is neither is a :class:`~keepkv.errors.KeepKVError` listing what
is allowed. lm-eval parses ``kv_budget=1`` as the integer 1 (one entry): write ``kv_budget=1.0`` for the full cache.
lm-eval's ``--device`` defaults to ``cuda:0``: without CUDA a ``cuda`` device falls back to the CPU with a
warning, as lm-eval's ``hf`` model does.

**What is computed, exactly as keepkv's engine does it** (:class:`~keepkv.generate.GenerationEngine`):

- ``generate_until``: requests with the same generation settings are batched (left padding, longest first) and
  run through :meth:`GenerationEngine.generate_tokens` with the loop of :meth:`LanguageModel.generate`: the same
  tokens as ``model.generate(context, max_new_tokens=max_gen_toks, stop=until)`` (greedy unless the task sets
  ``do_sample`` with a ``temperature > 0``; ends at end-of-sequence, the first ``until`` string, cut from the text,
  or ``max_gen_toks``). A context longer than ``max_length - max_gen_toks`` tokens keeps its last tokens.
- ``loglikelihood(context, continuation)``: the context is the prompt: it is prefilled and compressed exactly as
  ``generate`` would (chunked prefill, compressed whenever ``budget + chunk`` slots fill and to the budget at the
  end of prefill); the first continuation token is scored from the prefill's last logits, and every next one from
  a decode step fed the previous continuation token (teacher forcing through :meth:`GenerationEngine.decode_step`,
  so the cache is compressed back every ``decode_slack`` steps as in decoding). The result is therefore
  ``sum_i ln p_engine(cont_i | context, cont_<i)`` where ``p_engine`` is the distribution keepkv's generation
  samples from, and ``is_greedy`` says whether greedy ``generate`` would produce exactly these tokens. With the
  full cache this equals one teacher-forced forward over ``context + continuation`` (tested to 1e-4). Token
  splitting follows lm-eval's convention: ``continuation`` tokens are those of ``encode(context + continuation)``
  after ``encode(context)``, trailing spaces of the context moving to the continuation; an empty context is the
  BOS token (EOS when there is none). A context is cut on the left so that context + continuation fit
  ``max_length``.
- ``loglikelihood_rolling(text)``: lm-eval's disjoint rolling windows of ``max_length`` tokens (the first after
  the BOS/EOS prefix token); each window is a prompt teacher-forced through the engine's chunked prefill
  (:meth:`GenerationEngine.extend` chunk by chunk, as ``keepkv eval ppl``): the cache is compressed whenever the
  next chunk would not fit ``budget + prefill_chunk_size`` slots, so later tokens are scored from the compressed
  cache (``prefill_chunk_size=64`` is ``keepkv eval ppl``'s schedule; ``prefill_compression=once`` compresses
  nothing before a window's end, i.e. scores it with the full cache).

**Batches share a budget.** keepkv's cache manager gives every row of a batch the budget of its longest prompt
(:mod:`keepkv.cache.budgets`), so with a fractional ``kv_budget`` a short request in a batch keeps more entries than
alone, and results depend on the batch size. ``batch_size=1`` (lm-eval's default) gives each request its own
budget. A fractional budget below the method's protected entries (KeepKV: 4 sinks + 32 recent + 1) for a short
context is the engine's :class:`KeepKVError`; use an integer budget or a smaller ``window`` for short tasks.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from keepkv.checks import require_int, shown
from keepkv.errors import KeepKVError
from keepkv.eval.session import left_pad
from keepkv.generate import GenerationStats, positions_from_valid
from keepkv.models.language_model import LanguageModel, collect_texts, hide_torch_compiler_deprecations, stop_sequences
from keepkv.sampling import SamplingConfig

try:
    from lm_eval.api.model import LM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as err:  # pragma: no cover - depends on the environment
    raise KeepKVError(
        "keepkv.integrations.lm_eval needs lm-evaluation-harness: pip install 'keepkv[lm-eval]'"
    ) from err

logger = logging.getLogger(__name__)

MODEL_NAME = "keepkv"
DEFAULT_BATCH_SIZE = 8  # what batch_size=auto means when no max_batch_size is given
DEFAULT_MAX_GEN_TOKS = 256
LOAD_ARGS = ("kv_budget", "method", "dtype", "device", "compile", "prefill_chunk_size", "decode_slack",
             "prefill_compression", "revision", "local_files_only")
OWN_ARGS = ("pretrained", "batch_size", "max_batch_size", "max_length", "max_gen_toks", "seed")
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")


def allowed_model_args() -> str:
    return ", ".join(OWN_ARGS + LOAD_ARGS) + " and the method's options"


def parse_batch_size(batch_size: Any, max_batch_size: Any) -> int:
    """lm-eval's ``--batch_size``: a positive int (or its text); ``auto`` / ``auto:N`` -> ``max_batch_size`` or 8
    (keepkv does not search for the largest batch that fits)."""
    require_int(max_batch_size, "max_batch_size", 1, allow_none=True)
    if isinstance(batch_size, str):
        text = batch_size.strip().lower()
        if text.startswith("auto"):
            return max_batch_size or DEFAULT_BATCH_SIZE
        if text.isdigit():
            batch_size = int(text)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise KeepKVError(f"batch_size must be a positive integer or 'auto', got {shown(batch_size)}")
    return batch_size


def _sibling(base: LanguageModel, cache_args: dict[str, Any], method_options: dict[str, Any]) -> LanguageModel:
    """A :class:`LanguageModel` sharing ``base``'s network and tokenizer with its own cache manager (method,
    budget, schedule), checked as :func:`keepkv.models.load` checks them."""
    from keepkv.models.loading import check_load_arguments, resolve_method

    for name in ("dtype", "device", "revision", "local_files_only"):
        if cache_args.get(name) is not None:
            raise KeepKVError(f"model_args {name}=... applies when pretrained names a model to load, not to an "
                              "already loaded LanguageModel (load it with that setting instead)")
    compile_ = cache_args.get("compile")
    if compile_ is not None and compile_ != base.engine.compile:
        raise KeepKVError(f"compile={compile_} differs from the loaded model's compile={base.engine.compile}: "
                          "load the model with the setting wanted")
    kv_budget = cache_args.get("kv_budget")
    method, method_object = resolve_method(cache_args.get("method"), kv_budget, dict(method_options))
    chunk = cache_args.get("prefill_chunk_size") or base.engine.prefill_chunk_setting
    slack = check_load_arguments(base.name, kv_budget, compile=base.engine.compile, prefill_chunk_size=chunk,
                                 decode_slack=cache_args.get("decode_slack"), revision=None, local_files_only=None,
                                 prefill_compression=cache_args.get("prefill_compression"))
    return LanguageModel(base.network, base.tokenizer, name=base.name, source=base.source, method=method,
                         kv_budget=kv_budget, compile=base.engine.compile, prefill_chunk_size=chunk,
                         method_object=method_object, decode_slack=slack,
                         prefill_compression=cache_args.get("prefill_compression") or "chunked",
                         runtime=base.runtime)


def build_model(pretrained: Any, cache_args: dict[str, Any], method_options: dict[str, Any]) -> LanguageModel:
    """``pretrained`` (name, folder, GGUF path or a loaded :class:`LanguageModel`) with the cache settings.

    A model_arg that is neither one of :data:`OWN_ARGS` / :data:`LOAD_ARGS` nor an option of the method is a
    :class:`KeepKVError` naming both lists (checked before anything is loaded)."""
    from keepkv.models.loading import resolve_method

    given = {key: value for key, value in cache_args.items() if value is not None}
    if method_options:
        try:
            resolve_method(given.get("method"), given.get("kv_budget"), dict(method_options))
        except KeepKVError as err:
            raise KeepKVError(f"unknown model_args {', '.join(sorted(method_options))} ({err}); the keepkv "
                              f"lm-eval model takes {allowed_model_args()}") from None
    if isinstance(pretrained, LanguageModel):
        if not given and not method_options:
            return pretrained
        return _sibling(pretrained, given, method_options)
    if not isinstance(pretrained, (str, Path)):
        raise KeepKVError(f"model_args pretrained must be a model name, a folder, a .gguf file or a loaded "
                          f"keepkv LanguageModel, got {shown(pretrained)}")
    from keepkv.models import load

    return load(pretrained, **given, **method_options)


def batches(order: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), size):
        yield order[start:start + size]


class KeepKVLM(LM):
    """An lm-eval ``LM`` over a keepkv :class:`LanguageModel` (see the module docstring for the semantics).

    Attributes: ``model`` (the :class:`LanguageModel`), ``batch_size``, ``max_length``, ``max_gen_toks``.
    """

    def __init__(self, pretrained: Any = None, kv_budget: float | int | None = None, method: str | None = None, *,
                 dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
                 compile: bool | None = None, prefill_chunk_size: int | None = None, decode_slack: int | None = None,
                 prefill_compression: str | None = None, revision: str | None = None,
                 local_files_only: bool | None = None, batch_size: int | str = 1, max_batch_size: int | None = None,
                 max_length: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, seed: int | None = None,
                 **method_options: Any) -> None:
        super().__init__()
        if pretrained is None:
            raise KeepKVError(f"model_args needs pretrained=<model name | folder | .gguf file>; allowed model_args: "
                              f"{allowed_model_args()}")
        self._batch_size = parse_batch_size(batch_size, max_batch_size)
        if isinstance(device, str) and device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's --device defaults to cuda:0; like its own hf model, fall back to the default device
            logger.warning("device %r is not available here; using keepkv's default device (cpu)", device)
            device = None
        require_int(max_length, "max_length", 2, allow_none=True)
        require_int(max_gen_toks, "max_gen_toks", 1)
        require_int(seed, "seed", 0, allow_none=True)
        cache_args = dict(kv_budget=kv_budget, method=method, dtype=dtype, device=device, compile=compile,
                          prefill_chunk_size=prefill_chunk_size, decode_slack=decode_slack,
                          prefill_compression=prefill_compression, revision=revision,
                          local_files_only=local_files_only)
        self.model = build_model(pretrained, cache_args, method_options)
        context = self.model.config.max_position_embeddings
        if max_length is not None and max_length > context:
            raise KeepKVError(f"max_length={max_length} is more than the model's context of {context} tokens")
        self._max_length = max_length or context
        self._max_gen_toks = max_gen_toks
        self.seed = seed
        self._device = self.model.device

    # ---- what lm-eval reads -----------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.model.name

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.model.tokenizer.chat_template if chat_template else ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The checkpoint's chat template over lm-eval's few-shot messages (``--apply_chat_template``)."""
        return self.model.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    # ---- tokens -------------------------------------------------------------------------------------------------
    @property
    def prefix_token_id(self) -> int:
        """What an empty context is: BOS, else the first EOS (lm-eval's convention)."""
        tokenizer = self.model.tokenizer
        return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_ids[0]

    @property
    def pad_token_id(self) -> int:
        pad = self.model.tokenizer.pad_token_id
        return pad if pad is not None else 0

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """``(context ids, continuation ids)`` split as lm-eval's models split them (module docstring)."""
        encode = self.model.tokenizer.encode
        if not context:
            return [self.prefix_token_id], encode(continuation, add_bos=False)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, context_ids = encode(context + continuation), encode(context)
        return context_ids, whole[len(context_ids):]

    # ---- loglikelihood ------------------------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for request in requests:
            context, continuation = request.args
            context_ids, continuation_ids = self.encode_pair(context, continuation)
            if not continuation_ids:
                raise KeepKVError(f"the continuation {continuation!r} is empty after tokenisation: nothing to score")
            if len(continuation_ids) >= self.max_length:
                raise KeepKVError(f"a continuation of {len(continuation_ids)} tokens does not fit max_length="
                                  f"{self.max_length} with any context")
            pairs.append((context_ids[-(self.max_length - len(continuation_ids)):], continuation_ids))
        results = self.score_continuations(pairs, disable_tqdm=disable_tqdm)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def score_continuations(self, pairs: Sequence[tuple[list[int], list[int]]],
                            disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """``(sum of ln p, is greedy)`` of each continuation after its context (token ids), in batches of
        ``batch_size``, longest first."""
        from tqdm import tqdm

        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        with tqdm(total=len(pairs), desc="keepkv loglikelihood", disable=disable_tqdm) as bar:
            for batch in batches(order, self.batch_size):
                scored = self._score_batch([pairs[i][0] for i in batch], [pairs[i][1] for i in batch])
                for index, result in zip(batch, scored):
                    results[index] = result
                bar.update(len(batch))
        return results

    def _score_batch(self, contexts: list[list[int]], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        """Prefill the contexts (compressed as ``generate`` would), then teacher-force the continuations through
        decode steps; one host read at the end."""
        engine, device = self.model.engine, self.model.device
        input_ids, valid = left_pad(contexts, self.pad_token_id, device)
        steps = max(len(ids) for ids in continuations)
        targets = torch.full((len(contexts), steps), self.pad_token_id, dtype=torch.long)
        for row, ids in enumerate(continuations):
            targets[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        targets = targets.to(device)
        rows = [len(ids) for ids in contexts] if len(contexts) > 1 else None  # as generate_tokens
        if engine.compile:
            hide_torch_compiler_deprecations()
        engine.prepare_caches(len(contexts), input_ids.shape[1], steps, rows)
        token_logprobs, greedy = [], []
        with torch.inference_mode():
            logits, positions = engine.prefill(input_ids, valid)
            engine.end_prefill()
            for step in range(steps):
                if step:
                    logits = engine.decode_step(targets[:, step - 1].contiguous(), positions)
                    positions = positions + 1
                logprobs = torch.log_softmax(logits.float(), dim=-1)
                token_logprobs.append(logprobs.gather(1, targets[:, step:step + 1])[:, 0])
                greedy.append(logprobs.argmax(dim=-1) == targets[:, step])
            live = torch.arange(steps, device=device)[None] < torch.tensor(
                [len(ids) for ids in continuations], device=device)[:, None]
            total = (torch.stack(token_logprobs, 1) * live).sum(1)
            all_greedy = (torch.stack(greedy, 1) | ~live).all(1)
        return [(float(value), bool(flag)) for value, flag in zip(total.tolist(), all_greedy.tolist())]

    # ---- loglikelihood_rolling ----------------------------------------------------------------------------------
    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows: list[tuple[int, list[int], list[int]]] = []  # (request, input ids, scored ids)
        for index, request in enumerate(requests):
            (text,) = request.args
            ids = self.model.tokenizer.encode(text, add_bos=False)
            for pair in get_rolling_token_windows(ids, self.prefix_token_id, self.max_length, 1):
                context, scored = make_disjoint_window(pair)
                windows.append((index, (context + scored)[:-1], scored))
        totals = [0.0] * len(requests)
        for index, value in zip((w[0] for w in windows),
                                self.score_windows([(w[1], w[2]) for w in windows], disable_tqdm)):
            totals[index] += value
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def score_windows(self, windows: Sequence[tuple[list[int], list[int]]], disable_tqdm: bool = True) -> list[float]:
        """Sum of ``ln p`` of each window's scored tokens (its last ones) with the window as a prompt through the
        engine's chunked prefill; batches of ``batch_size``, longest first."""
        from tqdm import tqdm

        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
        results = [0.0] * len(windows)
        with tqdm(total=len(windows), desc="keepkv loglikelihood_rolling", disable=disable_tqdm) as bar:
            for batch in batches(order, self.batch_size):
                for index, value in zip(batch, self._score_window_batch([windows[i] for i in batch])):
                    results[index] = value
                bar.update(len(batch))
        return results

    def _score_window_batch(self, windows: list[tuple[list[int], list[int]]]) -> list[float]:
        engine, device = self.model.engine, self.model.device
        input_ids, valid = left_pad([ids for ids, _ in windows], self.pad_token_id, device)
        width = input_ids.shape[1]
        # target of position t is the token at t + 1; the scored tokens are the last len(scored) targets of a row
        targets = torch.full_like(input_ids, self.pad_token_id)
        scored_mask = torch.zeros_like(valid)
        for row, (_, scored) in enumerate(windows):
            targets[row, width - len(scored):] = torch.tensor(scored, dtype=torch.long, device=device)
            scored_mask[row, width - len(scored):] = True
        positions = positions_from_valid(valid)
        if engine.compile:
            hide_torch_compiler_deprecations()
        engine.prepare_caches(len(windows), width, 0, [len(ids) for ids, _ in windows] if len(windows) > 1 else None)
        chunk = engine.prefill_chunk_size
        total = torch.zeros(len(windows), dtype=torch.float32, device=device)
        with torch.inference_mode():
            for start in range(0, width, chunk):
                piece = slice(start, start + chunk)
                logprobs = torch.log_softmax(engine.extend(input_ids[:, piece], positions[:, piece],
                                                           valid[:, piece]).float(), dim=-1)
                picked = logprobs.gather(2, targets[:, piece, None])[..., 0]
                total += (picked * scored_mask[:, piece]).sum(1)
        return total.tolist()

    # ---- generate_until -----------------------------------------------------------------------------------------
    def generation_settings(self, gen_kwargs: Any) -> tuple[tuple[str, ...], int, SamplingConfig]:
        """``(stop strings, max new tokens, sampling)`` from a task's ``gen_kwargs``."""
        if not isinstance(gen_kwargs, dict):
            raise KeepKVError(f"gen_kwargs must be a dict, got {shown(gen_kwargs)}")
        unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
        if unknown:
            raise KeepKVError(f"gen_kwargs {', '.join(unknown)} not supported by the keepkv lm-eval model; "
                              f"allowed: {', '.join(GEN_KWARGS)}")
        until = gen_kwargs.get("until")
        stop = stop_sequences([until] if isinstance(until, str) else list(until or ()))
        max_new = gen_kwargs.get("max_gen_toks", self.max_gen_toks)
        require_int(max_new, "max_gen_toks", 1)
        temperature = gen_kwargs.get("temperature")
        sampled = bool(gen_kwargs.get("do_sample", False)) and temperature != 0.0
        sampling = SamplingConfig(float(1.0 if temperature is None else temperature), gen_kwargs.get("top_k"),
                                  gen_kwargs.get("top_p"), self.seed) if sampled else SamplingConfig(0.0)
        return stop, max_new, sampling

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from tqdm import tqdm

        jobs = []
        for request in requests:
            context, gen_kwargs = request.args
            stop, max_new, sampling = self.generation_settings(gen_kwargs)
            ids = self.model.tokenizer.encode(context) if context else [self.prefix_token_id]
            keep = self.max_length - max_new
            if keep < 1:
                raise KeepKVError(f"max_gen_toks={max_new} leaves no room for a context in max_length="
                                  f"{self.max_length}")
            jobs.append((ids[-keep:], (stop, max_new, sampling)))
        groups: dict[str, list[int]] = {}
        for index, (_, settings) in enumerate(jobs):
            groups.setdefault(json.dumps([settings[0], settings[1], repr(settings[2])]), []).append(index)
        outputs = [""] * len(requests)
        with tqdm(total=len(requests), desc="keepkv generate_until", disable=disable_tqdm) as bar:
            for members in groups.values():
                members.sort(key=lambda i: -len(jobs[i][0]))
                for batch in batches(members, self.batch_size):
                    stop, max_new, sampling = jobs[batch[0]][1]
                    texts = self.generate_ids([jobs[i][0] for i in batch], max_new, stop, sampling)
                    for index, text in zip(batch, texts):
                        outputs[index] = text
                        self.cache_hook.add_partial("generate_until", requests[index].args, text)
                    bar.update(len(batch))
        return outputs

    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int, stop: Iterable[str],
                     sampling: SamplingConfig) -> list[str]:
        """The continuations of prompt token ids: :meth:`LanguageModel.generate`'s loop over
        :meth:`GenerationEngine.generate_tokens` (same stop rules, same text)."""
        model, stop = self.model, tuple(stop)
        if model.engine.compile:
            hide_torch_compiler_deprecations()
        input_ids, valid = left_pad(prompts, self.pad_token_id, model.device)
        model.last_stats = GenerationStats()
        tokens = model.engine.generate_tokens(input_ids, valid, max_new_tokens, sampling,
                                              tuple(model.tokenizer.eos_token_ids), model.last_stats)
        return collect_texts(tokens, len(prompts), model.tokenizer, stop)


def register() -> None:
    """Make ``--model keepkv`` known to lm-eval (idempotent). lm-eval's built-in names are registered first: its
    ``get_model`` only loads them into an empty registry."""
    import lm_eval.models  # noqa: F401
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME)(KeepKVLM)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m keepkv.integrations.lm_eval ARGS``: lm-eval's command line (``ARGS`` as for ``lm_eval``) with
    ``--model keepkv`` registered."""
    from lm_eval.__main__ import cli_evaluate

    register()
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    from keepkv.integrations.lm_eval import main as _main  # the importable module's class, registered on import

    _main()
else:
    register()
