"""Model configuration: one dataclass for the one decoder, and its readers.

Llama, Mistral and Qwen2 are the same decoder (RMSNorm, RoPE, GQA attention, SwiGLU MLP); they differ only by
the flags here: ``attention_bias`` (Qwen2's q/k/v bias), ``sliding_window`` (Mistral), ``rope_scaling``
(Llama-3.x) and ``tie_word_embeddings``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keepkv.checks import is_integer, require_bool, require_int, require_real, shown
from keepkv.errors import CheckpointError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_SCALING = ("default", "linear", "llama3")
LLAMA3_ROPE_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

# Sanity bounds on a config's sizes, far above every released decoder (vocabularies ~262k, hidden 16k, 126
# layers, 128 heads): a size beyond them is a broken config, refused before anything is allocated for it.
MAX_CONTEXT = 1 << 30
MAX_HEAD_DIM = 1 << 12
INT_FIELD_LIMITS = {
    "vocab_size": (1, 1 << 22),
    "hidden_size": (1, 1 << 17),
    "intermediate_size": (1, 1 << 19),
    "num_layers": (1, 4096),
    "num_heads": (1, 4096),
    "num_kv_heads": (1, 4096),
    "head_dim": (0, MAX_HEAD_DIM),  # 0: hidden_size // num_heads
    "max_position_embeddings": (1, MAX_CONTEXT),
}
# config.json keys of the integer fields (Hugging Face names -> ModelConfig names)
HF_INT_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
}


@dataclass(frozen=True)
class ModelConfig:
    """Shape and flags of a decoder-only transformer.

    Attributes hold what their names say; ``head_dim`` defaults to ``hidden_size // num_heads``.
    ``rope_scaling`` is ``None`` or a dict with ``rope_type`` in ``SUPPORTED_ROPE_SCALING`` and that type's
    fields (``factor``; for ``llama3`` also ``low_freq_factor``, ``high_freq_factor``,
    ``original_max_position_embeddings``). ``sliding_window`` is ``None`` (full attention) or the number of
    most recent positions a query may attend to, itself included (Mistral / Hugging Face convention).
    """

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        """Check every field's type and range (so no size can divide by zero, grow memory without bound or
        become NaN later); derive ``head_dim``. Raises :class:`CheckpointError` naming the field."""
        if not isinstance(self.arch, str) or self.arch not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"unsupported architecture {self.arch!r}; keepkv supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name, (low, high) in INT_FIELD_LIMITS.items():
            require_int(getattr(self, name), f"config field {name}", low, high, error=CheckpointError)
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        require_int(self.head_dim, "config field head_dim", 2, MAX_HEAD_DIM, error=CheckpointError)
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise CheckpointError(f"head_dim must be even for RoPE, got {self.head_dim}")
        require_real(self.rope_theta, "config field rope_theta", 0.0, low_inclusive=False, error=CheckpointError)
        require_real(self.rms_norm_eps, "config field rms_norm_eps", 0.0, 1.0, error=CheckpointError)
        require_int(self.sliding_window, "config field sliding_window", 1, MAX_CONTEXT, allow_none=True,
                    error=CheckpointError)
        for name in ("tie_word_embeddings", "attention_bias"):
            require_bool(getattr(self, name), f"config field {name}", error=CheckpointError)
        for name in ("bos_token_id", "pad_token_id"):
            require_int(getattr(self, name), f"config field {name}", allow_none=True, error=CheckpointError)
        if not isinstance(self.eos_token_ids, tuple) or not all(is_integer(i) for i in self.eos_token_ids):
            raise CheckpointError(
                f"config field eos_token_ids must be a tuple of integers, got {shown(self.eos_token_ids)}"
            )
        _check_rope_scaling(self.rope_scaling)

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA group size ``G``)."""
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of keys + values one token occupies in the full cache, over all layers and KV heads."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Build from a Hugging Face ``config.json`` dict; the ``model_type`` decides the architecture.

        Every field is checked under its config.json name before use: a string, ``null``, fraction or bool where
        an integer belongs, a NaN, a size beyond :data:`INT_FIELD_LIMITS`, a ``rope_scaling`` that is not an
        object ... is a :class:`CheckpointError` naming the field and what is allowed. Optional fields set to
        ``null`` take their defaults.
        """
        if not isinstance(hf, dict):
            raise CheckpointError(f"config.json must hold a JSON object of fields, got {shown(hf)}")
        model_type = hf.get("model_type")
        if not isinstance(model_type, str) or model_type not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"unsupported architecture model_type={model_type!r}; keepkv supports "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        sizes = {name: _hf_int(hf, key, name) for key, name in HF_INT_KEYS.items()}
        rope_theta, rope_scaling = _hf_rope(hf)
        return cls(
            arch=model_type,
            **sizes,
            num_kv_heads=_hf_int(hf, "num_key_value_heads", "num_kv_heads", default=sizes["num_heads"]),
            head_dim=_hf_int(hf, "head_dim", "head_dim", default=0),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_norm_eps=require_real(_hf_value(hf, "rms_norm_eps", 1e-6), "config.json field rms_norm_eps", 0.0,
                                      1.0, error=CheckpointError),
            max_position_embeddings=_hf_int(hf, "max_position_embeddings", "max_position_embeddings", default=4096),
            tie_word_embeddings=require_bool(_hf_value(hf, "tie_word_embeddings", False),
                                             "config.json field tie_word_embeddings", error=CheckpointError),
            attention_bias=require_bool(_hf_value(hf, "attention_bias", model_type == "qwen2"),
                                        "config.json field attention_bias", error=CheckpointError),
            sliding_window=_hf_sliding_window(hf, model_type),
            bos_token_id=require_int(hf.get("bos_token_id"), "config.json field bos_token_id", allow_none=True,
                                     error=CheckpointError),
            eos_token_ids=_hf_token_ids(hf.get("eos_token_id")),
            pad_token_id=require_int(hf.get("pad_token_id"), "config.json field pad_token_id", allow_none=True,
                                     error=CheckpointError),
        )

    @classmethod
    def from_hf_file(cls, path: str | Path) -> "ModelConfig":
        """:meth:`from_hf_dict` of a ``config.json`` file; errors name the file."""
        path = Path(path)
        try:
            return cls.from_hf_dict(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path} is not valid JSON: {err}") from None
        except UnicodeDecodeError as err:
            raise CheckpointError(f"{path} is not UTF-8 text ({err})") from None
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}") from None


_REQUIRED = object()


def _hf_value(hf: dict[str, Any], key: str, default: Any = _REQUIRED) -> Any:
    """``hf[key]``; an optional field that is absent or ``null`` gives ``default``; a required one is an error."""
    value = hf.get(key)
    if value is not None:
        return value
    if default is _REQUIRED:
        raise CheckpointError(f"config.json lacks the required field {key!r}" if key not in hf else
                              f"config.json field {key} is null; it must be set")
    return default


def _hf_int(hf: dict[str, Any], key: str, field_name: str, default: Any = _REQUIRED) -> int:
    """The integer config.json field ``key`` within the limits of the :class:`ModelConfig` field it fills."""
    low, high = INT_FIELD_LIMITS[field_name]
    return require_int(_hf_value(hf, key, default), f"config.json field {key}", low, high, error=CheckpointError)


def _hf_sliding_window(hf: dict[str, Any], model_type: str) -> int | None:
    """The sliding window, or ``None`` (absent, ``null``, ``0``, or a Qwen2 config with ``use_sliding_window`` off)."""
    sliding = hf.get("sliding_window")
    if model_type == "qwen2" and not hf.get("use_sliding_window", False):
        return None
    if sliding is None or (is_integer(sliding) and sliding == 0):
        return None
    return require_int(sliding, "config.json field sliding_window", 1, MAX_CONTEXT, error=CheckpointError)


def _hf_token_ids(eos: Any) -> tuple[int, ...]:
    """``eos_token_id`` (``null``, an integer or a list of integers) as a tuple."""
    values = eos if isinstance(eos, list) else ([] if eos is None else [eos])
    if not all(is_integer(value) for value in values):
        raise CheckpointError(f"config.json field eos_token_id must be null, an integer or a list of integers, "
                              f"got {shown(eos)}")
    return tuple(int(value) for value in values)


def _rope_kind(scaling: dict[str, Any]) -> Any:
    return scaling.get("rope_type", scaling.get("type", "default"))


def _json_object_or_none(hf: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = hf.get(key)
    if value is not None and not isinstance(value, dict):
        raise CheckpointError(f"config.json field {key} must be null or an object (e.g. "
                              f'{{"rope_type": "linear", "factor": 2.0}}), got {shown(value)}')
    return value


def _hf_rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling or None)`` from ``rope_theta`` / ``rope_scaling`` or transformers 5's
    ``rope_parameters`` (which folds both in); a ``"default"`` scaling is no scaling."""
    rope_theta = hf.get("rope_theta")
    rope_scaling = _json_object_or_none(hf, "rope_scaling")
    rope_params = _json_object_or_none(hf, "rope_parameters")
    if rope_params is not None:
        rope_theta = rope_params.get("rope_theta", rope_theta)
        if rope_params.get("rope_type", "default") != "default":
            rope_scaling = rope_params
    if rope_scaling is not None and _rope_kind(rope_scaling) == "default":
        rope_scaling = None
    theta = require_real(10000.0 if rope_theta is None else rope_theta, "config.json field rope_theta", 0.0,
                         low_inclusive=False, error=CheckpointError)
    return theta, dict(rope_scaling) if rope_scaling else None


