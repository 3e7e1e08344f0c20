"""The whole lab path on the tiniest settings: a table, the cheap signals' prior scores (gradient
and audit are measured in tests/search/test_prior_signals.py), a replay on it with the fading betas
and the controls."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

import replay
import table


@pytest.mark.slow
def test_table_priors_and_replay_end_to_end(tmp_path, monkeypatch):
    # One sampled plan per space, one rate per Table-1 row, one epoch; source models of 2 epochs;
    # --quick's small data set and splits.
    monkeypatch.setattr(table, "QUICK", {**table.QUICK, "plans_per_space": 1, "epochs": 1, "ladders": (1,),
                                         "second_seed_plans": 0})
    common = ["--scenario", "cvtgan-1-5", "--out-dir", str(tmp_path), "--pretrain-epochs", "2"]
    meta = table.main([*common, "--quick"])
    frame = pd.read_csv(tmp_path / "cvtgan-1-5.csv.gz", dtype={"source": str, "target": str})
    pairs = {("1", "5"), ("5", "1")}
    assert set(zip(frame["source"], frame["target"])) == pairs
    assert len(frame) == 2 * meta["counts"]["plans"] == meta["counts"]["rows"]
    assert frame.groupby("plan_id").size().eq(2).all()
    assert (frame.loc[frame["kind"] == "no-ft", ["val_gain", "test_gain"]] == 0).all().all()
    assert frame["val_e1"].equals(frame["val_psnr"])  # one epoch: the curve is the final score
    assert meta["settings"]["data"] == {"subjects": 4, "size": 32} and meta["settings"]["protocol"]["finetune_test"] == 1
    # Run again: everything is read back from the work folder, nothing trains.
    again = table.main([*common, "--quick"])
    assert again["cost"] == meta["cost"]

    # The cheap signals only: gradient and audit are measured by tests/search/test_prior_signals.py
    # (here they would double this test's time, scoring the 5->1 pair's volumes once per candidate).
    priors = table.main([*common, "--priors", "--signals", "sensitivity,shpeft,count,early"])
    scores = pd.read_csv(tmp_path / "cvtgan-1-5-priors.csv.gz")
    assert priors["signals"] == ["sensitivity", "shpeft", "count", "early"]
    assert scores[priors["signals"]].notna().all().all() and "gradient" not in scores.columns
    assert set(scores["pair"]) == {"1->5", "5->1", "all"}
    # Pair-epochs by hand, 2 pairs at E = 1: the site-mass signals one gradient pass per pair, the
    # baselines nothing.
    expected = {"sensitivity": 2.0, "shpeft": 2.0, "count": 0.0, "early": 0.0}
    assert {s: c["pair_epochs"] for s, c in priors["cost"].items()} == expected
    with pytest.raises(SystemExit, match="--signals: nonsense not among"):
        table.main([*common, "--priors", "--signals", "nonsense"])

    out = tmp_path / "replay.json"
    # A few variants keep CI short: one of each kind (baseline, signal at two betas, oracle, controls).
    variants = "no-priors,sensitivity-bh,count-bh/3,oracle-bh/3,inverted-shpeft,permuted-sensitivity,permuted-count"
    command = ["--scenario", "cvtgan-1-5", "--tables", str(tmp_path), "--seeds", "2", "--workers", "2",
               "--variants", variants, "--out", str(out), "--work", str(tmp_path / "replay-work")]
    result = replay.main(command)
    data = json.loads(out.read_text(encoding="utf-8"))
    # count's prior is a bare log count: nothing to permute, so no permuted variant, and the file says why.
    assert set(data["skipped_variants"]) == {"permuted-count"}
    assert set(data["variants"]) == set(variants.split(",")) - {"permuted-count"}
    assert data["horizon_pair_epochs"] == 24 * 2 * 1
    assert data["table"] == str(tmp_path / "cvtgan-1-5.csv.gz")  # outside the repository: as given
    assert data["variants"]["sensitivity-bh"]["settings"]["beta"] == 24.0
    assert data["variants"]["count-bh/3"]["settings"]["beta"] == 8.0
    for name, runs in result["runs"].items():
        assert [r["seed"] for r in sorted(runs, key=lambda r: r["seed"])] == [0, 1]
        prior = data["variants"][name]["settings"]["prior"]
        for r in runs:
            assert math.isfinite(r["area_val"]) and math.isfinite(r["final_test"]) and r["trials"] > 0
            assert r["prior_cost"] == (0.0 if prior in (None, "oracle") else expected[prior.split(":")[-1]])
    assert "vs_no-priors" in data["variants"]["sensitivity-bh"]
    assert "missing" in data["signal_quality"]["audit"]  # not scored: said so, not invented
    for signal in ("sensitivity", "early"):
        figures = data["signal_quality"][signal]["val"]
        assert set(figures["spearman"]) == {"value", "low", "high", "method"}
    # Run again: every run is read back from the work folder, the same figures.
    again = replay.main(command)
    assert again["runs"] == result["runs"]
