"""KV budgets: what ``kv_budget`` means, in entries per KV head.

``kv_budget`` is either a fraction of the prompt in ``(0, 1]`` (``0.1`` keeps 10% of the prompt's entries,
rounded up) or an integer ``>= 1``: an absolute number of entries per KV head. ``1.0`` (the whole prompt) is the
full cache: nothing is ever compressed. A method never keeps fewer entries than it protects (attention sinks +
recent window + the newest token); a budget below that is an error naming the minimum.
"""

from __future__ import annotations

import math

from keepkv.errors import KeepKVError


def validate_budget(kv_budget: float | int | None) -> float | int | None:
    """Check the *form* of a budget (before any prompt is seen); returns it unchanged."""
    if kv_budget is None:
        return None
    if isinstance(kv_budget, bool) or not isinstance(kv_budget, (int, float)):
        raise KeepKVError(f"kv_budget must be a fraction in (0, 1] or an integer >= 1, got {kv_budget!r}")
    if isinstance(kv_budget, float) and not (0.0 < kv_budget <= 1.0):
        raise KeepKVError(
            f"kv_budget={kv_budget} is not allowed: a fraction must lie in (0, 1] (0.1 keeps 10% of the prompt); "
            "for an absolute size pass an integer >= 1"
        )
    if isinstance(kv_budget, int) and kv_budget < 1:
        raise KeepKVError(f"kv_budget={kv_budget} is not allowed: an absolute budget is an integer >= 1")
    return kv_budget


def is_full_budget(kv_budget: float | int | None) -> bool:
    """``None`` and the fraction ``1.0`` keep every entry."""
    return kv_budget is None or (isinstance(kv_budget, float) and kv_budget == 1.0)


def entries_for_budget(kv_budget: float | int, prompt_tokens: int, protected: int) -> int:
    """Entries per KV head for a prompt of ``prompt_tokens``: ``ceil(f * prompt)`` or the integer itself.

    Raises if that is fewer than ``protected`` (sinks + recent window + 1), naming the minimum.
    """
    entries = math.ceil(kv_budget * prompt_tokens) if isinstance(kv_budget, float) else int(kv_budget)
    if entries < protected:
        what = f"{kv_budget:g} of a {prompt_tokens}-token prompt = {entries}" if isinstance(kv_budget, float) \
            else f"{entries}"
        raise KeepKVError(
            f"kv_budget {what} entries per head is below this method's {protected} protected entries "
            f"(attention sinks + recent window + newest token): ask for at least {protected} entries"
        )
    return entries
