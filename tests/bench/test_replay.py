"""bench/replay.py: regret and its area, ASHA on hand-made curves, the decision rule, signal quality,
the variants' betas and controls."""

from __future__ import annotations

import numpy as np
import pytest

import replay


EVENTS = [
    {"cost": 4, "state": "FINISHED", "val_gain": 1.0, "test_gain": 0.5},
    {"cost": 8, "state": "STOPPED", "val_gain": 3.0, "test_gain": 9.0},   # stopped: never the best so far
    {"cost": 12, "state": "FINISHED", "val_gain": 2.0, "test_gain": 1.5},
    {"cost": 14, "state": "FINISHED", "val_gain": 1.5, "test_gain": 2.5},  # worse on validation: not chosen
    {"cost": 20, "state": "FINISHED", "val_gain": 2.5, "test_gain": 3.0},  # ends past the horizon
]


def test_regret_and_area_by_hand():
    steps = replay.regret_curve(EVENTS, 3.0, "val_gain")
    assert steps == [(0.0, 3.0), (4.0, 2.0), (12.0, 1.0), (20.0, 0.5)]
    # Horizon 16: regret 3 on [0, 4), 2 on [4, 12), 1 on [12, 16].
    assert replay.regret_area(steps, 16) == pytest.approx((4 * 3 + 8 * 2 + 4 * 1) / 16)
    assert replay.regret_at(steps, 16) == 1.0
    test = replay.regret_curve(EVENTS, 3.0, "test_gain")  # chosen on validation, read on test
    assert test[:3] == [(0.0, 3.0), (4.0, 2.5), (12.0, 1.5)]
    assert replay.regret_area(test, 16) == pytest.approx((4 * 3 + 8 * 2.5 + 4 * 1.5) / 16)
    assert replay.regret_area([(0.0, 2.0)], 10) == 2.0  # nothing finished: No-FT's regret throughout


def test_asha_replay_on_hand_made_curves():
    from autopeft.runner._tune import scheduler_for
    from autopeft.search.config import SearchConfig
    from autopeft.runner.trial import TrialSetup

    epochs, pairs = 4, 2
    config = SearchConfig(backbone="cvtgan", budget="1%", epochs=epochs, fidelity="epochs", asha=True, trials=4)
    setup = TrialSetup(backbone="cvtgan", preset="tiny", manifest_path="", pairs=(("1", "5"), ("5", "1")), epochs=epochs)
    scheduler, attr, setup = scheduler_for(config, setup)
    scheduler.set_search_properties("gain", "max")
    assert attr == "epochs_done" and setup.score_at == (1, 2)  # grace max(1, 4 // 4) = 1; rungs 1, 2, 4 (a pair's end)
    times = replay.report_times(setup.score_at, pairs, epochs)
    assert times == [1, 2, 4, 8]
    a = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    b = np.full((2, 4), 0.5)
    c = np.array([[2.0, 1.5, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]])
    # A, first, runs to the end (gain at 8: mean of the pairs' last epochs, 6).
    result, spent = replay.asha_replay(scheduler, "a", a, times, epochs)
    assert spent == 8 and result["pairs_done"] == 2 and result["gain"] == 6.0
    # B: 0.5 at rung 1 is below the median of {A: 1}: stopped after 1 pair-epoch.
    result, spent = replay.asha_replay(scheduler, "b", b, times, epochs)
    assert spent == 1 and result["pairs_done"] == 0
    # C: 2 at rung 1 beats the median of {1, 0.5} = 0.75; 1.5 at rung 2 is below {A: 2}: stopped at 2.
    result, spent = replay.asha_replay(scheduler, "c", c, times, epochs)
    assert spent == 2 and result["gain"] == 1.5


def test_decision_rule_on_made_up_differences():
    rng = np.random.default_rng(0)
    per = {}
    for name, bad_here in (("s1", False), ("s2", False), ("s3", True)):
        base = 1.0 + rng.normal(0, 0.1, 30)
        per[name] = {
            "no-priors": base.tolist(),
            "good": (base - 0.2 + rng.normal(0, 0.05, 30)).tolist(),
            "better-but-breaks-one": (base + (0.3 if bad_here else -0.6) + rng.normal(0, 0.05, 30)).tolist(),
            "null": (base + rng.normal(0, 0.05, 30)).tolist(),
            "slow-control": (base + 0.2 + rng.normal(0, 0.05, 30)).tolist(),
        }
    decision = replay.decide(per, ["good", "better-but-breaks-one", "null"], oracle="good", controls=["slow-control"])
    assert decision["qualifying"] == ["good"]
    assert decision["default"] == "good" and decision["oracle_qualifies"]
    assert decision["variants"]["better-but-breaks-one"]["scenarios_above_zero"] == ["s3"]
    assert decision["variants"]["better-but-breaks-one"]["pooled"]["mean"] < decision["variants"]["good"]["pooled"]["mean"]
    assert decision["fading_too_slow"] == ["slow-control"]
    none = replay.decide(per, ["null"], oracle="null")
    assert none["default"] == "priors off" and "OFF" in none["text"] and "ORACLE" in none["text"]


def test_paired_intervals():
    d = [0.1, -0.2, 0.3, 0.05, -0.1, 0.2, 0.15, -0.05]
    out = replay.paired(d)
    from scipy import stats

    low, high = stats.ttest_1samp(d, 0).confidence_interval(0.95)
    assert out["mean"] == pytest.approx(np.mean(d))
    assert out["t_ci"] == pytest.approx([low, high])
    assert out["bca_ci"][0] < out["mean"] < out["bca_ci"][1]


