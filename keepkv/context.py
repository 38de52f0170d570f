"""Prefill once, ask many: a compressed context that answers several questions from copies of its cache.

```python
ctx = model.prefill(document, kv_budget=0.2, method="keepkv")            # query-agnostic
ctx.generate("Question: who wrote it?\\nAnswer:", max_new_tokens=32)     # -> str; repeatable
ctx.save("doc.safetensors"); ctx = load_context("doc.safetensors", model)
aware = model.prefill(document, kv_budget=0.2, question="Who wrote it?")  # query-aware
aware.generate(max_new_tokens=32)                                         # answers the prefilled question
```

**What is compressed.** :func:`prefill_context` runs ``context`` (followed by ``question`` when one is given) through
the native engine with its own cache manager for ``method`` / ``kv_budget``: chunked prefill, compressed whenever
``budget + chunk`` fills and once more at its end, exactly as :meth:`LanguageModel.generate` would for that prompt
(:mod:`keepkv.cache.manager`). With a question the question's tokens are the last of the prompt, so its queries
form the observation window the method scores with (SnapKV's, KeepKV's merge reference): the compression is
*query-aware*; without one it is *query-agnostic* (the window is the context's own last tokens) and the method
compresses as its ``for_query_agnostic()`` copy (KeepKV then ranks by the newest query: its
``agnostic_last_query_weight``). The compressed per-layer caches are kept and never modified.

**Answering.** :meth:`CompressedContext.generate` copies the caches (entries, votes, positions and the method's
score state) into buffers with room for the question and the answer, feeds the question's tokens (positions
continue after the context), then decodes; nothing is compressed while answering (the copy holds the budget plus
the question and the answer), so every question sees the same compressed context and calls are independent.

**Files.** :meth:`CompressedContext.save` writes one safetensors file: per layer the keys, values, ``log_votes``,
positions, cursor, observation window and accumulated-attention state; the last prompt token's logits; and JSON
metadata (format version, method, options, budget, token counts, question, and the model's identity: name,
shapes, dtype and a fingerprint of its weights). :func:`load_context` checks the identity against the model it is
given and raises :class:`~keepkv.errors.KeepKVError` naming the first difference. Writes go to a temporary file
renamed into place: nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from keepkv.cache.kv_cache import LayerKVCache
from keepkv.cache.manager import CacheManager, round_up
from keepkv.checks import require_int, require_text
from keepkv.errors import KeepKVError
from keepkv.generate import GenerationEngine
from keepkv.sampling import SamplingConfig, sample_next_token

if TYPE_CHECKING:
    from keepkv.models.language_model import LanguageModel

FORMAT = "keepkv-context/1"
METADATA_KEY = "keepkv"
ROOM_QUANTUM = 64  # answer buffers are rounded up to this many slots, so similar questions share a compiled graph
CACHE_BUFFERS = ("keys", "values", "log_votes", "positions", "cursor", "window_queries", "window_positions",
                 "accumulated_attention", "attention_queries")


def model_identity(model: LanguageModel) -> dict[str, Any]:
    """What a saved context must match: name, shapes, dtype and ``fingerprint``, a sha256 over the first rows of
    the embedding and of every layer's query and output projections (as float32 bytes)."""
    c = model.config
    digest = hashlib.sha256()
    pieces = [model.network.model.embed_tokens.weight[:4]]
    for attention in model.network.attention_layers:
        pieces += [attention.q_proj.weight[:2], attention.o_proj.weight[:2]]
    for piece in pieces:
        digest.update(piece.detach().float().cpu().contiguous().numpy().tobytes())
    return {
        "name": model.name, "arch": c.arch, "layers": c.num_layers, "heads": c.num_heads, "kv_heads": c.num_kv_heads,
        "head_dim": c.head_dim, "vocab_size": c.vocab_size, "dtype": str(model.dtype).removeprefix("torch."),
        "fingerprint": digest.hexdigest(),
    }


def _make_engine(model: LanguageModel, method: str, kv_budget: float | int | None,
                 options: dict[str, Any], *, query_agnostic: bool = False) -> tuple[GenerationEngine, str]:
    """A generation engine over ``model``'s network with its own cache manager for ``method`` / ``kv_budget``;
    ``query_agnostic``: the question comes after the compression (the method's ``for_query_agnostic()``)."""
    from keepkv.models.loading import resolve_method

    name, method_object = resolve_method(method, kv_budget, dict(options))
    manager = CacheManager(model.config, model.dtype, model.device, method_object, kv_budget,
                           model.engine.cache_manager.decode_slack, compiled_ops=model.engine.compile,
                           query_agnostic=query_agnostic)
    engine = GenerationEngine(model.network, compile=model.engine.compile,
                              prefill_chunk_size=model.engine.prefill_chunk_setting, cache_manager=manager)
    return engine, name


