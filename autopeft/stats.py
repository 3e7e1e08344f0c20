"""Uncertainty for reported figures: means with bootstrap confidence intervals, paired differences
with a Wilcoxon signed-rank test (scipy.stats), over independent units (subjects).

A unit is one test subject of one target scanner: the same subject scored under several source
models, folds or seeds is one unit (its scores averaged first), since those scores are not
independent of each other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["mean_ci", "paired_difference", "CI_METHOD", "TEST_METHOD"]

CONFIDENCE = 0.95
RESAMPLES = 10_000
CI_METHOD = "95% percentile bootstrap over test subjects (scipy.stats.bootstrap, 10,000 resamples)"
TEST_METHOD = "two-sided Wilcoxon signed-rank test over test subjects (scipy.stats.wilcoxon)"


def mean_ci(values: Sequence[float], *, seed: int = 0) -> dict[str, Any]:
    """Mean of ``values`` with its 95% bootstrap confidence interval.

    Returns:
        ``{"mean", "ci": [low, high], "n"}``; the interval is ``[nan, nan]`` for fewer than two values.
    """
    from scipy import stats

    data = np.asarray(values, dtype=float)
    if data.size == 0:
        raise ValueError("`values` must hold at least one value, but got none.")
    mean = float(data.mean())
    if data.size < 2 or np.all(data == data[0]):
        low = high = mean if data.size >= 2 else math.nan
        return {"mean": mean, "ci": [low, high], "n": int(data.size)}
    result = stats.bootstrap((data,), np.mean, confidence_level=CONFIDENCE, n_resamples=RESAMPLES,
                             method="percentile", rng=np.random.default_rng(seed))
    interval = result.confidence_interval
    return {"mean": mean, "ci": [float(interval.low), float(interval.high)], "n": int(data.size)}


def paired_difference(values: Sequence[float], reference: Sequence[float], *, seed: int = 0) -> dict[str, Any]:
    """Mean of ``values - reference`` over the same units, its 95% CI and a Wilcoxon p-value.

    Returns:
        ``{"mean", "ci": [low, high], "n", "p"}``; ``p`` is nan for fewer than two units or when
        every difference is zero.
    """
    from scipy import stats

    a, b = np.asarray(values, dtype=float), np.asarray(reference, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired values must have the same shape, but got {a.shape} and {b.shape}.")
    diff = a - b
    out = mean_ci(diff, seed=seed)
    p = math.nan
    if diff.size >= 2 and np.any(diff != 0):
        p = float(stats.wilcoxon(diff).pvalue)
    return {**out, "p": p}
