"""Chat: message lists rendered with the checkpoint's chat template, and multi-turn sessions over one KV cache.

```python
model.generate(messages=[{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Why is the sky blue?"}], max_new_tokens=64)
chat = ChatSession(model, kv_budget=0.1, system="Be brief.")
chat.send("Why is the sky blue?")                                 # -> str
chat.send("And at sunset?")                                       # continues the same (compressed) cache
```

A message is ``{"role": ROLE, "content": TEXT}`` with ``ROLE`` one of :data:`CHAT_ROLES`; a system message may
only come first and the last message must be the user's (the model answers as the assistant).
:func:`check_messages` refuses anything else with a :class:`~keepkv.errors.KeepKVError` naming the message.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from keepkv.cache.manager import CacheManager, round_up
from keepkv.checks import require_int, require_text, shown
from keepkv.context import decode_tokens
from keepkv.errors import KeepKVError
from keepkv.logs import get_logger
from keepkv.sampling import SamplingConfig

if TYPE_CHECKING:
    from keepkv.generate import GenerationEngine
    from keepkv.models.language_model import LanguageModel
    from keepkv.models.tokenizer import Tokenizer

CHAT_ROLES = ("system", "user", "assistant")
COMPILED_BUDGET_QUANTUM = 64  # a compiled session's fractional budget is rounded up to this many entries
MESSAGE_KEYS = ("role", "content")
EXAMPLE = '{"role": "user", "content": "..."}'

log = get_logger(__name__)


# ---- message lists ------------------------------------------------------------------------------------------
def check_messages(messages: Any, name: str = "messages") -> list[dict[str, str]]:
    """``messages`` as a list of plain ``{"role", "content"}`` dicts, after checking: a non-empty list (or tuple)
    of mappings with exactly the keys ``role`` and ``content``; ``role`` in :data:`CHAT_ROLES`, ``system`` only
    first; ``content`` a str (valid Unicode; non-blank for user messages); the last message the user's."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise KeepKVError(f"{name} must be a non-empty list of messages like {EXAMPLE}; got {shown(messages)}")
    checked = []
    for index, message in enumerate(messages):
        where = f"{name}[{index}]"
        if not isinstance(message, Mapping):
            raise KeepKVError(f"{where} must be a dict like {EXAMPLE}, got {shown(message)}")
        unknown = sorted(str(key) for key in message if key not in MESSAGE_KEYS)
        missing = [key for key in MESSAGE_KEYS if key not in message]
        if unknown or missing:
            problem = f"has unknown key(s) {unknown}" if unknown else f"lacks {missing}"
            raise KeepKVError(f"{where} {problem}; a message has exactly the keys 'role' and 'content', like {EXAMPLE}")
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES:
            raise KeepKVError(f"{where}['role'] is {shown(role)}; allowed roles: {', '.join(CHAT_ROLES)}")
        if role == "system" and index > 0:
            raise KeepKVError(f"{where} is a system message, but a system message may only come first")
        if not isinstance(content, str):
            raise KeepKVError(f"{where}['content'] must be a str (the message text), got {shown(content)}")
        require_text(content, f"{where}['content']")
        if role == "user" and not content.strip():
            raise KeepKVError(f"{where}['content'] is empty: a user message needs at least one non-blank character")
        checked.append({"role": role, "content": content})
    if checked[-1]["role"] != "user":
        raise KeepKVError(f"the last of {name} has role {checked[-1]['role']!r}; it must be the user's (the model "
                          "answers as the assistant)")
    return checked


def render_messages(tokenizer: Tokenizer, messages: Any, name: str = "messages") -> str:
    """The prompt text of a checked message list: the chat template with the assistant's turn opened."""
    return tokenizer.apply_chat_template(check_messages(messages, name), add_generation_prompt=True)


