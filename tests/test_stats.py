"""autopeft.stats against answers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from autopeft.stats import bootstrap_ci, grid_mean_ci, mean_ci, paired_difference, paired_grid_difference


def test_mean_ci_of_a_constant_is_the_constant_and_of_one_value_undefined():
    assert mean_ci([2.0, 2.0, 2.0]) == {"mean": 2.0, "ci": [2.0, 2.0], "n": 3, "method": "constant"}
    single = mean_ci([5.0])
    assert single["mean"] == 5.0 and all(math.isnan(v) for v in single["ci"])


def test_mean_ci_of_a_symmetric_sample_is_the_normal_interval():
    # 16 values evenly spread over [-1, 1]: mean 0, population SD sqrt(mean(x^2)). The bootstrap
    # distribution of the mean is close to normal with SD sd / sqrt(n), so the 95% interval is
    # about 0 +- 1.96 sd / sqrt(n) = +-0.289 (BCa: no skew, no bias to correct).
    x = np.linspace(-1.0, 1.0, 16)
    half = 1.96 * math.sqrt(np.mean(x**2)) / math.sqrt(16)
    out = mean_ci(x)
    assert out["method"] == "BCa" and out["mean"] == pytest.approx(0.0, abs=1e-12)
    assert out["ci"] == [pytest.approx(-half, rel=0.06), pytest.approx(half, rel=0.06)]


def test_bca_moves_the_interval_of_a_right_skewed_sample_up_from_the_percentile_one():
    # 16 log-uniform values (a long right tail): the mean's sampling distribution is right-skewed and
    # the percentile interval under-covers its upper side; BCa's correction shifts both ends up.
    x = np.exp(np.linspace(-3.0, 3.0, 16))
    bca_low, bca_high, method = bootstrap_ci(np.mean, x)
    assert method == "BCa"
    percentile = stats.bootstrap((x,), np.mean, method="percentile", n_resamples=10_000,
                                 rng=np.random.default_rng(0)).confidence_interval
    assert bca_low > percentile.low and bca_high > percentile.high
    assert bca_low < x.mean() < bca_high


def test_mean_ci_of_two_values_spans_them():
    # Resamples of {1, 3} have means 1, 2 or 3 (probabilities 1/4, 1/2, 1/4): both intervals are [1, 3].
    out = mean_ci([1.0, 3.0])
    assert out["mean"] == 2.0 and out["ci"] == [pytest.approx(1.0), pytest.approx(3.0)]


def test_bca_falls_back_to_the_percentile_interval_where_it_is_undefined():
    # BCa's acceleration comes from the leave-one-out (jackknife) values; when they are all equal it
    # is 0/0. The median of ten 0s and six 1s is 0 with any one value left out, while resamples with
    # eight or more 1s have a median of 0.5 or 1: the percentile interval [0, 1] is used.
    low, high, method = bootstrap_ci(np.median, [0.0] * 10 + [1.0] * 6)
    assert method == "percentile" and (low, high) == (0.0, 1.0)


def test_paired_difference_is_the_mean_of_the_differences_with_wilcoxons_p():
    # Differences 1, 2, 3, 4, 5: mean 3; all positive, so the exact two-sided p is 2 / 2^5.
    out = paired_difference([2, 4, 6, 8, 10], [1, 2, 3, 4, 5])
    assert out["mean"] == 3.0 and out["p"] == pytest.approx(2 / 32)
    assert 1.0 <= out["ci"][0] < 3.0 < out["ci"][1] <= 5.0
    assert math.isnan(paired_difference([1, 2], [1, 2])["p"])  # every difference zero
    with pytest.raises(ValueError, match="same shape"):
        paired_difference([1, 2], [1])


def test_grid_ci_with_one_fold_is_the_subjects_bca_interval():
    row = np.linspace(-1.0, 1.0, 16)
    out = grid_mean_ci([row])
    assert out["folds"] == 1 and out["method"] == "BCa" and out["ci"] == mean_ci(row)["ci"]


def test_grid_ci_carries_the_fold_to_fold_variance():
    # Subjects agree within a fold, folds differ by 2 dB: a subject-only bootstrap of the fold means
    # would give a zero-width interval; resampling folds gives means 10, 11 or 12 (1/4, 1/2, 1/4).
    grid = [[10.0] * 8, [12.0] * 8]
    out = grid_mean_ci(grid)
    assert out["mean"] == 11.0 and out["n"] == 8 and out["ci"] == [pytest.approx(10.0), pytest.approx(12.0)]
    assert mean_ci(np.mean(grid, axis=0))["ci"] == [11.0, 11.0]


def test_paired_grid_difference_pairs_cells_and_tests_subject_means():
    reference = np.array([[1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 3.0, 4.0, 5.0, 6.0]])
    better = reference + np.array([1.0, 2.0, 3.0, 4.0, 5.0])  # the same gain in both folds
    out = paired_grid_difference(better, reference)
    assert out["mean"] == 3.0 and out["folds"] == 2 and out["p"] == pytest.approx(2 / 32)
    assert 1.0 <= out["ci"][0] < 3.0 < out["ci"][1] <= 5.0
    with pytest.raises(ValueError, match="same shape"):
        paired_grid_difference(better, reference[:1])
    with pytest.raises(ValueError, match="folds x subjects"):
        grid_mean_ci([1.0, 2.0])
