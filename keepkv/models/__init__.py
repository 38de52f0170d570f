"""Models: ``load(name_or_path, kv_budget=..., method=...)`` -> :class:`LanguageModel`.

``load`` and ``LanguageModel`` are imported on first use, so that ``keepkv.models.transformer`` and
``keepkv.models.config`` can be imported by lower layers without pulling in loading and generation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from keepkv.models.config import ModelConfig

if TYPE_CHECKING:
    from keepkv.models.language_model import LanguageModel
    from keepkv.models.loading import load

__all__ = ["LanguageModel", "ModelConfig", "load"]


def __getattr__(name: str) -> Any:
    if name == "load":
        from keepkv.models.loading import load

        return load
    if name == "LanguageModel":
        from keepkv.models.language_model import LanguageModel

        return LanguageModel
    raise AttributeError(f"module 'keepkv.models' has no attribute {name!r}")
