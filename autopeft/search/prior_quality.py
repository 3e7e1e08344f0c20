"""How well a prior ranks plans: top-k recall, NDCG@k, Spearman, Spearman partialled on size.

Pure functions of three aligned sequences over the same plans: ``prior`` (a signal's scores),
``truth`` (what the plans achieved, e.g. validation PSNR gain over No-FT) and, for the partial
correlation, ``size`` (the plans' trainable parameter counts). Each metric comes as a point value
and, through :func:`with_ci`, a bootstrap 95% CI over plans (``scipy.stats.bootstrap``, plans
resampled with their three values together; BCa, or the percentile interval where BCa cannot be
computed, e.g. a statistic constant on every jackknife sample).

Ties: ``top_k_recall`` and ``ndcg_at_k`` order plans by decreasing score, ties in input order
(a stable sort); the rank correlations give tied values their mean rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import spearmanr

from autopeft.stats import bootstrap_ci

__all__ = ["Estimate", "top_k_recall", "ndcg_at_k", "spearman", "partial_spearman", "with_ci", "quality"]


def _arrays(*columns: Sequence[float]) -> list[np.ndarray]:
    arrays = [np.asarray(c, dtype=float) for c in columns]
    if len({len(a) for a in arrays}) != 1:
        raise ValueError(f"the sequences must have one value per plan each, but got lengths {[len(a) for a in arrays]}.")
    if any(np.isnan(a).any() for a in arrays):
        raise ValueError("the sequences must not contain NaN.")
    return arrays


def _top(values: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-values, kind="stable")[:k]


def top_k_recall(prior: Sequence[float], truth: Sequence[float], k: int) -> float:
    """The share of the ``k`` truly best plans that are among the prior's ``k`` best.

    >>> top_k_recall([4, 3, 2, 1], [1, 4, 3, 2], 2)
    0.5
    """
    prior_a, truth_a = _arrays(prior, truth)
    if not 1 <= k <= len(prior_a):
        raise ValueError(f"`k` must be between 1 and the {len(prior_a)} plans, but got {k}.")
    return len(set(_top(prior_a, k)) & set(_top(truth_a, k))) / k


def ndcg_at_k(prior: Sequence[float], truth: Sequence[float], k: int) -> float:
    """Normalised discounted cumulative gain of the prior's ``k`` best plans.

    Relevance of a plan is ``truth - min(truth)`` (the worst plan 0: gains over No-FT can be
    negative), discounted by ``log2(position + 1)`` from position 1; 1 when the prior's top ``k``
    are the truly best in order. All plans equal: 1 (every order is ideal).

    >>> round(ndcg_at_k([3, 2, 1], [0, 2, 1], 2), 4)
    0.4796
    """
    prior_a, truth_a = _arrays(prior, truth)
    if not 1 <= k <= len(prior_a):
        raise ValueError(f"`k` must be between 1 and the {len(prior_a)} plans, but got {k}.")
    relevance = truth_a - truth_a.min()
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = float((np.sort(relevance)[::-1][:k] * discount).sum())
    if ideal == 0:
        return 1.0
    return float((relevance[_top(prior_a, k)] * discount).sum()) / ideal


def spearman(prior: Sequence[float], truth: Sequence[float]) -> float:
    """Spearman's rank correlation (NaN when either is constant)."""
    prior_a, truth_a = _arrays(prior, truth)
    if np.ptp(prior_a) == 0 or np.ptp(truth_a) == 0:
        return float("nan")
    return float(spearmanr(prior_a, truth_a).statistic)


def partial_spearman(prior: Sequence[float], truth: Sequence[float], size: Sequence[float]) -> float:
    """Spearman correlation of prior and truth with the plans' size partialled out: the partial
    correlation formula on rank correlations,
    ``(r_pt - r_ps r_ts) / sqrt((1 - r_ps^2)(1 - r_ts^2))`` (size may be the count or its log: a
    rank is the same). What a prior knows beyond "bigger plans do better". NaN when undefined."""
    prior_a, truth_a, size_a = _arrays(prior, truth, size)
    r_pt, r_ps, r_ts = spearman(prior_a, truth_a), spearman(prior_a, size_a), spearman(truth_a, size_a)
    if math.isnan(r_pt + r_ps + r_ts) or max(abs(r_ps), abs(r_ts)) > 1 - 1e-9:
        return float("nan")  # a rank perfectly tied to size leaves nothing to partial (round-off kept out)
    return (r_pt - r_ps * r_ts) / math.sqrt((1 - r_ps**2) * (1 - r_ts**2))


@dataclass(frozen=True)
class Estimate:
    """A metric's value on all plans and its bootstrap 95% CI (``method``: ``BCa`` or ``percentile``)."""

    value: float
    low: float
    high: float
    method: str


def with_ci(statistic: Callable[..., float], *columns: Sequence[float], n_resamples: int = 2000,
            seed: int = 0) -> Estimate:
    """``statistic(*columns)`` and its bootstrap 95% CI over plans (rows resampled together).

    Args:
        statistic: a metric of this module with its fixed arguments bound (``k``).
        columns: aligned per-plan sequences (prior, truth[, size]).
        n_resamples: bootstrap resamples. Defaults to 2000.
        seed: seeds the resampling. Defaults to 0.
    """
    arrays = _arrays(*columns)
    value = float(statistic(*arrays))
    low, high, method = bootstrap_ci(statistic, *arrays, n_resamples=n_resamples, seed=seed)
    return Estimate(value, low, high, method)


def quality(prior: Sequence[float], truth: Sequence[float], size: Sequence[float], *, k: int = 10,
            n_resamples: int = 2000, seed: int = 0) -> dict[str, Estimate]:
    """Every metric with its CI: ``top_k_recall``, ``ndcg_at_k``, ``spearman``, ``partial_spearman``."""
    return {
        "top_k_recall": with_ci(lambda p, t: top_k_recall(p, t, k), prior, truth, n_resamples=n_resamples, seed=seed),
        "ndcg_at_k": with_ci(lambda p, t: ndcg_at_k(p, t, k), prior, truth, n_resamples=n_resamples, seed=seed),
        "spearman": with_ci(spearman, prior, truth, n_resamples=n_resamples, seed=seed),
        "partial_spearman": with_ci(partial_spearman, prior, truth, size, n_resamples=n_resamples, seed=seed),
    }