def test_signal_quality_figures_are_the_librarys_with_their_intervals():
    gains = np.arange(20, dtype=float)
    counts = np.array([5, 3, 8, 1, 9, 2, 7, 4, 6, 0] * 2, dtype=float)
    perfect = replay.quality_figures(gains, gains, counts)
    assert perfect["k"] == 10
    assert set(perfect) == {"k", "top_k_recall", "ndcg_at_k", "spearman", "partial_spearman"}
    assert perfect["top_k_recall"]["value"] == 1.0 and perfect["ndcg_at_k"]["value"] == pytest.approx(1.0)
    assert perfect["spearman"]["value"] == pytest.approx(1.0)
    for figure in ("top_k_recall", "ndcg_at_k", "spearman", "partial_spearman"):
        assert set(perfect[figure]) == {"value", "low", "high", "method"}
    reverse = replay.quality_figures(-gains, gains, counts)
    assert reverse["top_k_recall"]["value"] == 0.0 and reverse["spearman"]["value"] == pytest.approx(-1.0)
    # A quick table has 10 plans or fewer: k is one less than their number (BCa's jackknife leaves one out).
    # Neighbours swapped: the prior's top 7 leave out plan 1, the truth's plan 0: recall 6/7; every rank
    # off by one, sum d^2 = 8, Spearman 1 - 6 * 8 / (8 * 63) = 19/21.
    few = replay.quality_figures([1, 0, 3, 2, 5, 4, 7, 6], list(range(8)), [5, 3, 8, 1, 9, 2, 7, 4])
    assert few["k"] == 7 and few["top_k_recall"]["value"] == pytest.approx(6 / 7)
    assert few["spearman"]["value"] == pytest.approx(19 / 21)
    sp = few["spearman"]
    assert sp["method"] in ("BCa", "percentile") and sp["low"] <= 19 / 21 <= sp["high"]


def test_variants_have_the_declared_betas_and_file_names_of_their_own(tmp_path):
    from _lab import load_declared

    rule = load_declared()["decisions"]["prior_default"]
    assert "{horizon/10, horizon/3, horizon}" in rule  # the three betas below, in the declared order
    betas = replay.declared_betas(24)
    assert betas == {"-bh/10": pytest.approx(2.4), "-bh/3": pytest.approx(8.0), "-bh": 24.0}
    variants = replay.variant_list(("gradient", "count"), betas)
    assert variants["gradient-bh/10"] == {"sampler": "tpe", "prior": "gradient", "beta": pytest.approx(2.4)}
    assert variants["count-bh"]["beta"] == 24.0 and variants["oracle-bh/3"]["prior"] == "oracle"
    assert variants["inverted-gradient"] == {"sampler": "tpe", "prior": "inverted:gradient", "beta": pytest.approx(8.0)}
    assert variants["permuted-count"]["prior"] == "permuted:count"
    assert all(v["beta"] is not None for name, v in variants.items() if v["prior"] is not None)
    assert len(variants) == 2 + 2 * 3 + 3 + 2 * 2
    files = {replay.run_file(tmp_path, name, 0) for name in ("gradient-bh/10", "gradient-bh/3", "gradient-bh")}
    assert len(files) == 3 and {f.parent for f in files} == {tmp_path}


def test_a_signal_without_values_to_permute_has_no_permuted_variant():
    from types import SimpleNamespace

    from autopeft.search.budget import PlanCounter
    from autopeft.search.priors import CountPrior, EarlyPrior
    from autopeft.backbones import build_backbone

    template = build_backbone("cvtgan", "tiny")
    counter = PlanCounter(template)
    live = {"count": CountPrior(counter), "early": EarlyPrior(template, counter)}
    ctx = SimpleNamespace(signal=live.__getitem__)  # what unpermutable reads of a Context: its live priors
    variants = replay.variant_list(("count", "early"), replay.declared_betas(24))
    skipped = replay.unpermutable(ctx, variants)
    assert list(skipped) == ["permuted-count"]
    assert "no per-site or per-candidate values" in skipped["permuted-count"]


def test_pooled_decision_reads_the_lab_replays(tmp_path):
    import json

    from _lab import load_declared

    lab = [n for n, s in load_declared()["scenarios"].items() if s["role"] == "lab"]
    rng = np.random.default_rng(3)
    for name in lab:
        base = 2.0 + rng.normal(0, 0.2, 20)
        areas = {"no-priors": base, "shpeft": base * 0.8 + rng.normal(0, 0.02, 20),
                 "oracle": base * 0.5 + rng.normal(0, 0.02, 20), "inverted-shpeft": base * 1.3 + rng.normal(0, 0.02, 20)}
        runs = {v: [{"seed": i, "area_val": float(a)} for i, a in reversed(list(enumerate(x)))] for v, x in areas.items()}
        (tmp_path / f"replay-{name}.json").write_text(json.dumps({"variants": {v: {} for v in areas}, "runs": runs}))
    out = tmp_path / "replay.json"
    result = replay.main(["--pooled", "--results", str(tmp_path), "--out", str(out)])
    decision = json.loads(out.read_text())["decision"]
    assert decision["default"] == "shpeft" == result["decision"]["default"]
    assert decision["oracle"] == {"oracle": True}
    assert decision["fading_too_slow"] == ["inverted-shpeft"]
    assert decision["variants"]["shpeft"]["pooled"]["mean"] == pytest.approx(-0.2, abs=0.02)


def test_pooled_names_the_missing_replays(tmp_path):
    with pytest.raises(SystemExit, match="bench/replay.py --scenario"):
        replay.main(["--pooled", "--results", str(tmp_path)])


def test_a_table_in_the_repository_is_recorded_by_its_relative_path():
    inside = replay.ROOT / "bench" / "results" / "tables" / "cvtgan-1-5.csv.gz"
    assert replay._shown(inside) == "bench/results/tables/cvtgan-1-5.csv.gz"
