"""The bundle's confirmed test PSNR, read from a run's confirmation files (no model, no training)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from autopeft.bundle import _confirmed_psnr
from autopeft.stats import mean_ci


def _confirmed_run(root, number: int):
    """summary.json and confirmation.csv as a confirmation leaves them: trial ``number`` recommended
    (best by validation), another trial and No-FT confirmed too; two pairs into scanner 2 and one
    into 3, 2 folds x 2 seeds, 3 test subjects per target."""
    rows = []
    for label, trial, base in ((f"#{number}", number, 30.0), ("#4", 4, 20.0), ("No-FT", None, 10.0)):
        for source, target, shift in (("1", "2", 0.0), ("3", "2", 5.0), ("1", "3", 9.0)):
            for fold in (0, 1):
                for seed in (0, 1):
                    for index in range(3):
                        psnr = base + shift + index + 0.1 * fold + 0.01 * seed
                        rows.append({"label": label, "number": trial, "source": source, "target": target, "fold": fold,
                                     "seed": seed, "subject": f"sub-{target}{index:02d}", "psnr": psnr, "ssim": 0.9,
                                     "nrmse": 0.1})
    frame = pd.DataFrame(rows)
    frame.to_csv(root / "confirmation.csv", index=False)
    plan_mean = frame[frame["number"] == number].groupby(["target", "subject"])["psnr"].mean().mean()
    recommended = {"label": f"#{number}", "number": number, "test": {"psnr": {"mean": plan_mean}}}
    (root / "summary.json").write_text(json.dumps({"confirmation": {"recommended": recommended}}))
    return frame


def test_the_bundle_gets_its_own_pairs_test_psnr_not_the_plans_mean_over_pairs(tmp_path):
    frame = _confirmed_run(tmp_path, 7)
    psnr = _confirmed_psnr(tmp_path, 7, "3", "2")
    rows = frame[(frame["number"] == 7) & (frame["source"] == "3") & (frame["target"] == "2")]
    expected = mean_ci(rows.groupby("subject")["psnr"].mean().to_numpy())  # a subject: its folds x seeds averaged
    assert psnr["mean"] == pytest.approx(expected["mean"]) == pytest.approx(36.055)
    assert psnr["ci"] == pytest.approx(expected["ci"]) and psnr["subjects"] == 3
    assert (psnr["split"], psnr["source"], psnr["target"], psnr["trial"]) == ("test", "3", "2", 7)
    assert psnr["folds"] == [0, 1] and psnr["seeds"] == [0, 1]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert psnr["mean"] != pytest.approx(summary["confirmation"]["recommended"]["test"]["psnr"]["mean"])
    assert _confirmed_psnr(tmp_path, 7, "1", "2")["mean"] == pytest.approx(31.055)


def test_no_figure_for_a_trial_or_pair_the_run_did_not_confirm(tmp_path):
    assert _confirmed_psnr(tmp_path, 7, "1", "2") is None  # no confirmation at all
    _confirmed_run(tmp_path, 7)
    assert _confirmed_psnr(tmp_path, 4, "1", "2") is None  # confirmed, but not the recommended plan
    assert _confirmed_psnr(tmp_path, None, "1", "2") is None
    assert _confirmed_psnr(tmp_path, 7, "2", "1") is None  # no such pair
