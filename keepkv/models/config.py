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

from keepkv.errors import CheckpointError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_SCALING = ("default", "linear", "llama3")


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
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"unsupported architecture {self.arch!r}; keepkv supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if int(getattr(self, name)) <= 0:
                raise CheckpointError(f"config field {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise CheckpointError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in SUPPORTED_ROPE_SCALING:
                raise CheckpointError(
                    f"unsupported rope_scaling type {kind!r}; supported: {', '.join(SUPPORTED_ROPE_SCALING)}"
                )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise CheckpointError(f"sliding_window must be positive or None, got {self.sliding_window}")

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
        """Build from a Hugging Face ``config.json`` dict; the ``model_type`` decides the architecture."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"unsupported architecture model_type={model_type!r}; keepkv supports "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            num_heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            eos = hf.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            rope_scaling = hf.get("rope_scaling")
            rope_theta = hf.get("rope_theta")
            rope_params = hf.get("rope_parameters")  # transformers >= 5 folds theta + scaling in here
            if isinstance(rope_params, dict):
                rope_theta = rope_params.get("rope_theta", rope_theta)
                if rope_params.get("rope_type", "default") != "default":
                    rope_scaling = rope_params
            if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
                rope_scaling = None
            sliding = hf.get("sliding_window")
            if model_type == "qwen2" and not hf.get("use_sliding_window", False):
                sliding = None
            return cls(
                arch=model_type,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
                head_dim=int(hf.get("head_dim") or hidden // num_heads),
                rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
                rope_scaling=dict(rope_scaling) if rope_scaling else None,
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
                sliding_window=int(sliding) if sliding else None,
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=eos_ids,
                pad_token_id=hf.get("pad_token_id"),
            )
        except KeyError as missing:
            raise CheckpointError(f"config.json lacks the required field {missing}") from None

    @classmethod
    def from_hf_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            return cls.from_hf_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path} is not valid JSON: {err}") from None
