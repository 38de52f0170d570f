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


def close_names(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` of ``choices`` closest to ``name`` (case-insensitive), best first; failing any close match, the
    choices that contain ``name``."""
    lowered = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.5)
    if not close:
        close = [c for c in lowered if name.lower() in c][:n]
    return [lowered[c] for c in close]


def suggest(name: str, choices: Iterable[str], n: int = 3, preferred: Iterable[str] = ()) -> str:
    """A ``" Did you mean: a, b?"`` suffix listing the closest of ``choices`` to ``name`` (or ``""``).

    Close names among ``preferred`` (e.g. the models available offline) are listed first, so they are never
    crowded out, then the other close choices; at most ``n`` in all.
    """
    first = close_names(name, preferred, n)
    rest = [c for c in close_names(name, choices, n) if c not in first]
    close = first + rest[: max(n - len(first), 0)]
    return f" Did you mean: {', '.join(close)}?" if close else ""
