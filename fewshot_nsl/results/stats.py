"""Accuracy summaries over evaluation episodes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Sequence


@dataclass(frozen=True)
class Summary:
    mean: float
    ci95: float
    episodes: int

    def __str__(self) -> str:
        return f"acc {100 * self.mean:.2f} ± {100 * self.ci95:.2f} (95% CI, {self.episodes} episodes)"


def confidence_interval(accuracies: Sequence[float]) -> Summary:
    """Mean and 95% CI half-width, 1.96·s/√n, s the sample standard deviation (n−1).

    This is the normal-approximation interval every few-shot paper reports;
    with hundreds of episodes it equals the t-interval to three digits.
    """
    n = len(accuracies)
    if n == 0:
        raise ValueError("no episodes to summarise")
    mean = sum(accuracies) / n
    if n == 1:
        return Summary(mean, float("nan"), 1)
    variance = sum((a - mean) ** 2 for a in accuracies) / (n - 1)
    return Summary(mean, 1.96 * math.sqrt(variance) / math.sqrt(n), n)