def decode_tokens(engine: GenerationEngine, logits: Tensor, position: int, max_new_tokens: int,
                  sampling: SamplingConfig, generator: torch.Generator | None, eos: set[int], *,
                  feed_last: bool = True) -> Iterator[int]:
    """One row's continuation (also :class:`keepkv.chat.ChatSession`'s replies): up to ``max_new_tokens`` ids, the
    first sampled from ``logits`` (``[1, vocab]``), each next one from the logits of feeding the previous one through
    ``engine.decode_step`` at ``position``, ``position + 1``, ...; it ends before an end-of-sequence id (neither
    yielded nor fed). A token is fed before it is yielded, so the cache holds every yielded token, except the last
    of ``max_new_tokens`` when ``feed_last`` is false (nothing would read its logits)."""
    positions = torch.tensor([position], dtype=torch.long, device=logits.device)
    for step in range(max_new_tokens):
        token = sample_next_token(logits, sampling, generator)
        token_id = int(token[0])
        if token_id in eos:
            return
        if feed_last or step + 1 < max_new_tokens:
            logits = engine.decode_step(token, positions)
            positions = positions + 1
        yield token_id


class CompressedContext:
    """A compressed prompt and what is needed to answer from it (see the module docstring).

    Attributes: ``method``, ``kv_budget``, ``options``; ``prompt_tokens`` (context + prefilled question);
    ``question`` (the prefilled question or ``None``); ``caches`` (per layer, never modified); ``last_logits``
    (``[1, vocab]`` of the last prompt token); ``budget`` (entries per KV head, ``None`` for the full cache).
    """

    def __init__(self, model: LanguageModel, engine: GenerationEngine, *, method: str, kv_budget: float | int | None,
                 options: dict[str, Any], caches: list[LayerKVCache], prompt_tokens: int, question: str | None,
                 last_logits: Tensor) -> None:
        self.model, self.engine = model, engine
        self.method, self.kv_budget, self.options = method, kv_budget, dict(options)
        self.caches, self.prompt_tokens, self.question = caches, prompt_tokens, question
        self.last_logits = last_logits
        self.budget: int | None = engine.cache_manager.budget

    def __repr__(self) -> str:
        return (f"CompressedContext(method={self.method!r}, kv_budget={self.kv_budget}, prompt_tokens="
                f"{self.prompt_tokens}, budget={self.budget}, query_aware={self.question is not None})")

    def entries_per_head(self) -> Tensor:
        """``[layers, 1, kv_heads]`` entries the compressed context holds."""
        return torch.stack([cache.live_entries() for cache in self.caches])

    def generate(self, question: str | None = None, max_new_tokens: int = 64, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None) -> str:
        """The answer (text, question excluded) to ``question`` appended to the compressed context; ``None``
        continues the prompt itself (the prefilled question when one was given). Repeatable: each call starts
        from a fresh copy of the compressed caches. Greedy by default; sampling arguments as for
        :meth:`LanguageModel.generate`."""
        require_int(max_new_tokens, "max_new_tokens", 1)
        sampling = SamplingConfig(temperature, top_k, top_p, seed)
        tokenizer = self.model.tokenizer
        question_ids: list[int] = []
        if question is not None:
            require_text(question, "question")
            question_ids = tokenizer.encode(question, add_bos=False)
        limit = self.model.config.max_position_embeddings
        if self.prompt_tokens + len(question_ids) + max_new_tokens > limit:
            raise KeepKVError(f"context ({self.prompt_tokens}) + question ({len(question_ids)}) + {max_new_tokens} "
                              f"new tokens exceed the model's context of {limit} tokens")
        engine, device = self.engine, self.model.device
        feed = round_up(len(question_ids), engine.prefill_chunk_size) if engine.compile else len(question_ids)
        room = round_up(feed + max_new_tokens, ROOM_QUANTUM)
        engine.start_from_prefill(self.caches, self.prompt_tokens, room, compress=False)
        generator = sampling.make_generator(device)
        eos = set(tokenizer.eos_token_ids)
        position = self.prompt_tokens
        with torch.inference_mode():
            if question_ids:
                ids = torch.tensor([question_ids], dtype=torch.long, device=device)
                positions = torch.arange(position, position + ids.shape[1], device=device)[None]
                logits = engine.extend(ids, positions, torch.ones_like(ids, dtype=torch.bool))[:, -1]
                position += ids.shape[1]
            else:
                logits = self.last_logits.to(device)
            generated = list(decode_tokens(engine, logits, position, max_new_tokens, sampling, generator, eos,
                                           feed_last=False))
        return tokenizer.decode(generated)

    # ---- files ----------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the context to one safetensors file (see the module docstring); returns its path."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors: dict[str, Tensor] = {"last_logits": self.last_logits.detach().float().cpu().contiguous()}
        for layer, cache in enumerate(self.caches):
            for name in CACHE_BUFFERS:
                buffer = getattr(cache, name, None)
                if buffer is not None:
                    tensors[f"layer{layer}.{name}"] = buffer.detach().cpu().contiguous()
        manager = self.engine.cache_manager
        metadata = {
            "format": FORMAT, "model": model_identity(self.model), "method": self.method,
            "kv_budget": self.kv_budget, "options": self.options, "prompt_tokens": self.prompt_tokens,
            "question": self.question, "budget": self.budget,
            "layer_budgets": list(manager.layer_budgets),
            "capacity": self.caches[0].capacity,
        }
        temporary = path.with_name(path.name + ".partial")
        try:
            save_file(tensors, str(temporary), metadata={METADATA_KEY: json.dumps(metadata)})
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        return path


