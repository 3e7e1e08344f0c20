"""bench/replay.py: regret and its area, ASHA on hand-made curves, the decision rule, signal quality."""

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
    from autopeft.search._tune import scheduler_for
    from autopeft.search.config import SearchConfig
    from autopeft.search.trial import TrialSetup

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


def test_signal_quality_known_answers():
    gains = np.arange(20, dtype=float)
    counts = np.array([5, 3, 8, 1, 9, 2, 7, 4, 6, 0] * 2, dtype=float)
    perfect = replay.quality(gains, gains, counts)
    assert perfect["top_recall"] == 1.0 and perfect["ndcg"] == pytest.approx(1.0)
    assert perfect["spearman"] == pytest.approx(1.0) and perfect["spearman_partial_log_count"] == pytest.approx(1.0)
    reverse = replay.quality(-gains, gains, counts)
    assert reverse["top_recall"] == 0.0 and reverse["spearman"] == pytest.approx(-1.0)
    # Partialled: the correlation of the ranks' residuals after a linear fit on the count's ranks.
    from scipy.stats import rankdata

    rng = np.random.default_rng(1)
    s, g, c = rng.normal(size=40), rng.normal(size=40), rng.normal(size=40)
    g = g + c + 0.5 * s
    rs, rg, rc = rankdata(s), rankdata(g), rankdata(c)
    resid = [x - np.polyval(np.polyfit(rc, x, 1), rc) for x in (rs, rg)]
    expected = np.corrcoef(*resid)[0, 1]
    assert replay.quality(s, g, c)["spearman_partial_log_count"] == pytest.approx(expected)


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
