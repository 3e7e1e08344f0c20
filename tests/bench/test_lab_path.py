"""The whole lab path on the tiniest settings: a table, its prior scores, a replay on it."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

import replay
import table


@pytest.mark.slow
def test_table_priors_and_replay_end_to_end(tmp_path, monkeypatch):
    # One sampled plan per space, one rate per Table-1 row, one epoch; source models of 2 epochs.
    monkeypatch.setattr(table, "QUICK", {"plans_per_space": 1, "epochs": 1, "ladders": (1,), "second_seed_plans": 0})
    common = ["--scenario", "cvtgan-1-5", "--out-dir", str(tmp_path), "--pretrain-epochs", "2"]
    meta = table.main([*common, "--quick"])
    frame = pd.read_csv(tmp_path / "cvtgan-1-5.csv.gz", dtype={"source": str, "target": str})
    pairs = {("1", "5"), ("5", "1")}
    assert set(zip(frame["source"], frame["target"])) == pairs
    assert len(frame) == 2 * meta["counts"]["plans"] == meta["counts"]["rows"]
    assert frame.groupby("plan_id").size().eq(2).all()
    assert (frame.loc[frame["kind"] == "no-ft", ["val_gain", "test_gain"]] == 0).all().all()
    assert frame["val_e1"].equals(frame["val_psnr"])  # one epoch: the curve is the final score
    # Run again: everything is read back from the work folder, nothing trains.
    again = table.main([*common, "--quick"])
    assert again["cost"] == meta["cost"]

    priors = table.main([*common, "--priors"])
    scores = pd.read_csv(tmp_path / "cvtgan-1-5-priors.csv.gz")
    assert set(priors["signals"]) <= set(scores.columns)
    assert set(scores["pair"]) == {"1->5", "5->1", "all"}
    assert all(c["pair_epochs"] == 2 for c in priors["cost"].values())

    out = tmp_path / "replay.json"
    variants = "no-priors,random,sensitivity,oracle,inverted-sensitivity,permuted-sensitivity"
    result = replay.main(["--scenario", "cvtgan-1-5", "--tables", str(tmp_path), "--seeds", "2", "--workers", "2",
                          "--variants", variants, "--out", str(out), "--work", str(tmp_path / "replay-work")])
    data = json.loads(out.read_text(encoding="utf-8"))
    assert set(data["variants"]) == set(variants.split(","))
    assert data["horizon_pair_epochs"] == 24 * 2 * 1
    for name, runs in result["runs"].items():
        assert [r["seed"] for r in sorted(runs, key=lambda r: r["seed"])] == [0, 1]
        for r in runs:
            assert math.isfinite(r["area_val"]) and math.isfinite(r["final_test"]) and r["trials"] > 0
            assert r["prior_cost"] == (2.0 if name != "oracle" and name not in ("no-priors", "random") else 0.0)
    assert "vs_no-priors" in data["variants"]["random"]
    # Run again: every run is read back from the work folder, the same figures.
    again = replay.main(["--scenario", "cvtgan-1-5", "--tables", str(tmp_path), "--seeds", "2", "--workers", "2",
                         "--variants", variants, "--out", str(out), "--work", str(tmp_path / "replay-work")])
    assert again["runs"] == result["runs"]
