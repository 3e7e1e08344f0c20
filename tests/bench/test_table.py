"""bench/table.py: plan ids, the Table-1 rows the replay's portfolio must find, resuming, refusals."""

from __future__ import annotations

import json
import os
import re
from types import SimpleNamespace

import pytest

import table
from _lab import SCENARIOS_FILE, load_declared, plan_id


def test_plan_id_is_stable_and_sees_lr_and_epochs():
    plan = {"backbone": "cvtgan", "bitfit": True, "sites": {"a": {"method": "lora", "rank": 2}}, "train": {"lr": 0.01, "epochs": 4}}
    reordered = {"train": {"epochs": 4, "lr": 0.01}, "sites": {"a": {"rank": 2, "method": "lora"}}, "bitfit": True, "backbone": "cvtgan"}
    assert plan_id(plan) == plan_id(reordered)
    assert re.fullmatch(r"[0-9a-f]{12}", plan_id(plan))
    assert plan_id({**plan, "train": {"lr": 0.02, "epochs": 4}}) != plan_id(plan)
    assert plan_id({**plan, "train": {"lr": 0.01, "epochs": 6}}) != plan_id(plan)


def _light_evaluation(backbone: str, epochs: int):
    """An Evaluation without data: what the plan builders read (spaces, counter, budget, epochs)."""
    from autopeft.search.budget import Budget, PlanCounter
    from autopeft.search.space import load_space
    from autopeft.backbones import build_backbone

    ev = object.__new__(table.Evaluation)
    ev.spec, ev.epochs = {"backbone": backbone}, epochs
    ev.template = build_backbone(backbone, "tiny")
    ev.counter = PlanCounter(ev.template)
    ev.budget_text, ev.budget = "1%", Budget.parse("1%")
    sites = ev.template.sites()
    ev.spaces = {"grouped": load_space(backbone, sites), "blocks": load_space(f"{backbone}-blocks", sites)}
    return ev


def test_table1_rows_hold_the_engine_portfolio_by_plan_id():
    from autopeft.search.portfolio import portfolio, table1_plans

    ev = _light_evaluation("cvtgan", 3)
    rows = table.table1_entries(ev, (3, 5))
    ids = {r["plan_id"] for r in rows}
    for space in ev.spaces.values():
        entries = portfolio(space, ev.counter, ev.budget, train={"epochs": 3})
        assert entries and {plan_id(e.plan.to_dict()) for e in entries} <= ids
    labels = [label for label, _ in table1_plans("cvtgan")]
    # Both spaces share one lr range: 3 + 5 rates with the centre shared = 7 per row.
    assert len(rows) == 7 * len(labels)
    assert sum(r["middle"] for r in rows) == len(labels)
    assert {r["feasible"] for r in rows} == {True, False}  # over-budget rows kept, marked


def test_sobol_plans_are_feasible_distinct_and_repeatable():
    ev = _light_evaluation("cvtgan", 2)
    first, skipped = table.sobol_plans(ev, "grouped", 4)
    again, _ = table.sobol_plans(ev, "grouped", 4)
    assert [p["plan_id"] for p in first] == [p["plan_id"] for p in again]
    assert len({p["plan_id"] for p in first}) == 4 and all(p["feasible"] for p in first)
    assert all(p["plan"]["train"]["epochs"] == 2 and "lr" in p["params"] for p in first)


def _tasks(n: int) -> list[dict]:
    return [{"plan_id": f"{i:012x}", "label": f"p{i}", "source": "1", "target": "5", "fold": 0, "seed": 0} for i in range(n)]


def test_resume_completes_a_partly_written_work_folder(tmp_path):
    from autopeft._io import atomic_write_json

    tasks = _tasks(4)
    for task in tasks[:2]:
        atomic_write_json(table.task_file(tmp_path, task), {**task, "val_psnr": 1.0, "seconds": 0.0, "kept": True})
    # What an interruption leaves of a run in flight: a partial file, which must not count as done.
    (tmp_path / "rows" / f".partial-{table.task_file(tmp_path, tasks[2]).name}.123.tmp").write_text("{")
    before = {t["plan_id"]: os.stat(table.task_file(tmp_path, t)).st_mtime_ns for t in tasks[:2]}
    assert [t["plan_id"] for t in table.pending_tasks(tasks, tmp_path)] == [tasks[2]["plan_id"], tasks[3]["plan_id"]]
    ran = []

    def runner(task, setup, work):
        ran.append(task["plan_id"])
        row = {**task, "val_psnr": 2.0, "seconds": 0.0, "kept": False}
        atomic_write_json(table.task_file(work, task), row)
        return row

    rows = table.run_tasks(tasks, None, tmp_path, workers=1, what="test", runner=runner)
    assert ran == [tasks[2]["plan_id"], tasks[3]["plan_id"]]
    assert [r["kept"] for r in rows] == [True, True, False, False]
    assert {t["plan_id"]: os.stat(table.task_file(tmp_path, t)).st_mtime_ns for t in tasks[:2]} == before
    ran.clear()
    table.run_tasks(tasks, None, tmp_path, workers=1, what="test", runner=runner)
    assert ran == []


