"""Helpers shared by the task generators."""

from __future__ import annotations

import math
import random


def length_with_median(rng: random.Random, lo: int, median: int, hi: int, log: bool = False) -> int:
    """An integer in [lo, hi] whose median is `median`: half the draws fall in [lo, median], half in [median, hi],
    uniformly (or log-uniformly, for long-tailed lengths) within each half. The real items' length ranges and medians
    are what the issue measured, so this matches both without assuming more about the shape."""
    if not lo <= median <= hi:
        raise ValueError(f"length range needs min <= median <= max, got {lo}, {median}, {hi}")
    a, b = (lo, median) if rng.random() < 0.5 else (median, hi)
    if not log:
        return rng.randint(a, b)
    return min(b, int(math.exp(rng.uniform(math.log(a), math.log(b + 1)))))
