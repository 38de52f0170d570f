"""What ``keepkv.models.load`` returns: network + tokenizer + generation engine behind a small text API."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from keepkv.cache.manager import CacheManager
from keepkv.cache.policy import CompressionMethod
from keepkv.checks import require_bool, require_int, require_text, shown
from keepkv.errors import KeepKVError
from keepkv.generate import GenerationEngine, GenerationStats
from keepkv.models.config import ModelConfig
from keepkv.models.tokenizer import Tokenizer
from keepkv.models.transformer import Transformer
from keepkv.runtime import DEFAULT_RUNTIME, RuntimeOptions
from keepkv.sampling import SamplingConfig

if TYPE_CHECKING:
    from keepkv.context import CompressedContext

PADDING_SIDES = ("left", "right")
TORCH_COMPILER_MODULES = r"torch\._(dynamo|inductor)(\.|$)"


def hide_torch_compiler_deprecations() -> None:
    """Hide the ``FutureWarning``s torch's compiler raises from its own internals while it compiles keepkv's
    kernels (inductor's "``torch._prims_common.check`` is deprecated"): deprecations inside torch that a keepkv
    user cannot act on. Narrow: only ``FutureWarning``, only those attributed to ``torch._dynamo`` /
    ``torch._inductor`` modules; called when a compiling model starts a generation, never at import. Idempotent
    (``warnings.filterwarnings`` replaces an identical filter)."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=TORCH_COMPILER_MODULES)


class LanguageModel:
    """A loaded model. Generate text with :meth:`generate` / :meth:`stream`, score tokens with :meth:`logits`.

    Attributes:
        config: the :class:`ModelConfig`.
        tokenizer: ``encode(str) -> list[int]``, ``decode(list[int]) -> str``.
        network: the :class:`Transformer` (weights).
        engine: the :class:`GenerationEngine` (caches, compiled decode step).
        last_stats: :class:`GenerationStats` of the most recent generation.
    """

    def __init__(
        self, network: Transformer, tokenizer: Tokenizer, *, name: str, source: str, method: str,
        kv_budget: float | int | None, compile: bool, prefill_chunk_size: int | None,
        method_object: CompressionMethod | None = None, decode_slack: int = 64, prefill_compression: str = "chunked",
        runtime: RuntimeOptions = DEFAULT_RUNTIME,
    ) -> None:
        self.network = network
        self.tokenizer = tokenizer
        self.config: ModelConfig = network.config
        self.name, self.source = name, source
        self.method, self.kv_budget = method, kv_budget
        self.runtime = runtime
        cache_manager = CacheManager(
            self.config, network.model.embed_tokens.weight.dtype, network.inv_freq.device, method_object,
            kv_budget, decode_slack, prefill_compression, compiled_ops=compile, runtime=runtime,
        )
        self.method_object: CompressionMethod = cache_manager.method  # FullCache for the full cache
        self.engine = GenerationEngine(
            network, compile=compile, prefill_chunk_size=prefill_chunk_size, cache_manager=cache_manager,
            runtime=runtime,
        )
        self.last_stats = GenerationStats()

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def dtype(self) -> torch.dtype:
        return self.engine.dtype

    def __repr__(self) -> str:
        c = self.config
        return (
            f"LanguageModel({self.name!r}, arch={c.arch}, layers={c.num_layers}, heads={c.num_heads}/"
            f"{c.num_kv_heads}, dtype={self.dtype}, device={self.device}, method={self.method!r}, "
            f"kv_budget={self.kv_budget})"
        )

    # ---- input ----------------------------------------------------------------------------------------------
    def encode_prompts(
        self, prompts: Sequence[str], *, chat: bool = False, padding_side: str = "left", max_new_tokens: int = 0
    ) -> tuple[Tensor, Tensor]:
        """Token ids ``[B, T]`` and validity mask ``[B, T]`` for a batch of prompts, padded on one side."""
        if padding_side not in PADDING_SIDES:
            raise KeepKVError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
        encoded = []
        for row, prompt in enumerate(prompts):
            require_text(prompt, "prompt" if len(prompts) == 1 else f"prompt[{row}]")
            if not prompt.strip():
                raise KeepKVError("the prompt is empty: give at least one non-blank character")
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
            ids = self.tokenizer.encode(text)
            limit = self.config.max_position_embeddings
            if len(ids) + max_new_tokens > limit:
                raise KeepKVError(
                    f"the prompt has {len(ids)} tokens and {max_new_tokens} new tokens were asked for, "
                    f"more than the model's context of {limit} tokens"
                )
            encoded.append(ids)
        width = max(len(ids) for ids in encoded)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        valid = torch.zeros((len(encoded), width), dtype=torch.bool)
        for row, ids in enumerate(encoded):
            span = slice(width - len(ids), width) if padding_side == "left" else slice(0, len(ids))
            input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
            valid[row, span] = True
        return input_ids.to(self.device), valid.to(self.device)

    # ---- generation -----------------------------------------------------------------------------------------
    def _token_stream(
        self, prompts: Sequence[str], max_new_tokens: int, sampling: SamplingConfig, chat: bool, padding_side: str
    ) -> Iterator[Tensor]:
        """Check the arguments, encode the prompts, then start the engine (nothing heavy before the checks)."""
        require_int(max_new_tokens, "max_new_tokens", 1)
        require_bool(chat, "chat")
        if self.engine.compile:
            hide_torch_compiler_deprecations()
        input_ids, valid = self.encode_prompts(
            prompts, chat=chat, padding_side=padding_side, max_new_tokens=max_new_tokens
        )
        self.last_stats = GenerationStats()
        return self.engine.generate_tokens(
            input_ids, valid, max_new_tokens, sampling, tuple(self.tokenizer.eos_token_ids), self.last_stats
        )

    def generate(
        self, prompt: str | Sequence[str] | None = None, max_new_tokens: int = 128, *, temperature: float = 0.0,
        top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
        stop: str | Sequence[str] | None = (), chat: bool = False, padding_side: str = "left",
        messages: Sequence[dict] | Sequence[Sequence[dict]] | None = None,
    ) -> str | list[str]:
        """The continuation of ``prompt`` (text only, prompt excluded); a list of prompts gives a list.

        ``temperature=0`` is greedy. Generation ends at an end-of-sequence token, at the first of the ``stop``
        strings (cut from the output), or after ``max_new_tokens``. ``stop`` is one string or a list of them, none
        empty. ``chat=True`` wraps the prompt as a user message with the checkpoint's chat template. Every argument
        is checked before the prompt is encoded; a bad one is a :class:`KeepKVError` naming it.
        ``messages`` instead of ``prompt``: a chat (``[{"role": "system" | "user" | "assistant", "content": str},
        ...]``, rendered with the chat template, :mod:`keepkv.chat`) gives a str, a list of chats a list.
        """
        if messages is not None:  # chat message lists (keepkv.chat)
            from keepkv.chat import prompts_from_messages

            prompts, single = prompts_from_messages(self.tokenizer, messages, prompt)
            chat = False
        else:
            prompts, single = prompt_list(prompt), isinstance(prompt, str)
        stop = stop_sequences(stop)
        sampling = SamplingConfig(temperature, top_k, top_p, seed)
        tokens = self._token_stream(prompts, max_new_tokens, sampling, chat, padding_side)
        texts = collect_texts(tokens, len(prompts), self.tokenizer, stop)
        return texts[0] if single else texts

    def stream(
        self, prompt: str | None = None, max_new_tokens: int = 128, *, temperature: float = 0.0,
        top_k: int | None = None, top_p: float | None = None, seed: int | None = None, chat: bool = False,
        messages: Sequence[dict] | None = None,
    ) -> Iterator[str]:
        """Yield the continuation of one prompt piece by piece as tokens arrive (a piece may span tokens when a
        character needs several byte-level tokens). Arguments as for :meth:`generate` (``messages``: one chat),
        checked when ``stream`` is called (before the first ``next()``); the engine starts at the first ``next()``."""
        if messages is not None:  # chat message lists (keepkv.chat)
            from keepkv.chat import render_messages

            if prompt is not None:
                raise KeepKVError("give either a prompt or messages, not both")
            prompt, chat = render_messages(self.tokenizer, messages), False
        require_text(prompt, "prompt")
        sampling = SamplingConfig(temperature, top_k, top_p, seed)
        tokens = self._token_stream([prompt], max_new_tokens, sampling, chat, "left")
        return self._text_pieces(tokens)

    def _text_pieces(self, tokens: Iterator[Tensor]) -> Iterator[str]:
        """Decode a one-row token stream into the text each token adds, holding back incomplete UTF-8."""
        eos = set(self.tokenizer.eos_token_ids)
        generated: list[int] = []
        emitted = ""
        for token in tokens:
            token_id = int(token[0])
            if token_id in eos:
                break
            generated.append(token_id)
            text = self.tokenizer.decode(generated)
            if text.endswith("\ufffd"):
                continue  # an incomplete UTF-8 sequence: wait for its next byte
            if len(text) > len(emitted):
                yield text[len(emitted):]
                emitted = text

    # ---- scoring --------------------------------------------------------------------------------------------
    def logits(self, token_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Teacher-forced logits ``[batch, seq, vocab]`` (float32) for ``token_ids [batch, seq]``.

        ``attention_mask`` (1 = real token, 0 = padding) defaults to all ones.
        """
        if not isinstance(token_ids, Tensor):
            raise KeepKVError(f"token_ids must be an integer tensor [batch, seq], got {shown(token_ids)}")
        if token_ids.dim() != 2 or token_ids.dtype not in (torch.int32, torch.int64):
            raise KeepKVError(f"token_ids must be an integer tensor [batch, seq], got {tuple(token_ids.shape)} "
                              f"{token_ids.dtype}")
        if token_ids.numel() == 0:
            raise KeepKVError("token_ids is empty")
        if int(token_ids.max()) >= self.config.vocab_size or int(token_ids.min()) < 0:
            raise KeepKVError(f"token ids must lie in [0, {self.config.vocab_size})")
        if token_ids.shape[1] > self.config.max_position_embeddings:
            raise KeepKVError(
                f"{token_ids.shape[1]} tokens exceed the model's context of {self.config.max_position_embeddings}"
            )
        valid = torch.ones_like(token_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        return self.engine.teacher_forced_logits(token_ids.long().to(self.device), valid.to(self.device))

    def cache_report(self) -> dict[str, Any]:
        """What the cache actually holds after the last generation: entries per layer and KV head (real counts,
        not the asked budget), resident bytes, compressions, the merge counters of merging methods, and
        ``row_budgets``: the budget each batch row would have had alone (a batch shares its longest row's budget,
        see :mod:`keepkv.cache.budgets`)."""
        manager = self.engine.cache_manager
        report: dict[str, Any] = {"method": self.method, "kv_budget": self.kv_budget}
        if not manager.caches:
            return report
        entries = manager.entries_per_head()  # [layers, batch, kv_heads]
        report.update(
            entries_per_layer_and_head=entries.tolist(), entries_per_head_mean=float(entries.float().mean()),
            entries_per_head_max=int(entries.max()), resident_bytes=manager.resident_bytes(),
            capacity_per_layer=[cache.capacity for cache in manager.caches], budget=manager.budget,
            compressions=manager.compressions, row_budgets=manager.row_budgets,
        )
        stats = getattr(self.method_object, "stats", None)
        if stats is not None:
            report["merge_stats"] = stats.as_dict()
        return report

    # ---- prefill once, ask many (keepkv.context; issue 17 item 4) ------------------------------------------
    def prefill(self, context: str, kv_budget: float | int | None = None, method: str | None = None,
                question: str | None = None, **method_options: Any) -> "CompressedContext":
        """Compress ``context`` once and answer several questions from copies of it
        (:class:`keepkv.context.CompressedContext`: ``.generate(question, max_new_tokens=...) -> str``,
        ``.save(path)``; :func:`keepkv.context.load_context`). ``kv_budget`` / ``method`` / ``method_options`` as
        for :func:`keepkv.models.load` (both omitted: this model's own); a ``question`` here ends the prompt, so the
        compression sees it (query-aware), else it is query-agnostic."""
        from keepkv.context import prefill_context

        if kv_budget is None and method is None:
            kv_budget, method = self.kv_budget, self.method
        return prefill_context(self, context, kv_budget=kv_budget, method=method, question=question,
                               **method_options)
    # ---- end of prefill once, ask many ----------------------------------------------------------------------

    # ---- facts ----------------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Model shape, parameter count and cache bytes per token (what ``keepkv info`` prints)."""
        c = self.config
        dtype_bytes = torch.empty((), dtype=self.dtype).element_size()
        parameters = sum(p.numel() for p in self.network.parameters())
        return {
            "name": self.name, "source": self.source, "arch": c.arch, "layers": c.num_layers,
            "hidden_size": c.hidden_size, "heads": c.num_heads, "kv_heads": c.num_kv_heads,
            "head_dim": c.head_dim, "vocab_size": c.vocab_size, "context": c.max_position_embeddings,
            "sliding_window": c.sliding_window, "parameters": parameters, "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device), "weight_bytes": parameters * dtype_bytes,
            "kv_cache_bytes_per_token": c.kv_bytes_per_token(dtype_bytes),
            "cache_overhead_bytes_per_token": 2 * c.num_layers * c.num_kv_heads * 4,  # log_votes f32 + positions i32
            "method": self.method, "kv_budget": self.kv_budget,
        }


def prompt_list(prompt: Any) -> list[str]:
    """``prompt`` as a batch: a str is one prompt, a non-empty list or tuple a batch (each prompt is checked when
    encoded); anything else (``None``, a dict, bytes ...) is a :class:`KeepKVError`."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, bytes):
        require_text(prompt, "prompt")
    if not isinstance(prompt, (list, tuple)):
        raise KeepKVError(f"prompt must be a str or a list of str, got {shown(prompt)}")
    if not prompt:
        raise KeepKVError("no prompt given: pass a string or a non-empty list of strings")
    return list(prompt)


def stop_sequences(stop: Any) -> tuple[str, ...]:
    """``stop`` as a tuple of stop strings: ``None`` or ``()`` is none, a str is one stop sequence (not a set of
    characters), a list or tuple of str several. An empty stop string is refused: it would end generation at
    once."""
    if stop is None:
        return ()
    sequences = (stop,) if isinstance(stop, str) else stop
    if not isinstance(sequences, (list, tuple)) or not all(isinstance(text, str) for text in sequences):
        raise KeepKVError(f"stop must be a str or a list of str, got {shown(stop)}")
    if not all(sequences):
        raise KeepKVError(f"stop holds an empty string, which would end generation at once; got {stop!r}: "
                          "give non-empty stop strings")
    return tuple(sequences)


STOP_LOOKBACK = 32  # newest tokens decoded when looking for a stop string


def collect_texts(tokens: Iterable[Tensor], rows: int, tokenizer, stop: Sequence[str]) -> list[str]:
    """The text of each row from a stream of ``[rows]`` token tensors: a row ends at an end-of-sequence token
    (not included) or once one of ``stop`` appears in its newest :data:`STOP_LOOKBACK` tokens (the text is cut
    before it); the stream is left as soon as every row has ended."""
    eos = set(tokenizer.eos_token_ids)
    generated: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    for token in tokens:
        for row, token_id in enumerate(token.tolist()):
            if done[row]:
                continue
            if token_id in eos:
                done[row] = True
                continue
            generated[row].append(token_id)
            if stop and any(s in tokenizer.decode(generated[row][-STOP_LOOKBACK:]) for s in stop):
                done[row] = True
        if all(done):
            break
    return [_cut_at_stop(tokenizer.decode(ids), stop) for ids in generated]


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[: min(cuts)] if cuts else text