def prefill_context(model: LanguageModel, context: str, *, kv_budget: float | int | None = None,
                    method: str | None = None, question: str | None = None,
                    **method_options: Any) -> CompressedContext:
    """Compress ``context`` (and ``question``, query-aware) once; see :meth:`LanguageModel.prefill`."""
    require_text(context, "context")
    if not context.strip():
        raise KeepKVError("the context is empty: give at least one non-blank character")
    if question is not None:
        require_text(question, "question")
    engine, name = _make_engine(model, method, kv_budget, method_options, query_agnostic=question is None)
    tokenizer = model.tokenizer
    ids = tokenizer.encode(context)
    if question is not None:
        ids = ids + tokenizer.encode(question, add_bos=False)
    if len(ids) >= model.config.max_position_embeddings:
        raise KeepKVError(f"the context has {len(ids)} tokens, the model's context is "
                          f"{model.config.max_position_embeddings}")
    input_ids = torch.tensor([ids], dtype=torch.long, device=model.device)
    valid = torch.ones_like(input_ids, dtype=torch.bool)
    engine.prepare_caches(1, len(ids), 0)
    with torch.inference_mode():
        last_logits, _ = engine.prefill(input_ids, valid)
        engine.end_prefill()
    return CompressedContext(model, engine, method=name, kv_budget=kv_budget, options=method_options,
                             caches=list(engine.caches), prompt_tokens=len(ids), question=question,
                             last_logits=last_logits)


def load_context(path: str | os.PathLike, model: LanguageModel) -> CompressedContext:
    """A context saved by :meth:`CompressedContext.save`, for ``model`` (which must be the model it was made with:
    same name, shapes, dtype and weights; else a :class:`KeepKVError` naming the difference)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise KeepKVError(f"no saved context at {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except SafetensorError as err:
        raise KeepKVError(f"{path} is not a safetensors file: {err}") from err
    if raw is None:
        raise KeepKVError(f"{path} is a safetensors file but not a keepkv context (no {METADATA_KEY!r} metadata)")
    metadata = json.loads(raw)
    if metadata.get("format") != FORMAT:
        raise KeepKVError(f"{path}: unknown context format {metadata.get('format')!r}; this keepkv reads {FORMAT}")
    expected, actual = metadata["model"], model_identity(model)
    for key, value in expected.items():
        if actual.get(key) != value:
            raise KeepKVError(f"{path} was saved from another model: its {key} is {value!r}, this model's is "
                              f"{actual.get(key)!r}; load it with the model it was made with")
    engine, name = _make_engine(model, metadata["method"], metadata["kv_budget"], metadata["options"])
    manager = engine.cache_manager
    capacity = int(metadata["capacity"])
    caches = manager.restore(capacity, metadata["budget"], metadata["layer_budgets"])
    for layer, cache in enumerate(caches):
        for buffer_name in CACHE_BUFFERS:
            target = getattr(cache, buffer_name, None)
            source = tensors.get(f"layer{layer}.{buffer_name}")
            if target is None and source is None:
                continue
            if target is None or source is None or source.shape != target.shape:
                raise KeepKVError(f"{path}: layer {layer} {buffer_name} does not fit this method's cache "
                                  f"({None if source is None else tuple(source.shape)} vs "
                                  f"{None if target is None else tuple(target.shape)})")
            target.copy_(source.to(target.device))
    return CompressedContext(model, engine, method=name, kv_budget=metadata["kv_budget"], options=metadata["options"],
                             caches=caches, prompt_tokens=int(metadata["prompt_tokens"]),
                             question=metadata["question"], last_logits=tensors["last_logits"])