def prompts_from_messages(tokenizer: Tokenizer, messages: Any, prompt: Any = None) -> tuple[list[str], bool]:
    """``(prompt texts, single)`` for ``generate(messages=...)``: one conversation (a list of message dicts) gives
    one prompt (``single``), a list of conversations a batch. ``prompt`` must then be ``None``."""
    if prompt is not None:
        raise KeepKVError("give either a prompt or messages, not both")
    if isinstance(messages, (list, tuple)) and messages and all(isinstance(m, (list, tuple)) for m in messages):
        return [render_messages(tokenizer, m, f"messages[{i}]") for i, m in enumerate(messages)], False
    return [render_messages(tokenizer, messages)], True


# ---- multi-turn sessions ------------------------------------------------------------------------------------
@dataclass
class TurnStats:
    """What one :meth:`ChatSession.send` did.

    ``fed_tokens``: tokens run through the model before the reply (this turn's new template text only);
    ``start_position``: the position of the first of them (the conversation's length before the turn);
    ``token_prefix_reused``: the cache's tokens were a prefix of the whole transcript's tokenization (else the new
    text was found by text, see :class:`ChatSession`); ``total_tokens``: conversation tokens in the cache's
    positions after the reply; ``budget``: entries per KV head the cache is compressed to (``None``: full cache);
    ``entries_per_head_max``: the most entries any layer / head holds after the reply; ``compressions``: of the
    turn (prefill and decode).
    """

    turn: int = 0
    fed_tokens: int = 0
    start_position: int = 0
    token_prefix_reused: bool = True
    reply_tokens: int = 0
    total_tokens: int = 0
    budget: int | None = None
    entries_per_head_max: int = 0
    compressions: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