def _check_rope_scaling(scaling: Any) -> None:
    """``None`` or a dict of a supported type whose parameters are positive finite numbers (``llama3``: all four
    of :data:`LLAMA3_ROPE_FIELDS`, ``high_freq_factor > low_freq_factor``)."""
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise CheckpointError(
            f"config field rope_scaling must be None or a dict with a rope_type, got {shown(scaling)}"
        )
    kind = _rope_kind(scaling)
    if not isinstance(kind, str) or kind not in SUPPORTED_ROPE_SCALING:
        raise CheckpointError(
            f"unsupported rope_scaling type {kind!r}; supported: {', '.join(SUPPORTED_ROPE_SCALING)}"
        )
    if kind == "linear":
        require_real(scaling.get("factor", 1.0), "rope_scaling factor", 0.0, low_inclusive=False, error=CheckpointError)
    if kind == "llama3":
        missing = [name for name in LLAMA3_ROPE_FIELDS if scaling.get(name) is None]
        if missing:
            raise CheckpointError(f"llama3 rope_scaling lacks {', '.join(missing)}; it needs "
                                  f"{', '.join(LLAMA3_ROPE_FIELDS)}")
        low, high = (require_real(scaling[name], f"rope_scaling {name}", 0.0, low_inclusive=False,
                                  error=CheckpointError) for name in ("low_freq_factor", "high_freq_factor"))
        require_real(scaling["factor"], "rope_scaling factor", 0.0, low_inclusive=False, error=CheckpointError)
        require_real(scaling["original_max_position_embeddings"], "rope_scaling original_max_position_embeddings",
                     1.0, error=CheckpointError)
        if not high > low:
            raise CheckpointError(f"llama3 rope_scaling needs high_freq_factor > low_freq_factor, got {high} <= {low}")
