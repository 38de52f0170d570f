"""Errors keepkv raises for bad input.

Every error says what was wrong and what is allowed. They subclass ``ValueError`` (bad values) or
``FileNotFoundError`` so callers that catch the builtin types keep working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KeepKVError(ValueError):
    """Bad input to keepkv: the message names the problem and what is allowed."""


class CheckpointError(KeepKVError):
    """A checkpoint (folder, safetensors or GGUF file) is missing, corrupt or does not match its config."""


def suggest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """A ``" Did you mean: a, b?"`` suffix listing the closest of ``choices`` to ``name`` (or ``""``)."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.5)
    if not close:
        close = [c for c in lowered if name.lower() in c][:n]
    return f" Did you mean: {', '.join(lowered[c] for c in close)}?" if close else ""
