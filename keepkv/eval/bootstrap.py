"""Seeded percentile-bootstrap intervals: one implementation behind every interval of the reports.

A resample draws, within each stratum (a task family; one stratum for a plain mean), as many values as the
stratum holds, with replacement; the statistic of each of :data:`RESAMPLES` resamples is computed and the
interval is the ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles of those statistics (Efron's percentile
interval). Seeded, so a report regenerated from the same rows prints the same intervals.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

RESAMPLES = 2000
Value = TypeVar("Value")


def stratified_interval(strata: Mapping[str, Sequence[Value]],
                        statistic: Callable[[dict[str, list[Value]]], float | None],
                        level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """The percentile interval of ``statistic`` over resamples drawn within each stratum. ``statistic`` returns
    ``None`` for a resample it cannot evaluate (a ratio whose denominator is 0): such resamples are dropped."""
    rng = random.Random(seed)
    values = []
    for _ in range(RESAMPLES):
        value = statistic({name: rng.choices(members, k=len(members)) for name, members in strata.items()})
        if value is not None:
            values.append(value)
    if not values:
        return float("nan"), float("nan")
    values.sort()
    tail = (1 - level) / 2
    return values[int(tail * (len(values) - 1))], values[int((1 - tail) * (len(values) - 1))]


def mean_interval(values: Sequence[float], level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """The interval of the mean of ``values``; ``(v, v)`` for a single value, NaNs for none."""
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    count = len(values)
    return stratified_interval({"": values}, lambda s: sum(s[""]) / count, level, seed)
