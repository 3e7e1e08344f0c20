"""The whole lab path on the tiniest settings: a table, every signal's prior scores (gradient and
audit included), a replay on it with the fading betas and the controls."""

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
    assert set(priors["signals"]) == {"sensitivity", "shpeft", "gradient", "audit", "count", "early"}
    assert set(priors["signals"]) <= set(scores.columns)
    assert scores[["gradient", "audit"]].notna().all().all()
    assert set(scores["pair"]) == {"1->5", "5->1", "all"}
    # Pair-epochs by hand, 2 pairs at E = 1. The grouped cvtgan space offers 7 methods that train
    # something (ssf, layernorm, lora, vpt, adapter, shpeft, bitfit; the per-block one has no vpt):
    # gradient 7 passes per pair; audit trains the 6 switchable ones (not vpt) max(1, 1 // 4) = 1
    # epoch per pair; the site-mass signals one pass per pair; the baselines nothing.
    expected = {"sensitivity": 2.0, "shpeft": 2.0, "gradient": 14.0, "audit": 12.0, "count": 0.0, "early": 0.0}
    assert {s: c["pair_epochs"] for s, c in priors["cost"].items()} == expected
    assert any("vpt" in note for note in priors["notes"]["audit"])

    out = tmp_path / "replay.json"
    # A few variants keep CI short: one of each kind (baseline, signal at two betas, oracle, controls).
    variants = "no-priors,gradient-bh,audit-bh/3,oracle-bh/3,inverted-audit,permuted-gradient,permuted-count"
    command = ["--scenario", "cvtgan-1-5", "--tables", str(tmp_path), "--seeds", "2", "--workers", "2",
               "--variants", variants, "--out", str(out), "--work", str(tmp_path / "replay-work")]
    result = replay.main(command)
    data = json.loads(out.read_text(encoding="utf-8"))
    # count's prior is a bare log count: nothing to permute, so no permuted variant, and the file says why.
    assert set(data["skipped_variants"]) == {"permuted-count"}
    assert set(data["variants"]) == set(variants.split(",")) - {"permuted-count"}
    assert data["horizon_pair_epochs"] == 24 * 2 * 1
    assert data["variants"]["gradient-bh"]["settings"]["beta"] == 24.0
    assert data["variants"]["audit-bh/3"]["settings"]["beta"] == 8.0
    for name, runs in result["runs"].items():
        assert [r["seed"] for r in sorted(runs, key=lambda r: r["seed"])] == [0, 1]
        prior = data["variants"][name]["settings"]["prior"]
        for r in runs:
            assert math.isfinite(r["area_val"]) and math.isfinite(r["final_test"]) and r["trials"] > 0
            assert r["prior_cost"] == (0.0 if prior in (None, "oracle") else expected[prior.split(":")[-1]])
    assert "vs_no-priors" in data["variants"]["gradient-bh"]
    for signal in ("gradient", "audit"):
        figures = data["signal_quality"][signal]["val"]
        assert set(figures["spearman"]) == {"value", "low", "high", "method"}
    # Run again: every run is read back from the work folder, the same figures.
    again = replay.main(command)
    assert again["runs"] == result["runs"]