class ChatSession:
    """A multi-turn conversation whose KV cache is kept, and compressed, across turns (never re-prefilled).

    **What stays in the cache between turns.** Every token of the conversation passes through the model exactly
    once, at positions ``0, 1, ..., N-1``: the chat-template text of the messages (system prompt, each user turn
    and the template's role markers) and every reply token the model generated. The token that ends a reply
    (end-of-sequence) is sampled but not fed; the template's end-of-turn text is fed at the start of the next turn,
    together with the next user message and the opening of the assistant's turn. Each :meth:`send` therefore
    runs only the new text (``last_turn.fed_tokens``) through the model, appended after the existing cache.

    - Full cache (``kv_budget`` ``None`` or ``1.0``): all ``N`` entries stay; a reply equals (greedy, float32) a
      single ``generate`` over the whole chat-templated transcript. When the buffer is full it is re-allocated
      with at least twice the capacity (a compiled engine pads each turn's text to whole prefill chunks).
    - Compressed (``kv_budget`` a fraction ``f`` or an integer ``B``): before each turn the budget becomes
      ``B_turn = max(protected, ceil(f * N_turn))`` entries per KV head (``N_turn``: conversation tokens once the
      new text is fed; an integer budget stays ``B``; ``protected``: the method's sinks + recent window, so short
      turns never fall below it). A compiled session rounds ``B_turn`` up to a multiple of
      :data:`COMPILED_BUDGET_QUANTUM`: every distinct cache capacity is a new compiled graph (decode step,
      prefill kernel), so the budget moves in steps that several turns share instead of at every turn. The new text is appended to the compressed cache of the previous turns in
      chunks of ``prefill_chunk_size`` and the method compresses whenever a chunk would not fit
      (``prefill_compression="once"``: once after the turn's text) and at the end of the text, to ``B_turn``;
      during the reply it is compressed back to ``B_turn`` every ``decode_slack`` steps. Earlier turns survive
      only as the entries earlier compressions kept (KeepKV: kept and merged entries with their votes); they are
      never re-read. The method's observation window (the newest queries) and score state carry over.

    The transcript is kept as text (:attr:`messages`). The new tokens of a turn are the tokenization of the whole
    transcript past the cache's tokens when those are its prefix (``last_turn.token_prefix_reused``); otherwise
    (a reply tokenized differently than generated, or a template that re-renders earlier turns, e.g. trimming
    replies) the new text is what follows the longest common prefix of the transcript's text and the text already
    fed, and the cache keeps the tokens as they were fed.

    ``kv_budget``, ``method``, ``method_options``, ``decode_slack`` and ``prefill_compression`` as for
    :func:`keepkv.models.load`; all omitted, the session uses ``model``'s own. Sampling options and
    ``max_new_tokens`` given here are the defaults of :meth:`send` / :meth:`stream`.
    """

    def __init__(self, model: LanguageModel, kv_budget: float | int | None = None, method: str | None = None, *,
                 system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 decode_slack: int | None = None, prefill_compression: str | None = None,
                 **method_options: Any) -> None:
        require_int(max_new_tokens, "max_new_tokens", 1)
        require_int(decode_slack, "decode_slack", 1, allow_none=True)
        self.model = model
        self.defaults = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             seed=seed)
        SamplingConfig(temperature, top_k, top_p, seed)  # checked now, not at the first turn
        self.system = None
        if system is not None:
            self.system = check_messages([{"role": "system", "content": system}, {"role": "user", "content": "x"}],
                                         "system")[0]["content"]
        if model.tokenizer.chat_template is None:
            raise KeepKVError(f"{model.name} has no chat template, so it cannot chat; use generate() with a plain "
                              "prompt")
        self.engine, self.method, self.kv_budget = _session_engine(model, kv_budget, method, method_options,
                                                                   decode_slack, prefill_compression)
        self.turns: list[TurnStats] = []
        self.reset()

    def __repr__(self) -> str:
        return (f"ChatSession({self.model.name!r}, method={self.method!r}, kv_budget={self.kv_budget}, "
                f"turns={len(self.turns)}, tokens={self.position})")

    # ---- state ------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the conversation (the system prompt stays) and its cache."""
        self._messages: list[dict[str, str]] = [] if self.system is None else [
            {"role": "system", "content": self.system}]
        self._ids: list[int] = []  # the tokens in the cache, in position order
        self._text = ""  # the text those tokens stand for
        self._caches: list = []
        self.position = 0
        self.turns = []

    @property
    def messages(self) -> list[dict[str, str]]:
        """The transcript so far (a copy): system prompt, user turns, replies."""
        return [dict(message) for message in self._messages]

    @property
    def last_turn(self) -> TurnStats | None:
        return self.turns[-1] if self.turns else None

    @property
    def token_ids(self) -> list[int]:
        """The tokens fed into the cache so far, in position order (a copy)."""
        return list(self._ids)

    def entries_per_head(self) -> torch.Tensor:
        """``[layers, 1, kv_heads]`` entries the cache holds now."""
        return torch.stack([cache.live_entries() for cache in self._caches])

    def cache_positions(self) -> torch.Tensor:
        """``[layers, 1, kv_heads, slots]`` token positions of the live entries (``-1`` for empty slots)."""
        return torch.stack([torch.where(cache.log_votes > -math.inf, cache.positions, -1) for cache in self._caches])

    # ---- turns ------------------------------------------------------------------------------------------------
    def send(self, text: str, **options: Any) -> str:
        """The reply to user message ``text`` (added to the transcript with the reply). ``options``:
        ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed`` (defaults from the constructor)."""
        return self.model.tokenizer.decode(list(self._turn_tokens(text, options)))

    def stream(self, text: str, **options: Any) -> Iterator[str]:
        """As :meth:`send`, yielding the reply piece by piece; checked when called, run from the first ``next()``.
        The turn (and the part of the reply already produced) is recorded even if the stream is not finished."""
        tokens = self._turn_tokens(text, options)
        return _text_pieces(self.model.tokenizer, tokens)

    def _turn_tokens(self, text: str, options: dict[str, Any]) -> Iterator[int]:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise KeepKVError(f"unknown option(s) {unknown}; allowed: {', '.join(self.defaults)}")
        settings = {**self.defaults, **options}
        max_new_tokens = require_int(settings.pop("max_new_tokens"), "max_new_tokens", 1)
        sampling = SamplingConfig(**settings)
        require_text(text, "text")
        if not text.strip():
            raise KeepKVError("the message is empty: give at least one non-blank character")
        messages = self._messages + [{"role": "user", "content": text}]
        rendered = render_messages(self.model.tokenizer, messages)
        new_ids, reused = self._new_tokens(rendered)
        limit = self.model.config.max_position_embeddings
        if self.position + len(new_ids) + max_new_tokens > limit:
            raise KeepKVError(f"the conversation ({self.position} tokens) + this turn ({len(new_ids)}) + "
                              f"{max_new_tokens} new tokens exceed the model's context of {limit} tokens: "
                              "reset() the session or ask for fewer new tokens")
        return self._run_turn(messages, rendered, new_ids, reused, max_new_tokens, sampling)

    def _new_tokens(self, rendered: str) -> tuple[list[int], bool]:
        """The tokens of ``rendered`` (the whole transcript) that the cache has not seen (class docstring)."""
        tokenizer = self.model.tokenizer
        full = tokenizer.encode(rendered)
        if full[: len(self._ids)] == self._ids and len(full) > len(self._ids):
            return full[len(self._ids):], True
        common = len(os.path.commonprefix([rendered, self._text]))
        if common < len(self._text):
            log.warning("the chat template re-rendered %d characters of earlier turns differently; the cache keeps "
                        "them as first fed", len(self._text) - common)
        return tokenizer.encode(rendered[common:], add_bos=False), False

    def _run_turn(self, messages: list[dict[str, str]], rendered: str, new_ids: list[int], reused: bool,
                  max_new_tokens: int, sampling: SamplingConfig) -> Iterator[int]:
        engine, model = self.engine, self.model
        stats = TurnStats(turn=len(self.turns) + 1, fed_tokens=len(new_ids), start_position=self.position,
                          token_prefix_reused=reused)
        started = time.perf_counter()
        logits = self._feed(new_ids, max_new_tokens)
        manager = engine.cache_manager
        stats.prefill_seconds = time.perf_counter() - started
        self._ids += new_ids
        self._text = rendered
        self._messages = messages
        self.position += len(new_ids)
        stats.budget = manager.budget
        log.debug("turn %d: fed %d new tokens at positions %d..%d (token prefix reused: %s)", stats.turn,
                  len(new_ids), stats.start_position, self.position - 1, reused)
        eos = set(model.tokenizer.eos_token_ids)
        generator = sampling.make_generator(model.device)
        reply: list[int] = []
        self._messages.append({"role": "assistant", "content": ""})
        self.turns.append(stats)
        started = time.perf_counter()
        try:
            for token_id in decode_tokens(engine, logits, self.position, max_new_tokens, sampling, generator, eos):
                reply.append(token_id)
                self._ids.append(token_id)
                self.position += 1
                yield token_id
        finally:
            reply_text = model.tokenizer.decode(reply)
            self._messages[-1]["content"] = reply_text
            self._text += reply_text
            self._caches = list(engine.caches)
            stats.reply_tokens, stats.total_tokens = len(reply), self.position
            stats.decode_seconds = time.perf_counter() - started
            stats.compressions = manager.compressions  # counted from this turn's start
            stats.entries_per_head_max = int(self.entries_per_head().max())
            log.info("turn %d: %d new tokens fed at position %d, %d reply tokens; cache holds at most %d entries "
                     "per head%s", stats.turn, stats.fed_tokens, stats.start_position, stats.reply_tokens,
                     stats.entries_per_head_max, "" if stats.budget is None else f" (budget {stats.budget})")

    def _feed(self, new_ids: list[int], max_new_tokens: int) -> torch.Tensor:
        """Run ``new_ids`` through the model after the cache (the first turn: a fresh prefill); compress as the
        class docstring says; return the logits ``[1, vocab]`` of the last one."""
        engine, device = self.engine, self.model.device
        manager = engine.cache_manager
        compressed = not manager.keeps_everything
        total = self.position + len(new_ids)
        if compressed:
            manager.kv_budget = self._budget_entries(manager, total)
        ids = torch.tensor([new_ids], dtype=torch.long, device=device)
        valid = torch.ones_like(ids, dtype=torch.bool)
        if not self._caches:
            engine.prepare_caches(1, len(new_ids), max_new_tokens)
            with torch.inference_mode():
                logits, _ = engine.prefill(ids, valid)
                engine.end_prefill()
            return logits
        chunk = engine.prefill_chunk_size
        padded = round_up(len(new_ids), chunk) if engine.compile else len(new_ids)
        if compressed:
            room = chunk if manager.prefill_compression == "chunked" else padded
            engine.start_from_prefill(self._caches, total, room, compress=False)
        elif manager.caches[0] is self._caches[0] and manager.filled + padded + max_new_tokens <= \
                self._caches[0].capacity:  # filled counts slots, chunk padding included
            engine.network.attach_caches(self._caches)  # the full cache still has room: no copy
        else:  # grow at least geometrically: few distinct capacities, so few compiled graphs
            room = max(padded + max_new_tokens, self._caches[0].capacity)
            engine.start_from_prefill(self._caches, total, room, compress=False)
        positions = torch.arange(self.position, total, device=device)[None]
        logits = engine.extend(ids, positions, valid)[:, -1]
        if compressed:
            manager.max_new_tokens = max_new_tokens  # the decode room of compress-once methods
            engine.end_prefill()
        return logits

    def _budget_entries(self, manager: CacheManager, total_tokens: int) -> int:
        """``B_turn`` (class docstring): entries per head for a conversation of ``total_tokens`` tokens."""
        if not isinstance(self.kv_budget, float):
            return int(self.kv_budget)
        entries = max(manager.method.protected_entries, math.ceil(self.kv_budget * total_tokens))
        return round_up(entries, COMPILED_BUDGET_QUANTUM) if self.engine.compile else entries