def test_choose_epochs_follows_the_rule():
    full = 16
    # gain(E)/gain(16): plan a reaches 0.9 at epoch 6, plan b at 8, plan c at 12 -> median crosses at 8.
    def curve(at):
        return [0.5 if e < at else 0.95 for e in range(1, full)] + [1.0]
    chosen = table.choose_epochs({"cvtgan": [curve(6), curve(8), curve(12)], "unetr": [curve(4)] * 3},
                                 full=full, candidates=(4, 6, 8, 12, 16), ratio=0.9)
    assert chosen["per_backbone"]["cvtgan"]["epochs"] == 8
    assert chosen["per_backbone"]["unetr"]["epochs"] == 4
    assert chosen["epochs"] == 8


def test_pilot_constants_match_the_declared_rule():
    rule = load_declared()["table"]["epochs_rule"]
    for name in table.PILOT["scenarios"]:
        assert name in rule
    assert "{" + ", ".join(str(e) for e in table.PILOT["candidates"]) + "}" in rule
    assert f"{table.PILOT['epochs']} epochs" in rule and f"at least {table.PILOT['ratio']}" in rule
    assert f"{table.PILOT['max_hours']}" in rule and f"{table.PILOT['sampled']} sampled plans" in rule


def test_a_confirm_scenario_is_never_tabulated(tmp_path):
    confirm = next(n for n, s in load_declared()["scenarios"].items() if s["role"] == "confirm")
    with pytest.raises(SystemExit, match="confirm"):
        table.main(["--scenario", confirm, "--out-dir", str(tmp_path)])


def test_a_lab_table_needs_the_pilot(tmp_path):
    lab = next(n for n, s in load_declared()["scenarios"].items() if s["role"] == "lab")
    with pytest.raises(SystemExit, match=r"bench/table.py --pilot"):
        table.main(["--scenario", lab, "--out-dir", str(tmp_path)])


def test_an_undeclared_scenario_is_named_with_a_hint():
    with pytest.raises(SystemExit, match="Did you mean 'cvtgan-3-5-d3'"):
        table.main(["--scenario", "cvtgan-3-5-d4"])


def test_cost_model_and_projection_by_hand():
    import pandas as pd

    frame = pd.DataFrame({
        "source": ["1", "1", "1", "5", "5"], "target": ["5", "5", "5", "1", "1"],
        "kind": ["no-ft", "sampled", "table1", "no-ft", "sampled"], "error": ["", "", "", "", ""],
        # 4 epochs: pair 1->5 costs 2 s fixed + 1 s an epoch, pair 5->1 10 s + 2 s an epoch.
        "seconds": [2.0, 6.0, 6.0, 10.0, 18.0]})
    model = table.cost_model(frame, 4, test_share=2.0)  # test subjects: twice the validation ones
    assert model == {"fixed_seconds": pytest.approx(6.0 * 3), "seconds_per_epoch": pytest.approx(1.5)}
    assert table.project_seconds(10, 8, model["fixed_seconds"], model["seconds_per_epoch"], 2) == pytest.approx(150.0)
    assert table.table_runs(rows=5, second_seed=2, pairs=2) == 14


def test_signal_scorer_goes_through_the_registry_with_its_cost():
    import math

    from autopeft.peft import Plan
    from autopeft.search.priors import CountPrior, EarlyPrior
    from autopeft.runner.trial import TrialSetup

    ev = _light_evaluation("cvtgan", 2)
    setup = TrialSetup(backbone="cvtgan", preset="tiny", manifest_path="", pairs=(("1", "5"), ("5", "1")), epochs=2)
    units = [("1", "5", 0)]
    count = table.signal_scorer("count", setup, ev.template, ev.counter, units)
    early = table.signal_scorer("early", setup, ev.template, ev.counter, units)
    assert isinstance(count, CountPrior) and isinstance(early, EarlyPrior)
    assert count.cost == 0.0 and early.cost == 0.0  # the baselines read no data: nothing to charge
    plan = Plan.from_dict({"backbone": "cvtgan", "bitfit": True, "sites": {"encoder.stem": {"method": "ssf"}}})
    trainable = ev.counter.count(plan).trainable
    assert trainable > 0 and count.score(plan) == math.log1p(trainable)
    # encoder.stem is the first of the backbone's sites: weight 1; BitFit's biases reach every site.
    sites = [s.name for s in ev.template.sites()]
    trained = [s for s, n in ev.counter.count(plan).per_site.items() if n > 0]
    assert "encoder.stem" in trained
    assert early.score(plan) == sum(1 - sites.index(s) / len(sites) for s in trained)
    from autopeft.errors import ConfigError

    with pytest.raises(ConfigError, match="prior_signal"):
        table.signal_scorer("gradients", setup, ev.template, ev.counter, units)
