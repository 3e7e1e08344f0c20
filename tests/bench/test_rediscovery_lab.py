"""bench/rediscovery.py --lab: the real engine run with the settings the replays ran with."""

from __future__ import annotations

import json

import pytest

import rediscovery
from _lab import TABLES, load_declared


def test_lab_runs_the_replays_settings_and_names():
    args = rediscovery._parse(["--lab", "--scenario", "unetr-1-3-d6", "--variants", "audit-bh/3,no-priors", "--repeats", "10"])
    horizon = int(load_declared()["replay"]["horizon_trials"])
    assert args.epochs == json.loads((TABLES / "pilot.json").read_text(encoding="utf-8"))["epochs"]
    assert args.trials == 2 * horizon and args.horizon_trials == horizon
    assert args.out.name == "rediscovery-lab-unetr-1-3-d6-grouped.json"
    assert rediscovery.variant_settings(args, "audit-bh/3") == {
        "sampler": "tpe", "priors": True, "fidelity": "epochs", "portfolio": True, "prior_signal": "audit",
        "prior_beta": horizon / 3}
    assert rediscovery.variant_settings(args, "no-priors") == {"sampler": "tpe", "priors": False, "fidelity": "epochs",
                                                                "portfolio": True}
    # Without --lab the engine variants keep their committed settings (no portfolio).
    plain = rediscovery._parse(["--scenario", "cvtgan-1-5", "--variants", "no-priors"])
    assert "portfolio" not in rediscovery.variant_settings(plain, "no-priors")


@pytest.mark.parametrize("argv, message", [
    (["--lab", "--scenario", "unetr-1-3-d6", "--variants", "oracle-bh/3"], "only a replay can run"),
    (["--lab", "--scenario", "unetr-1-3-d6", "--epochs", "4"], "drop --epochs 4"),
    (["--lab", "--quick", "--scenario", "unetr-1-3-d6"], "drop --quick"),
    (["--lab"], "--lab needs --scenario"),
    (["--scenario", "cvtgan-1-5", "--variants", "audit-bh/3"], "--variants must be among"),
])
def test_lab_refusals_say_what_to_do(argv, message, capsys):
    with pytest.raises(SystemExit):
        rediscovery._parse(argv)
    assert message in capsys.readouterr().err


def test_best_so_far_charges_the_prior_and_stops_at_the_horizon():
    rows = [{"cost": 12, "state": "FINISHED", "gain": 0.1, "plan": {"a": 1}, "number": 0, "fraction": 0.01},
            {"cost": 6, "state": "STOPPED", "gain": 0.0, "plan": {"a": 2}, "number": 1, "fraction": 0.01},
            {"cost": 12, "state": "FINISHED", "gain": 0.3, "plan": {"a": 3}, "number": 2, "fraction": 0.01}]
    confirmed = []

    def confirm(plan):
        confirmed.append(plan)
        return {"mean": 30.0 + plan["a"], "sd": 0.0}

    steps = rediscovery._best_so_far(rows, confirm, 30.0, start=2, horizon=24)
    assert [s["cost"] for s in steps] == [0, 14, 20]  # the third trial would end at 32 > 24
    assert [s["test_gain"] for s in steps] == [0.0, 1.0, 1.0]
    assert confirmed == [{"a": 1}]  # nothing past the horizon is confirmed


def test_the_prior_cost_charged_is_the_one_the_engine_run_recorded(tmp_path):
    lab = rediscovery._parse(["--lab", "--scenario", "unetr-1-3-d6", "--variants", "audit-bh/3,no-priors"])
    recorded = {"prior": {"signal": "audit", "pair_epochs": 18.0}}
    assert rediscovery._prior_cost(lab, "audit-bh/3", tmp_path, recorded) == 18.0
    assert rediscovery._prior_cost(lab, "no-priors", tmp_path, {"prior": None}) == 0.0
    # Without --lab nothing is charged (the committed rediscovery figures were made so).
    plain = rediscovery._parse(["--scenario", "cvtgan-1-5", "--variants", "no-priors"])
    assert rediscovery._prior_cost(plain, "no-priors", tmp_path, recorded) == 0.0
    # A summary written before the engine recorded the cost is refused, not charged 0.
    with pytest.raises(SystemExit, match="delete .* and run again"):
        rediscovery._prior_cost(lab, "audit-bh/3", tmp_path, {})
