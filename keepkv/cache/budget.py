"""KV budgets: what ``kv_budget`` means, in entries per KV head.

``kv_budget`` is either a fraction of the prompt in ``(0, 1]`` (``0.1`` keeps 10% of the prompt's entries,
rounded up) or an integer ``>= 1``: an absolute number of entries per KV head. ``1.0`` (the whole prompt) is the
full cache: nothing is ever compressed. A method never keeps fewer entries than it protects (attention sinks +
recent window + the newest token); a budget below that is an error naming the minimum.

Limits, checked before any cache is allocated (:func:`entries_for_budget`):

- an integer budget above the model's context (``max_position_embeddings``) is refused with a
  :class:`~keepkv.errors.KeepKVError`: no prompt plus its new tokens can ever fill it, so it is a mistake (a
  fraction meant as a percentage, a byte count), not a request;
- any budget is capped at ``prompt + max_new_tokens`` entries, all a generation can ever hold (never below the
  protected entries): a budget at least as long as the prompt compresses nothing at prefill and gets buffers no
  larger than the full cache's, and is still a valid compressed run if decoding grows past it.

A batch shares one budget, computed from its longest prompt (the padded width): with a fraction ``f`` every row may
keep ``ceil(f * longest)`` entries, more than ``ceil(f * its own length)`` for the shorter rows (the cache manager
records each row's own budget as ``row_budgets``).
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


def entries_for_budget(kv_budget: float | int, prompt_tokens: int, protected: int, *, max_new_tokens: int = 0,
                       max_context: int | None = None) -> int:
    """Entries per KV head for a prompt of ``prompt_tokens``: ``ceil(f * prompt)`` or the integer itself, capped at
    ``max(protected, prompt_tokens + max_new_tokens)`` (module docstring).

    Raises :class:`~keepkv.errors.KeepKVError` if the asked budget is fewer than ``protected`` (sinks + recent
    window + 1), naming the minimum, or if an integer budget exceeds ``max_context`` (the model's context).
    """
    if max_context is not None and not isinstance(kv_budget, float) and int(kv_budget) > max_context:
        raise KeepKVError(
            f"kv_budget={kv_budget} entries per head is more than the model's context of {max_context} tokens: "
            f"an absolute budget is an integer between the method's protected entries and {max_context} "
            "(a fraction in (0, 1] keeps that share of the prompt)"
        )
    entries = math.ceil(kv_budget * prompt_tokens) if isinstance(kv_budget, float) else int(kv_budget)
    if entries < protected:
        what = f"{kv_budget:g} of a {prompt_tokens}-token prompt = {entries}" if isinstance(kv_budget, float) \
            else f"{entries}"
        raise KeepKVError(
            f"kv_budget {what} entries per head is below this method's {protected} protected entries "
            f"(attention sinks + recent window + newest token): ask for at least {protected} entries"
        )
    return min(entries, max(protected, prompt_tokens + max_new_tokens))
