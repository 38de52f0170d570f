"""OpenAI request bodies -> checked generation jobs, and OpenAI-style error bodies.

Every field is checked with :mod:`keepkv.checks` before anything is queued; a bad one is a :class:`RequestError`
(a :class:`~keepkv.errors.KeepKVError`) carrying the HTTP status and the OpenAI error fields, rendered by
:func:`error_body` as ``{"error": {"message", "type", "param", "code"}}``.

What is accepted (OpenAI's names and defaults; anything else in the body is ignored, as OpenAI-compatible servers do):

- ``model`` (required): the served model's id (``GET /v1/models``); another id is ``404 model_not_found``, as
  OpenAI answers;
- ``prompt`` (completions): a string or a list of strings (one choice each); token-id prompts are refused;
  ``messages`` (chat): ``[{"role", "content"}]`` with string content or a list of ``{"type": "text", "text"}``
  parts, rendered with the checkpoint's chat template;
- ``max_tokens`` (chat also ``max_completion_tokens``): an integer >= 1; default 16 for completions (OpenAI's) and,
  for chat, the room left in the context capped at :data:`DEFAULT_CHAT_MAX_TOKENS`; prompt + ``max_tokens`` must
  fit the model's context, else ``400 context_length_exceeded``;
- ``temperature`` in [0, 2] (default 1, OpenAI's; 0 is greedy), ``top_p`` in (0, 1], ``seed``, ``stop`` (a string
  or up to 4), ``stream``, ``stream_options.include_usage``;
- only their neutral values: ``n``/``best_of`` 1, ``echo`` false, ``logprobs`` null/false, ``presence_penalty`` and
  ``frequency_penalty`` 0, ``logit_bias`` empty, ``suffix`` null (anything else is a 400 naming the field);
- keepkv extensions (``extra_body`` in the ``openai`` client): ``top_k``, and ``kv_budget`` / ``method`` to override
  the server's cache setting for this request (:mod:`keepkv.serve.variants`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from keepkv.checks import require_bool, require_int, require_real, require_str, require_text, shown
from keepkv.errors import KeepKVError
from keepkv.models.language_model import stop_sequences
from keepkv.sampling import MAX_SEED, SamplingConfig
from keepkv.serve.variants import ModelVariants, VariantKey

DEFAULT_COMPLETION_MAX_TOKENS = 16
DEFAULT_CHAT_MAX_TOKENS = 512
MAX_STOP_SEQUENCES = 4
NEUTRAL_FIELDS: dict[str, tuple[Any, ...]] = {
    "n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None, False),
    "top_logprobs": (None, 0), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}), "suffix": (None, ""), "tools": (None, []), "functions": (None, []),
}
CHAT_ROLES = ("system", "user", "assistant", "developer")


class RequestError(KeepKVError):
    """A request keepkv refuses: ``status`` (400, 404 ...), OpenAI's ``type``, ``param`` and ``code``."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.param, self.code, self.status, self.type = param, code, status, type


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True)
class JobSpec:
    """One choice to generate: the prompt's token ids, how many tokens at most, how to sample, where to stop, and
    which cache variant (``(method, kv_budget)``) runs it."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: SamplingConfig
    stop: tuple[str, ...]
    variant: VariantKey


@dataclass(frozen=True)
class ParsedRequest:
    """A checked request: its jobs (one per prompt), the model id to echo, and the streaming options."""

    jobs: tuple[JobSpec, ...]
    model: str
    stream: bool
    include_usage: bool


def _checked(param: str, check: Callable[[], Any]) -> Any:
    """Run a :mod:`keepkv.checks` check; its ``KeepKVError`` becomes a 400 naming ``param``."""
    try:
        return check()
    except RequestError:
        raise
    except KeepKVError as err:
        raise RequestError(str(err), param=param, code="invalid_value") from None


def _common(body: Any, model_id: str) -> None:
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {shown(body)}", code="invalid_body")
    if "model" not in body:
        raise RequestError("you must provide a model parameter", param="model", code="missing_required_parameter")
    _checked("model", lambda: require_str(body["model"], "model"))
    if body["model"] != model_id:
        raise RequestError(f"the model {body['model']!r} does not exist: this server serves {model_id!r} "
                           "(GET /v1/models)", param="model", code="model_not_found", status=404)
    for name, neutral in NEUTRAL_FIELDS.items():
        value = body.get(name)
        if value is not None and not any(value == allowed and isinstance(value, bool) == isinstance(allowed, bool)
                                         for allowed in neutral if allowed is not None):
            raise RequestError(f"{name}={value!r} is not supported by keepkv serve; allowed: "
                               f"{', '.join(repr(v) for v in neutral if v is not None)} (or leave it out)",
                               param=name, code="unsupported_parameter")


def _sampling(body: dict) -> SamplingConfig:
    temperature = _checked("temperature", lambda: require_real(body.get("temperature", 1.0), "temperature", 0.0,
                                                               2.0, allow_none=True))
    top_p = _checked("top_p", lambda: require_real(body.get("top_p"), "top_p", 0.0, 1.0, low_inclusive=False,
                                                   allow_none=True))
    top_k = _checked("top_k", lambda: require_int(body.get("top_k"), "top_k", 1, allow_none=True))
    seed = _checked("seed", lambda: require_int(body.get("seed"), "seed", 0, MAX_SEED, allow_none=True))
    return SamplingConfig(1.0 if temperature is None else temperature, top_k, None if top_p == 1.0 else top_p, seed)


def _stop(body: dict) -> tuple[str, ...]:
    stop = _checked("stop", lambda: stop_sequences(body.get("stop")))
    if len(stop) > MAX_STOP_SEQUENCES:
        raise RequestError(f"stop holds {len(stop)} sequences; at most {MAX_STOP_SEQUENCES} are allowed",
                           param="stop", code="invalid_value")
    return stop


def _stream(body: dict) -> tuple[bool, bool]:
    stream = bool(_checked("stream", lambda: require_bool(body.get("stream", False), "stream", allow_none=True)))
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError(f"stream_options must be an object, got {shown(options)}", param="stream_options",
                           code="invalid_value")
    usage = _checked("stream_options", lambda: require_bool(options.get("include_usage", False),
                                                            "stream_options.include_usage", allow_none=True))
    return stream, bool(usage)


def _variant(body: dict, variants: ModelVariants) -> VariantKey:
    return _checked("kv_budget" if "kv_budget" in body else "method",
                    lambda: variants.resolve(body.get("method"), body.get("kv_budget")))


def _max_tokens(body: dict, names: tuple[str, ...], default: int | None) -> int | None:
    for name in names:
        if body.get(name) is not None:
            return _checked(name, lambda: require_int(body[name], name, 1))
    return default


def _fit(prompt_ids: list[int], max_tokens: int, context: int, param: str) -> None:
    if len(prompt_ids) + max_tokens > context:
        raise RequestError(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the {param}, {max_tokens} for the "
            "completion). Please reduce the length of the prompt or max_tokens.",
            param=param, code="context_length_exceeded")


def parse_completion(body: Any, model_id: str, tokenizer: Any, context: int, variants: ModelVariants
                     ) -> ParsedRequest:
    """``POST /v1/completions``: one job per prompt string (see the module docstring)."""
    _common(body, model_id)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise RequestError(f"prompt must be a string or a non-empty list of strings (token ids are not supported), "
                           f"got {shown(prompt)}", param="prompt", code="invalid_value")
    max_tokens = _max_tokens(body, ("max_tokens",), DEFAULT_COMPLETION_MAX_TOKENS)
    sampling, stop, variant = _sampling(body), _stop(body), _variant(body, variants)
    jobs = []
    for text in prompts:
        _checked("prompt", lambda: require_text(text, "prompt"))
        if not text.strip():
            raise RequestError("the prompt is empty: give at least one non-blank character", param="prompt",
                               code="invalid_value")
        ids = tokenizer.encode(text)
        _fit(ids, max_tokens, context, "prompt")
        jobs.append(JobSpec(tuple(ids), max_tokens, sampling, stop, variant))
    stream, usage = _stream(body)
    return ParsedRequest(tuple(jobs), model_id, stream, usage)


def _message_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError(f"messages[{index}].content must be a string or a list of {{'type': 'text', 'text': ...}} "
                       f"parts (images and audio are not supported), got {shown(content)}",
                       param=f"messages[{index}].content", code="invalid_value")


def parse_chat(body: Any, model_id: str, tokenizer: Any, context: int, variants: ModelVariants) -> ParsedRequest:
    """``POST /v1/chat/completions``: the messages rendered with the chat template, one job."""
    _common(body, model_id)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(f"messages must be a non-empty list of {{'role', 'content'}} objects, got "
                           f"{shown(messages)}", param="messages", code="invalid_value")
    rendered = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise RequestError(f"messages[{index}] must be an object whose role is one of {CHAT_ROLES}, got "
                               f"{shown(message)}", param=f"messages[{index}]", code="invalid_value")
        role = "system" if message["role"] == "developer" else message["role"]
        rendered.append({"role": role, "content": _message_text(message.get("content"), index)})
    text = _checked("messages", lambda: tokenizer.apply_chat_template(rendered))
    ids = tokenizer.encode(text)
    room = context - len(ids)
    max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"), max(1, min(DEFAULT_CHAT_MAX_TOKENS, room)))
    _fit(ids, max_tokens, context, "messages")
    job = JobSpec(tuple(ids), max_tokens, _sampling(body), _stop(body), _variant(body, variants))
    stream, usage = _stream(body)
    return ParsedRequest((job,), model_id, stream, usage)
