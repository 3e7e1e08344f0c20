"""The prior-quality metrics on small cases computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from autopeft.search.prior_quality import ndcg_at_k, partial_spearman, quality, spearman, top_k_recall, with_ci


def test_top_k_recall_by_hand():
    truth = [5.0, 4.0, 3.0, 2.0, 1.0]
    assert top_k_recall([9, 8, 7, 0, 0], truth, 3) == 1.0
    assert top_k_recall([0, 0, 7, 8, 9], truth, 2) == 0.0
    assert top_k_recall([9, 0, 0, 8, 0], truth, 2) == 0.5  # plan 0 found, plan 1 missed
    with pytest.raises(ValueError, match="`k`"):
        top_k_recall(truth, truth, 6)


def test_ndcg_by_hand():
    # relevance = truth - min = [0, 2, 1]; prior's top 2 = plans 0, 1: DCG = 0 + 2 / log2(3);
    # ideal = 2 + 1 / log2(3).
    assert ndcg_at_k([3, 2, 1], [0, 2, 1], 2) == pytest.approx((2 / math.log2(3)) / (2 + 1 / math.log2(3)))
    assert ndcg_at_k([1, 3, 2], [0, 2, 1], 3) == pytest.approx(1.0)
    assert ndcg_at_k([1, 2, 3], [4, 4, 4], 2) == 1.0


def test_spearman_and_its_partial_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    # Ranks: prior (1,2,3,4,5), truth (2,1,4,3,5), size (1,3,2,5,4). Spearman r = 1 - 6 sum d^2 / (n(n^2-1)):
    # r_pt = 1 - 6*4/120 = 0.8, r_ps = 0.8, r_ts = 1 - 6*14/120 = 0.3.
    prior, truth, size = [1, 2, 3, 4, 5], [2, 1, 4, 3, 5], [1, 3, 2, 5, 4]
    assert spearman(prior, truth) == pytest.approx(0.8) and spearman(truth, size) == pytest.approx(0.3)
    expected = (0.8 - 0.8 * 0.3) / math.sqrt((1 - 0.64) * (1 - 0.09))
    assert partial_spearman(prior, truth, size) == pytest.approx(expected)
    # A prior that is the size itself knows nothing beyond it: undefined partial (r_ps = 1).
    assert math.isnan(partial_spearman(size, truth, size))


def test_bootstrap_intervals_cover_the_value_and_are_seeded():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=40)
    prior = truth + rng.normal(scale=0.5, size=40)
    estimate = with_ci(spearman, prior, truth, n_resamples=500, seed=1)
    assert estimate.low < estimate.value < estimate.high and estimate.method == "BCa"
    assert with_ci(spearman, prior, truth, n_resamples=500, seed=1) == estimate
    noise = with_ci(spearman, rng.normal(size=40), truth, n_resamples=500, seed=1)
    assert noise.high > 0 > noise.low or abs(noise.value) < 0.4
    table = quality(prior, truth, rng.integers(1, 1000, size=40), k=5, n_resamples=300)
    assert set(table) == {"top_k_recall", "ndcg_at_k", "spearman", "partial_spearman"}
    assert all(e.low <= e.value <= e.high for e in table.values())
