"""Argument checks shared by keepkv's entry points (``load``, ``generate``, the config readers, the CLI).

Each check raises :class:`~keepkv.errors.KeepKVError` (or the subclass passed as ``error``) whose message names the
argument, shows what it got (value and type) and says what is allowed; on success it returns the value in its
canonical Python type. Checks are cheap and run once per call, before any heavy work.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from keepkv.errors import KeepKVError

MAX_SHOWN_CHARS = 60


def shown(value: Any) -> str:
    """``repr(value)`` cut to :data:`MAX_SHOWN_CHARS` characters, with its type: ``"'5' (str)"``."""
    text = repr(value)
    if len(text) > MAX_SHOWN_CHARS:
        text = text[: MAX_SHOWN_CHARS - 3] + "..."
    return f"{text} ({type(value).__name__})"


def is_integer(value: Any) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A real number (int or float, Python or numpy), not a bool; may still be NaN or infinite."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _number_text(value: float) -> str:
    """``0.5``, ``4096``, ``2**64 - 1`` (an integer one below a large power of two)."""
    if isinstance(value, int):
        if value >= 1 << 16 and (value + 1) & value == 0:
            return f"2**{(value + 1).bit_length() - 1} - 1"
        return str(value)
    return f"{value:g}"


def _bound_text(low: float | None, high: float | None, low_inclusive: bool, high_inclusive: bool) -> str:
    """``">= 1"``, ``"> 0"``, ``"<= 8"``, ``"in (0, 1]"`` or ``""``."""
    if low is not None and high is not None:
        opening, closing = "[" if low_inclusive else "(", "]" if high_inclusive else ")"
        return f"in {opening}{_number_text(low)}, {_number_text(high)}{closing}"
    if low is not None:
        return f"{'>=' if low_inclusive else '>'} {_number_text(low)}"
    if high is not None:
        return f"{'<=' if high_inclusive else '<'} {_number_text(high)}"
    return ""


def _within(value: float, low: float | None, high: float | None, low_inclusive: bool, high_inclusive: bool) -> bool:
    above = low is None or (value >= low if low_inclusive else value > low)
    below = high is None or (value <= high if high_inclusive else value < high)
    return above and below


def require_int(
    value: Any, name: str, low: int | None = None, high: int | None = None, *, allow_none: bool = False,
    error: type[KeepKVError] = KeepKVError,
) -> int | None:
    """``value`` as an ``int`` in ``[low, high]`` (either bound optional); ``None`` passes when ``allow_none``.

    Floats (even ``2.0``), strings and bools are refused: an integer argument takes an integer.
    """
    if value is None and allow_none:
        return None
    if is_integer(value) and _within(value, low, high, True, True):
        return int(value)
    allowed = " ".join(part for part in ("an integer", _bound_text(low, high, True, True)) if part)
    raise error(f"{name} must be {'None or ' if allow_none else ''}{allowed}, got {shown(value)}")


def require_real(
    value: Any, name: str, low: float | None = None, high: float | None = None, *, low_inclusive: bool = True,
    high_inclusive: bool = True, allow_none: bool = False, error: type[KeepKVError] = KeepKVError,
) -> float | None:
    """``value`` as a finite ``float`` within the given bounds; ints are accepted, bools, strings, NaN and
    infinities are not. ``None`` passes when ``allow_none``."""
    if value is None and allow_none:
        return None
    if is_real(value) and math.isfinite(value) and _within(value, low, high, low_inclusive, high_inclusive):
        return float(value)
    bounds = _bound_text(low, high, low_inclusive, high_inclusive)
    allowed = " ".join(part for part in ("a finite number", bounds) if part)
    raise error(f"{name} must be {'None or ' if allow_none else ''}{allowed}, got {shown(value)}")


def require_bool(
    value: Any, name: str, *, allow_none: bool = False, error: type[KeepKVError] = KeepKVError
) -> bool | None:
    """``value`` if it is ``True`` or ``False`` (or ``None`` when ``allow_none``)."""
    if isinstance(value, bool) or (value is None and allow_none):
        return value
    raise error(f"{name} must be {'None, ' if allow_none else ''}True or False, got {shown(value)}")


def require_str(
    value: Any, name: str, *, allow_none: bool = False, error: type[KeepKVError] = KeepKVError
) -> str | None:
    """``value`` if it is a ``str`` (or ``None`` when ``allow_none``)."""
    if isinstance(value, str) or (value is None and allow_none):
        return value
    raise error(f"{name} must be {'None or ' if allow_none else ''}a str, got {shown(value)}")


def require_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of the strings ``choices``."""
    if isinstance(value, str) and value in choices:
        return value
    raise KeepKVError(f"{name} must be one of {', '.join(map(repr, choices))}, got {shown(value)}")


def require_text(value: Any, name: str) -> str:
    """``value`` if it is a ``str`` that is valid Unicode (encodable as UTF-8: no lone surrogates, which is what
    undecodable bytes in a file, a terminal or ``sys.argv`` turn into)."""
    if isinstance(value, bytes):
        raise KeepKVError(f"{name} must be a str, got bytes: decode it first (e.g. data.decode('utf-8'))")
    require_str(value, name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise KeepKVError(
            f"{name} is not valid Unicode text: it holds the lone surrogate {value[err.start]!r} at character "
            f"{err.start} (undecodable bytes, e.g. from a file or terminal that is not UTF-8); pass UTF-8 text"
        ) from None
    return value
