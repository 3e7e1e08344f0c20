"""Uncertainty for reported figures: means with bootstrap confidence intervals, paired differences
with a Wilcoxon signed-rank test (scipy.stats), over independent units (subjects).

Intervals over one axis of units are scipy's BCa bootstrap (bias-corrected and accelerated), which
covers better than the percentile interval at the sample sizes reported here (about 16 test
subjects); where BCa's acceleration cannot be estimated (ties, a few distinct values) scipy gives
NaN and the percentile interval is used instead, and the result says which (``"method"``).

A unit is one test subject of one target scanner: the same subject scored under several source
models, folds or seeds is one unit (its scores averaged first), since those scores are not
independent of each other.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

__all__ = ["bootstrap_ci", "mean_ci", "paired_difference", "grid_mean_ci", "paired_grid_difference", "format_ci",
           "CI_METHOD", "GRID_CI_METHOD", "TEST_METHOD"]

CONFIDENCE = 0.95
RESAMPLES = 10_000
CI_METHOD = ("95% BCa bootstrap over test subjects (scipy.stats.bootstrap, 10,000 resamples; percentile where "
             "BCa is undefined)")
GRID_CI_METHOD = ("95% percentile bootstrap resampling folds, then test subjects (two-way, 10,000 resamples); "
                  "one fold: " + CI_METHOD.removeprefix("95% "))


def bootstrap_ci(statistic: Callable[..., float], *columns: Sequence[float], n_resamples: int = RESAMPLES,
                 seed: int = 0) -> tuple[float, float, str]:
    """95% bootstrap CI of ``statistic(*columns)``, the rows of ``columns`` resampled together.

    BCa first; the percentile interval where BCa is undefined (scipy then warns and gives NaN).

    Args:
        statistic: a function of the columns (one float per call; not vectorised).
        columns: aligned sequences, one value per unit.
        n_resamples: bootstrap resamples. Defaults to 10,000.
        seed: seeds the resampling. Defaults to 0.

    Returns:
        ``(low, high, method)``, method ``"BCa"`` or ``"percentile"``; ``(nan, nan, "none")`` when
        neither is defined.
    """
    data = tuple(np.asarray(c, dtype=float) for c in columns)
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BCa's "acceleration cannot be estimated": the fallback below
            result = stats.bootstrap(data, statistic, paired=True, vectorized=False, n_resamples=n_resamples,
                                     confidence_level=CONFIDENCE, method=method, rng=np.random.default_rng(seed))
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
        if not (math.isnan(low) or math.isnan(high)):
            return low, high, method
    return math.nan, math.nan, "none"
TEST_METHOD = "two-sided Wilcoxon signed-rank test over test subjects (scipy.stats.wilcoxon)"


def mean_ci(values: Sequence[float], *, seed: int = 0) -> dict[str, Any]:
    """Mean of ``values`` with its 95% bootstrap confidence interval (:func:`bootstrap_ci`: BCa, or
    percentile where BCa is undefined).

    Returns:
        ``{"mean", "ci": [low, high], "n", "method"}``; the interval is ``[nan, nan]`` for fewer than
        two values, and the mean itself when every value is the same (method ``"constant"``).
    """
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        raise ValueError("`values` must hold at least one value, but got none.")
    mean = float(data.mean())
    if data.size < 2:
        return {"mean": mean, "ci": [math.nan, math.nan], "n": int(data.size), "method": "none"}
    if np.all(data == data[0]):
        return {"mean": mean, "ci": [mean, mean], "n": int(data.size), "method": "constant"}
    low, high, method = bootstrap_ci(np.mean, data, seed=seed)
    return {"mean": mean, "ci": [low, high], "n": int(data.size), "method": method}


def paired_difference(values: Sequence[float], reference: Sequence[float], *, seed: int = 0) -> dict[str, Any]:
    """Mean of ``values - reference`` over the same units, its 95% CI and a Wilcoxon p-value.

    Returns:
        ``{"mean", "ci": [low, high], "n", "method", "p"}``; ``p`` is nan for fewer than two units
        or when every difference is zero.
    """
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
    scipy.stats.bootstrap resamples along one axis only, hence this is written here, with the
    percentile interval (BCa's jackknife acceleration has no single axis to leave out here). One
    fold is one axis: :func:`mean_ci` of its subjects (BCa).

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
        return {"mean": mean, "ci": [math.nan, math.nan], "n": subjects, "folds": folds, "method": "none"}
    if folds == 1:
        return {**mean_ci(data[0], seed=seed), "folds": 1}
    rng = np.random.default_rng(seed)
    fold_draws = rng.integers(0, folds, size=(RESAMPLES, folds))
    subject_draws = rng.integers(0, subjects, size=(RESAMPLES, subjects))
    means = data[fold_draws[:, :, None], subject_draws[:, None, :]].mean(axis=(1, 2))
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"mean": mean, "ci": [float(low), float(high)], "n": subjects, "folds": folds, "method": "two-way percentile"}


def paired_grid_difference(grid: Sequence[Sequence[float]] | np.ndarray,
                           reference: Sequence[Sequence[float]] | np.ndarray, *, seed: int = 0) -> dict[str, Any]:
    """Mean of ``grid - reference`` over the same folds and subjects, its two-way bootstrap CI
    (:func:`grid_mean_ci`) and a Wilcoxon p-value over the subjects (each subject's difference
    averaged over the folds first: the test treats subjects as the independent units).

    Returns:
        ``{"mean", "ci": [low, high], "n", "folds", "p"}``; ``p`` is nan for fewer than two
        subjects or when every difference is zero.
    """
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
