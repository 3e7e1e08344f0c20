"""autopeft.stats against answers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from autopeft.stats import grid_mean_ci, mean_ci, paired_difference, paired_grid_difference


def test_mean_ci_of_a_constant_is_the_constant_and_of_one_value_undefined():
    assert mean_ci([2.0, 2.0, 2.0]) == {"mean": 2.0, "ci": [2.0, 2.0], "n": 3}
    single = mean_ci([5.0])
    assert single["mean"] == 5.0 and all(math.isnan(v) for v in single["ci"])


def test_mean_ci_of_two_values_lies_between_them():
    # Resamples of {1, 3} have means 1, 2 or 3 (probabilities 1/4, 1/2, 1/4): a 95% percentile
    # interval is [1, 3].
    out = mean_ci([1.0, 3.0])
    assert out["mean"] == 2.0 and out["ci"] == [pytest.approx(1.0), pytest.approx(3.0)]


def test_paired_difference_is_the_mean_of_the_differences_with_wilcoxons_p():
    # Differences 1, 2, 3, 4, 5: mean 3; all positive, so the exact two-sided p is 2 / 2^5.
    out = paired_difference([2, 4, 6, 8, 10], [1, 2, 3, 4, 5])
    assert out["mean"] == 3.0 and out["p"] == pytest.approx(2 / 32)
    assert 1.0 <= out["ci"][0] < 3.0 < out["ci"][1] <= 5.0
    assert math.isnan(paired_difference([1, 2], [1, 2])["p"])  # every difference zero
    with pytest.raises(ValueError, match="same shape"):
        paired_difference([1, 2], [1])


def test_grid_ci_with_one_fold_resamples_subjects_only():
    # One fold of {1, 3}: as for mean_ci, the interval is [1, 3].
    out = grid_mean_ci([[1.0, 3.0]])
    assert out["mean"] == 2.0 and out["folds"] == 1 and out["ci"] == [pytest.approx(1.0), pytest.approx(3.0)]


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