def _session_engine(model: LanguageModel, kv_budget: float | int | None, method: str | None,
                    options: dict[str, Any], decode_slack: int | None,
                    prefill_compression: str | None) -> tuple[GenerationEngine, str, float | int | None]:
    """The session's own engine over ``model``'s network: ``model``'s method and budget when neither is given."""
    from keepkv.checks import require_choice
    from keepkv.generate import GenerationEngine
    from keepkv.models.loading import resolve_method
    from keepkv.cache.manager import PREFILL_COMPRESSION

    own = model.engine.cache_manager
    slack = decode_slack or own.decode_slack
    once = prefill_compression or own.prefill_compression
    require_choice(once, "prefill_compression", PREFILL_COMPRESSION)
    if kv_budget is None and method is None and not options:
        name, method_object, kv_budget = model.method, model.method_object, model.kv_budget
    else:
        name, method_object = resolve_method(method, kv_budget, dict(options))
    manager = CacheManager(model.config, model.dtype, model.device, method_object, kv_budget, slack, once,
                           compiled_ops=model.engine.compile, runtime=model.network.runtime)
    engine = GenerationEngine(model.network, compile=model.engine.compile,
                              prefill_chunk_size=model.engine.prefill_chunk_setting, cache_manager=manager)
    return engine, name, kv_budget


def _text_pieces(tokenizer: Tokenizer, tokens: Iterator[int]) -> Iterator[str]:
    """The text each token of ``tokens`` adds, holding back an incomplete UTF-8 sequence."""
    generated: list[int] = []
    emitted = ""
    for token_id in tokens:
        generated.append(token_id)
        text = tokenizer.decode(generated)
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(emitted):
            yield text[len(emitted):]
            emitted = text
