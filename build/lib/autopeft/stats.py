"""Uncertainty for reported figures: means with bootstrap confidence intervals, paired differences
with a Wilcoxon signed-rank test (scipy.stats), over independent units (subjects).

A unit is one test subject of one target scanner: the same subject scored under several source
models, folds or seeds is one unit (its scores averaged first), since those scores are not
independent of each other.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["mean_ci", "paired_difference", "grid_mean_ci", "paired_grid_difference", "format_ci", "CI_METHOD",
           "GRID_CI_METHOD", "TEST_METHOD"]

CONFIDENCE = 0.95
RESAMPLES = 10_000
CI_METHOD = "95% percentile bootstrap over test subjects (scipy.stats.bootstrap, 10,000 resamples)"
GRID_CI_METHOD = ("95% percentile bootstrap resampling folds, then test subjects (two-way, 10,000 resamples; "
                  "one fold: over subjects only)")
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


def grid_mean_ci(grid: Sequence[Sequence[float]] | np.ndarray, *, seed: int = 0) -> dict[str, Any]:
    """Mean of a folds x subjects grid with a 95% CI that carries both sources of variance.

    The test subjects are the same in every fold (crossed, not nested), and a fold changes the
    training subjects and the source model, so scores vary from fold to fold as well as from
    subject to subject. Each resample draws the folds with replacement, then the subjects with
    replacement, and takes the mean of that sub-grid (the two-way bootstrap of crossed designs).
    scipy.stats.bootstrap resamples along one axis only, hence this is written here.

    Args:
        grid: ``F x S`` scores, one row per fold, one column per test subject (same order).
        seed: seeds the resampling. Defaults to 0.

    Returns:
        ``{"mean", "ci": [low, high], "n" (subjects), "folds"}``; the interval is ``[nan, nan]``
        with fewer than two subjects.
    """
    data = np.asarray(grid, dtype=float)
    if data.ndim != 2 or data.size == 0:
        raise ValueError(f"`grid` must be a non-empty folds x subjects array, but got shape {data.shape}.")
    folds, subjects = data.shape
    mean = float(data.mean())
    if subjects < 2:
        return {"mean": mean, "ci": [math.nan, math.nan], "n": subjects, "folds": folds}
    rng = np.random.default_rng(seed)
    fold_draws = rng.integers(0, folds, size=(RESAMPLES, folds))
    subject_draws = rng.integers(0, subjects, size=(RESAMPLES, subjects))
    means = data[fold_draws[:, :, None], subject_draws[:, None, :]].mean(axis=(1, 2))
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"mean": mean, "ci": [float(low), float(high)], "n": subjects, "folds": folds}


def paired_grid_difference(grid: Sequence[Sequence[float]] | np.ndarray,
                           reference: Sequence[Sequence[float]] | np.ndarray, *, seed: int = 0) -> dict[str, Any]:
    """Mean of ``grid - reference`` over the same folds and subjects, its two-way bootstrap CI
    (:func:`grid_mean_ci`) and a Wilcoxon p-value over the subjects (each subject's difference
    averaged over the folds first: the test treats subjects as the independent units).

    Returns:
        ``{"mean", "ci": [low, high], "n", "folds", "p"}``; ``p`` is nan for fewer than two
        subjects or when every difference is zero.
    """
    from scipy import stats

    a, b = np.asarray(grid, dtype=float), np.asarray(reference, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired grids must have the same shape, but got {a.shape} and {b.shape}.")
    diff = a - b
    out = grid_mean_ci(diff, seed=seed)
    per_subject = diff.mean(axis=0)
    p = math.nan
    if per_subject.size >= 2 and np.any(per_subject != 0):
        p = float(stats.wilcoxon(per_subject).pvalue)
    return {**out, "p": p}


def format_ci(stat: Mapping[str, Any] | None, digits: int = 3) -> str:
    """``35.123 [34.900, 35.310]``: the mean and its confidence interval (the mean alone when the
    interval is undefined)."""
    if not stat:
        return "-"
    low, high = stat["ci"]
    if any(math.isnan(v) for v in (low, high)):
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
