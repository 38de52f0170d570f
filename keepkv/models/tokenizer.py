r"""Text <-> token ids, built on the ``tokenizers`` library, from a Hugging Face ``tokenizer.json`` or GGUF metadata.

A Hugging Face folder ships the exact tokenizer (``tokenizer.json``) and is used as is. A GGUF file only carries
the vocabulary, the BPE merges, token types and the *name* of llama.cpp's pre-tokenizer (``tokenizer.ggml.pre``);
:meth:`Tokenizer.from_gguf` rebuilds a byte-level BPE tokenizer from them:

- model: ``BPE(vocab, merges)``; ``ignore_merges`` for the Llama-3 family, as llama.cpp does;
- pre-tokenizer: llama.cpp's split regexes for that name (:data:`GGUF_PRE_TOKENIZER_SPLITS`), each a
  ``Split(behavior="isolated")``, then ``ByteLevel(use_regex=False)``. ``smollm`` is SmolLM's own
  ``Digits(individual_digits=True)`` + ``ByteLevel`` (the same as llama.cpp's ``\p{N}`` + GPT-2 regex);
- normalizer: ``NFC`` for the Qwen2 family, as Qwen's ``tokenizer.json`` has it (llama.cpp does not normalise);
  ``Prepend(" ")`` when the file sets ``add_space_prefix``;
- control tokens (type 3) become special tokens (matched whole in text, dropped by ``skip_special_tokens``),
  user-defined tokens (type 4) plain added tokens (matched whole, kept when decoding);
- decoder: ``ByteLevel``. A BOS token is prepended only if the file sets ``add_bos_token``.

Differences from ``transformers``' GGUF tokenizer (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``),
checked by ``tests/models/test_tokenizer.py``:

- ``qwen2``: identical ids on NFC text. On decomposed (non-NFC) text keepkv, like Qwen's own ``tokenizer.json``,
  normalises to NFC first; transformers' GGUF tokenizer has no normalizer, so its ids differ there.
- ``smollm``: transformers (5.x) does not know this pre-tokenizer name and uses plain GPT-2 byte-level splitting,
  without SmolLM's digit isolation. SmolLM2's vocabulary has single-digit tokens only (no digit merges), so digits
  come out the same; the difference is the whitespace *before* a digit. keepkv, like SmolLM's ``tokenizer.json``
  and llama.cpp, splits the digit off first, so a whitespace run before it stays one piece: ``"a   8"`` ->
  ``a ĠĠĠ 8`` and ``"x\r\n1"`` -> ``x čĊ 1``; transformers leaves the last blank with the digit and gets
  ``a ĠĠ Ġ 8`` and ``x č Ċ 1``. Elsewhere the ids agree.
- SmolLM2's vocabulary has no token for a few bytes (0x04 0x06 0x13 0x14 0x16 0x1d 0xc0 0xc1 0xf1 0xf2 0xf5-0xff):
  characters needing them (rare control characters, Unicode planes 4-11) are dropped, as llama.cpp and
  transformers drop them.

Chat templates are rendered with Jinja2 in a sandbox (``ImmutableSandboxedEnvironment``), because a template comes
from a downloaded file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from keepkv.errors import KeepKVError, suggest
from keepkv.models.checkpoint import GGUFTokenizerData

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT_SPLITS = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]")

LLAMA3_PRE_TOKENIZERS = ("llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe")
QWEN2_PRE_TOKENIZERS = ("qwen2", "qwen2.5", "qwen-2.5", "deepseek-r1-qwen", "stablelm2")
DIGITS_FIRST_PRE_TOKENIZERS = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone")

# llama.cpp pre-tokenizer name -> the regexes it splits text with, applied one after the other.
GGUF_PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "default": _DEFAULT_SPLITS,
    **{name: (_GPT2_SPLIT,) for name in ("gpt-2", "mpt", "olmo", "jais")},
    **{name: (_LLAMA3_SPLIT,) for name in LLAMA3_PRE_TOKENIZERS},
    **{name: (_QWEN2_SPLIT,) for name in QWEN2_PRE_TOKENIZERS},
    **{name: (r"\p{N}", _GPT2_SPLIT) for name in DIGITS_FIRST_PRE_TOKENIZERS},
}
GGUF_TOKEN_TYPE_CONTROL = 3
GGUF_TOKEN_TYPE_USER_DEFINED = 4


class Tokenizer:
    """Encode text to ids, decode ids to text, render chat prompts.

    Attributes:
        eos_token_ids: ids that end generation (first one = the primary eos).
        bos_token_id / pad_token_id: ids or ``None``.
        vocab_size: number of ids, added tokens included.
        chat_template: the Jinja2 chat template, or ``None``.
        add_bos: whether :meth:`encode` prepends ``bos_token_id`` by default.
        backend: the underlying ``tokenizers.Tokenizer``.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        pad_token_id: int | None,
        add_bos: bool,
        chat_template: str | None,
        vocab_size: int | None = None,
        source: str = "",
    ) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
        self.pad_token_id = pad_token_id
        self.add_bos = bool(add_bos)
        self.chat_template = chat_template
        self.vocab_size = max(vocab_size or 0, backend.get_vocab_size(with_added_tokens=True))
        self.source = source

    def __repr__(self) -> str:
        return (
            f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, bos={self.bos_token_id}, "
            f"eos={self.eos_token_ids}, add_bos={self.add_bos})"
        )

    # ---- text <-> ids ---------------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``. Special tokens written in the text (``<|im_start|>``) become their single id.

        ``add_bos``: prepend ``bos_token_id``; ``None`` follows the tokenizer's own setting. A text that already
        starts with the BOS token does not get a second one.
        """
        if not isinstance(text, str):
            raise KeepKVError(f"encode() takes a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        wants_bos = self.add_bos if add_bos is None else add_bos
        if wants_bos and self.bos_token_id is None:
            if add_bos:
                raise KeepKVError(f"add_bos=True, but this tokenizer ({self.source}) has no BOS token")
            return ids
        if wants_bos and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special (control) tokens are left out when ``skip_special_tokens``."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str | None:
        """The vocabulary entry of ``token_id`` as stored (byte-level spelling for BPE), or ``None``."""
        return self.backend.id_to_token(int(token_id))

    # ---- chat -----------------------------------------------------------------------------------------------
    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **template_variables: Any
    ) -> str:
        """Render ``messages`` (``[{"role": "user", "content": "..."}, ...]``) with the chat template.

        ``add_generation_prompt`` appends the opening of the assistant's turn. Extra keyword arguments (``tools``,
        ``system_message`` ...) are passed to the template. The result is text: :meth:`encode` it (its special
        tokens are recognised).
        """
        if self.chat_template is None:
            raise KeepKVError(
                f"this tokenizer ({self.source}) has no chat template; encode a plain prompt instead (chat=False)"
            )
        _check_messages(messages)
        template = self._compiled_chat_template
        try:
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._special_text(self.bos_token_id),
                eos_token=self._special_text(self.eos_token_ids[0] if self.eos_token_ids else None),
                **template_variables,
            )
        except KeepKVError:
            raise  # the template's own raise_exception(...)
        except _template_failures() as err:
            raise self._template_error("rendering", err) from None

    def _template_error(self, stage: str, err: Exception) -> KeepKVError:
        """What a broken chat template raised while ``stage`` (compiling / rendering), as a :class:`KeepKVError`."""
        return KeepKVError(
            f"the chat template of {self.source or 'this tokenizer'} failed while {stage} ({type(err).__name__}: "
            f"{err}); fix the template (tokenizer_config.json chat_template) or generate without chat=True"
        )

    def _special_text(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.backend.id_to_token(token_id) or "")

    @cached_property
    def _compiled_chat_template(self):
        import jinja2

        try:
            return _chat_template_environment().from_string(self.chat_template)
        except jinja2.TemplateError as err:
            raise self._template_error("compiling", err) from None

    # ---- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_file(
        cls, tokenizer_json_path: str | Path, tokenizer_config_json_path: str | Path | None = None
    ) -> Tokenizer:
        """Load a Hugging Face ``tokenizer.json``, with special tokens and chat template from ``tokenizer_config.json``.

        End-of-generation ids are the config's ``eos_token`` plus the ``eos_token_id`` (int or list) of a
        ``generation_config.json`` next to ``tokenizer.json`` (Llama-3 ends turns with ``<|eot_id|>`` there). A
        ``chat_template.jinja`` next to it is used when the config has no template. Whether BOS is prepended
        follows the config's ``add_bos_token``, else the ``tokenizer.json`` post-processor.
        """
        tokenizer_json_path = Path(tokenizer_json_path)
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_json_path))
        except Exception as err:  # noqa: BLE001 - the Rust library raises a bare Exception for unreadable files
            raise KeepKVError(f"{tokenizer_json_path} is not a readable tokenizer.json ({err})") from None
        settings = _read_json(Path(tokenizer_config_json_path)) if tokenizer_config_json_path else {}
        folder = tokenizer_json_path.parent

        def token_id(key: str) -> int | None:
            text = _token_content(settings.get(key))
            return None if text is None else backend.token_to_id(text)

        bos_token_id = token_id("bos_token")
        prefix = backend.encode("", add_special_tokens=True).ids  # what the post-processor puts before text
        if bos_token_id is None and prefix:
            bos_token_id = prefix[0]
        add_bos = settings.get("add_bos_token")
        if add_bos is None:
            add_bos = bos_token_id is not None and bos_token_id in prefix
        eos_ids = [token_id("eos_token"), *_generation_config_eos_ids(folder / "generation_config.json")]
        return cls(
            backend,
            bos_token_id=bos_token_id,
            eos_token_ids=tuple(dict.fromkeys(i for i in eos_ids if i is not None)),
            pad_token_id=token_id("pad_token"),
            add_bos=bool(add_bos),
            chat_template=_chat_template_from_settings(settings, folder),
            source=str(tokenizer_json_path),
        )

    @classmethod
    def from_gguf(cls, data: GGUFTokenizerData) -> Tokenizer:
        """Rebuild the tokenizer a GGUF file describes (byte-level BPE, ``tokenizer.ggml.model == "gpt2"``)."""
        if data.model != "gpt2":
            raise KeepKVError(
                f"{data.source}: GGUF tokenizer model {data.model!r} is not supported; keepkv rebuilds byte-level "
                "BPE tokenizers ('gpt2', used by Llama-3, Qwen2, SmolLM). Load the model's Hugging Face folder "
                "(tokenizer.json) instead"
            )
        pre = data.pre or "default"
        if pre not in GGUF_PRE_TOKENIZER_SPLITS:
            raise KeepKVError(
                f"{data.source}: unknown GGUF pre-tokenizer {pre!r}; supported: "
                f"{', '.join(GGUF_PRE_TOKENIZER_SPLITS)}.{suggest(pre, GGUF_PRE_TOKENIZER_SPLITS)}"
            )
        backend = tokenizers.Tokenizer(_gguf_bpe_model(data, ignore_merges=pre in LLAMA3_PRE_TOKENIZERS))
        backend.normalizer = _gguf_normalizer(pre, data.add_space_prefix)
        backend.pre_tokenizer = _gguf_pre_tokenizer(pre)
        backend.decoder = decoders.ByteLevel()
        _add_gguf_added_tokens(backend, data)
        return cls(
            backend,
            bos_token_id=data.bos_token_id,
            eos_token_ids=data.eos_token_ids,
            pad_token_id=data.pad_token_id,
            add_bos=bool(data.add_bos_token) if data.add_bos_token is not None else pre in LLAMA3_PRE_TOKENIZERS,
            chat_template=data.chat_template,
            vocab_size=len(data.tokens),
            source=data.source,
        )


# ---- GGUF pieces ----------------------------------------------------------------------------------------------
def _gguf_bpe_model(data: GGUFTokenizerData, ignore_merges: bool) -> models.BPE:
    """``BPE(vocab, merges)`` from the GGUF token list and ``"left right"`` merge strings."""
    if not data.merges:
        raise KeepKVError(f"{data.source}: the GGUF file has a BPE tokenizer but no tokenizer.ggml.merges")
    vocab = {token: token_id for token_id, token in enumerate(data.tokens)}
    merges = []
    for merge in data.merges:
        split_at = merge.find(" ", 1)  # as llama.cpp: the first space after the first character
        if split_at < 0:
            raise KeepKVError(f"{data.source}: malformed BPE merge {merge!r} (expected 'left right')")
        merges.append((merge[:split_at], merge[split_at + 1:]))
    return models.BPE(vocab, merges, ignore_merges=ignore_merges)


def _gguf_normalizer(pre: str, add_space_prefix: bool):
    """NFC for the Qwen2 family (Qwen's own tokenizer.json); a leading space if the file asks for one."""
    steps = []
    if pre in QWEN2_PRE_TOKENIZERS:
        steps.append(normalizers.NFC())
    if add_space_prefix:
        steps.append(normalizers.Prepend(" "))
    return normalizers.Sequence(steps) if steps else None


def _gguf_pre_tokenizer(pre: str):
    """llama.cpp's splits for ``pre`` as isolated ``Split`` steps, then the byte-level mapping."""
    if pre in DIGITS_FIRST_PRE_TOKENIZERS:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    splits = [pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in GGUF_PRE_TOKENIZER_SPLITS[pre]]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _add_gguf_added_tokens(backend: tokenizers.Tokenizer, data: GGUFTokenizerData) -> None:
    """Control tokens -> special tokens; user-defined tokens -> plain added tokens. Both keep their vocab ids."""
    special, user_defined = [], []
    for token, kind in zip(data.tokens, data.token_types):
        if kind == GGUF_TOKEN_TYPE_CONTROL:
            special.append(AddedToken(token, special=True, normalized=False))
        elif kind == GGUF_TOKEN_TYPE_USER_DEFINED:
            user_defined.append(AddedToken(token, special=False, normalized=False))
    if special:
        backend.add_special_tokens(special)
    if user_defined:
        backend.add_tokens(user_defined)


# ---- Hugging Face folder pieces -------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KeepKVError(f"{path} does not exist") from None
    except json.JSONDecodeError as err:
        raise KeepKVError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise KeepKVError(f"{path} should hold a JSON object, found {type(value).__name__}")
    return value


def _token_content(value: Any) -> str | None:
    """A special-token setting is a string or an ``AddedToken`` dict ``{"content": ...}``."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _generation_config_eos_ids(path: Path) -> list[int]:
    """``eos_token_id`` (int or list) of a ``generation_config.json``, or ``[]`` when there is none."""
    if not path.is_file():
        return []
    value = _read_json(path).get("eos_token_id")
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if isinstance(v, int)]


def _chat_template_from_settings(settings: Mapping[str, Any], folder: Path) -> str | None:
    """The default chat template: ``tokenizer_config.json``'s (a string, or a list of named templates), else a
    ``chat_template.jinja`` / ``chat_template.json`` file in the folder."""
    template = settings.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, Mapping)}
        template = named.get("default") or next(iter(named.values()), None)
    if isinstance(template, str):
        return template
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "chat_template.json").is_file():
        return _read_json(folder / "chat_template.json").get("chat_template")
    return None


# ---- chat templates -------------------------------------------------------------------------------------------
def _template_failures() -> tuple[type[Exception], ...]:
    """What rendering a (user-supplied) chat template can raise: Jinja2's errors and the Python errors of the
    expressions inside it (``"a" + 1``, ``x[5]``, ``1 / 0`` ...)."""
    import jinja2

    return (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError, ArithmeticError)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str) and "content" in m for m in messages
    ):
        raise KeepKVError(
            'messages must be a list of dicts like {"role": "user", "content": "..."}; got '
            f"{type(messages).__name__}"
        )


def _raise_template_error(message: str) -> None:
    raise KeepKVError(f"chat template error: {message}")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    """``tojson`` as Hugging Face templates expect it: no HTML escaping, unicode kept."""
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _chat_template_environment():
    """A sandboxed Jinja2 environment set up like the one Hugging Face renders chat templates in."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_template_error
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment
