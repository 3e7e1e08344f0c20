"""End to end through real Ray Tune and Optuna on a micro setting: 2 scanners of a tiny fake data
set, 1-epoch source models, 1-2 fine-tuning epochs, 2 CPUs. One Ray session for the module."""

from __future__ import annotations

import json

import optuna
import pytest

from _fakes import make_dataset
from autopeft.report import SearchOutputs
from autopeft.runner import run_search
from autopeft.search.config import SearchConfig
from autopeft.runs import FAILED, FINISHED, INFEASIBLE, INTERRUPTED, STOPPED, TERMINAL, records, study_storage_url, write_record

pytestmark = pytest.mark.slow  # Ray Tune searches

PROTOCOL = {"pretrain_train": 2, "pretrain_val": 1, "finetune_train": 1, "finetune_val": 1, "finetune_test": 1, "folds": 1}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("search-data")
    return make_dataset(root, {"1": 3, "2": 3}, shape=(20, 18, 16), long_factor=1.5)


def _config(data, out, **overrides) -> SearchConfig:
    values = dict(backbone="cvtgan", budget="5%", preset="tiny", scanners=["1", "2"], trials=4, epochs=1, data=str(data),
                  out=str(out), pretrain_epochs=1, protocol=PROTOCOL, cpus_per_trial=1, concurrency=2, device="cpu",
                  references=False, portfolio=False, progress=False, confirm=0)
    values.update(overrides)
    return SearchConfig(**values)


def _study(run_dir):
    meta = json.loads((run_dir / "run.json").read_text())
    return optuna.load_study(study_name=meta["study_name"], storage=study_storage_url(run_dir))


def test_search_warm_starts_with_top_prior_plans_and_writes_outputs(ray_session, data, tmp_path):
    run_dir = run_search(_config(data, tmp_path / "run", priors=True, warm_start=2, budget="3%"), outputs=SearchOutputs())
    rows = {r["number"]: r for r in records(run_dir)}
    # --trials counts plans that train; plans drawn over the budget are recorded besides.
    assert all(r["state"] in TERMINAL for r in rows.values())
    assert sum(r["state"] != INFEASIBLE for r in rows.values()) == 4
    # The first trials are the enqueued warm-start plans, best prior first.
    assert rows[0]["warm_start"] and rows[1]["warm_start"] and not rows[2]["warm_start"]
    assert rows[0]["prior"] >= rows[1]["prior"]
    # ... learning at the preset's PEFT rate (clipped into the space's range), not the middle of
    # the space's log range.
    from autopeft.search.space import load_space
    from autopeft.backbones import build_backbone, registered_backbones

    tiny_lr = registered_backbones()["cvtgan"]["tiny"].finetune.lr_peft
    expected = load_space("cvtgan", build_backbone("cvtgan", "tiny").sites()).default_lr(tiny_lr)
    assert rows[0]["plan"]["train"]["lr"] == rows[1]["plan"]["train"]["lr"] == expected
    study = _study(run_dir)
    for trial in study.trials:
        record = rows[trial.number]
        assert trial.user_attrs["state"] == record["state"]
        assert trial.user_attrs["fidelity"] == pytest.approx(record["fidelity"])
        if record["state"] == INFEASIBLE:
            constraints = trial.constraints
            values = list(constraints.values()) if isinstance(constraints, dict) else list(constraints)
            assert values[0] > 0 and record["pairs_done"] == 0
        if record["state"] == FINISHED:
            assert record["pairs_done"] == record["pairs_total"] == 2 and record["fraction"] <= 0.03
        if record["state"] == STOPPED:
            assert record["pairs_done"] < record["pairs_total"]
    text = (run_dir / "results.csv").read_text()
    assert text.count("\n") == len(rows) + 1 and "fidelity" in text.splitlines()[0]
    assert any(r["state"] == FINISHED for r in rows.values())
    assert (run_dir / "best_plan.yaml").is_file() and list((run_dir / "pareto").glob("*.yaml"))
    # The prior's own cost is recorded, for comparisons that charge it.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["prior"]["signal"] == _config(data, tmp_path / "x", priors=True).prior_signal
    assert summary["prior"]["pair_epochs"] > 0


def test_the_study_holds_the_truth_pruned_stopped_trials_and_the_recommended_best(ray_session, data, tmp_path):
    run_dir = run_search(_config(data, tmp_path / "run", trials=6, priors=False, budget="3%"), outputs=SearchOutputs())
    rows = {r["number"]: r for r in records(run_dir)}
    study = _study(run_dir)
    states = {t.number: t for t in study.trials}
    assert any(r["state"] == STOPPED for r in rows.values()), "ASHA stops some of 6 trials on 2 pairs"
    assert json.loads((run_dir / "summary.json").read_text())["prior"] is None
    for number, record in rows.items():
        trial = states[number]
        if record["state"] == STOPPED:
            # Stopped by the scheduler: PRUNED (never COMPLETE), its running gain after each pair as
            # intermediate values (Optuna keeps the last one as a pruned trial's value).
            assert trial.state == optuna.trial.TrialState.PRUNED
            assert trial.intermediate_values == {1: pytest.approx(record["gain"])}
        elif record["state"] == FINISHED:
            assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == pytest.approx(record["gain"])
            assert record["gain"] == pytest.approx(record["psnr"] - _no_ft_psnr(run_dir))
        elif record["state"] == INFEASIBLE:
            assert trial.state == optuna.trial.TrialState.PRUNED and trial.value is None
    # The study's best trial (what optuna-dashboard shows) is the recommended plan, same value.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert study.best_trial.number == summary["best"]["number"]
    assert study.best_value == pytest.approx(summary["best"]["gain"])


def test_epoch_fidelity_judges_on_pair_epochs_and_scores_mid_pair(ray_session, data, tmp_path):
    # 2 pairs x 4 epochs: ASHA's rungs at 1, 2 and 4 pair-epochs; 1 and 2 fall inside the first pair.
    run_dir = run_search(_config(data, tmp_path / "run", trials=6, epochs=4, priors=False, budget="3%", fidelity="epochs"),
                         outputs=SearchOutputs())
    rows = {r["number"]: r for r in records(run_dir)}
    states = {t.number: t for t in _study(run_dir).trials}
    trained = [r for r in rows.values() if r["state"] in (FINISHED, STOPPED)]
    assert any(r["state"] == STOPPED for r in trained), "ASHA stops some of 6 trials"
    for record in trained:
        trial = states[record["number"]]
        steps = sorted(trial.intermediate_values)
        if record["state"] == FINISHED:
            assert record["epochs_done"] == 8 and trial.state == optuna.trial.TrialState.COMPLETE
            assert steps[:2] == [1, 2] and steps[-1] == 8, "scored mid-pair at the rungs, then after each pair"
        else:
            assert record["epochs_done"] in (1, 2, 4) and trial.state == optuna.trial.TrialState.PRUNED
            assert steps[-1] == record["epochs_done"]
            assert trial.intermediate_values[steps[-1]] == pytest.approx(record["gain"])


def _no_ft_psnr(run_dir) -> float:
    no_ft = next(r for r in json.loads((run_dir / "references.json").read_text()) if r["label"] == "No-FT")
    return no_ft["psnr"]


def test_failing_trials_are_recorded_and_the_search_goes_on(ray_session, data, tmp_path):
    # A learning rate of 1e6 blows the weights up: the loss turns non-finite in the 2nd step.
    space = tmp_path / "space.yaml"
    space.write_text(
        "backbone: cvtgan\ngroups:\n  dec:\n    sites: 'decoder.*.block*'\n    methods: {ssf: {}, lora: {rank: [1, 2]}}\n"
        "bitfit: [true]\nlr: [2.0e-3, 1.0e+6]\n"
    )
    run_dir = run_search(_config(data, tmp_path / "run", space=str(space), priors=False, sampler="random", epochs=2, seed=1),
                         outputs=SearchOutputs())
    rows = records(run_dir)
    failed = [r for r in rows if r["state"] == FAILED]
    others = [r for r in rows if r["state"] in (FINISHED, STOPPED)]
    assert len(rows) == 4 and failed and others  # the space has no plan over 5%: no draw is skipped
    assert all(r["plan"]["train"]["lr"] == 1e6 and ("finite" in r["reason"] or "NaN" in r["reason"]) for r in failed), [(r["plan"]["train"]["lr"], r["reason"]) for r in failed]
    assert all(r["plan"]["train"]["lr"] == 2e-3 for r in others)
    states = {t.number: t.state for t in _study(run_dir).trials}
    assert all(states[r["number"]] == optuna.trial.TrialState.FAIL for r in failed)


def test_resume_repeats_no_finished_trial_and_reruns_the_interrupted_one(ray_session, data, tmp_path):
    run_dir = run_search(_config(data, tmp_path / "run", trials=2, priors=False, budget="3%"), outputs=SearchOutputs())
    before = {r["number"]: r for r in records(run_dir)}
    assert sum(r["state"] != INFEASIBLE for r in before.values()) == 2
    # A session killed mid-trial leaves a RUNNING study trial and a RUNNING record behind.
    study = _study(run_dir)
    killed = study.ask()
    from autopeft.search.space import load_space
    from autopeft.backbones import build_backbone

    space = load_space("cvtgan", build_backbone("cvtgan", "tiny").sites())
    plan = space.suggest(killed, train={"epochs": 1})
    write_record(run_dir, killed.number, {"number": killed.number, "state": "RUNNING", "plan": plan.to_dict(), "params": killed.params,
                                          "pairs_done": 1, "pairs_total": 2, "fidelity": 0.5, "fraction": 0.0})
    run_search(resume_dir=run_dir, trials=4, outputs=SearchOutputs())
    after = {r["number"]: r for r in records(run_dir)}
    for number, record in before.items():
        assert after[number]["started"] == record["started"] and after[number]["state"] == record["state"]
    assert after[killed.number]["state"] == INTERRUPTED
    terminal = [r for r in after.values() if r["state"] in TERMINAL]
    assert sum(r["state"] != INFEASIBLE for r in terminal) == 4
    rerun = [r for r in terminal if r["number"] > killed.number and r["params"] == killed.params]
    assert rerun, "the interrupted plan runs again"


def test_plans_over_the_budget_do_not_count_as_trials_and_the_draws_are_capped(ray_session, data, tmp_path, monkeypatch):
    from autopeft.runner import _tune

    monkeypatch.setattr(_tune, "MAX_INFEASIBLE_DRAWS_PER_TRIAL", 3)
    space = tmp_path / "space.yaml"
    space.write_text("backbone: cvtgan\ngroups:\n  dec:\n    sites: 'decoder.*.block*'\n    methods: {ssf: {}}\nbitfit: [true]\nlr: [2.0e-3]\n")
    # Every plan of this space trains more than 10 parameters: each draw is skipped, none trains,
    # and the search stops after 3 draws per trial asked for instead of drawing forever.
    run_dir = run_search(_config(data, tmp_path / "run", space=str(space), priors=False, sampler="random", trials=1, budget="10"),
                         outputs=SearchOutputs())
    rows = records(run_dir)
    assert len(rows) == 3 and all(r["state"] == INFEASIBLE and r["pairs_done"] == 0 for r in rows)
    assert not (run_dir / "best_plan.yaml").exists()
    # Rejected inside the sampling step: no Ray trial was started for any of them, and the study
    # holds each as PRUNED with its budget constraint and no made-up objective value.
    assert not list((run_dir / "ray").glob("*/_trainable_*"))
    for trial in _study(run_dir).trials:
        assert trial.state == optuna.trial.TrialState.PRUNED and trial.values is None
        assert list(trial.constraints.values())[0] > 0 and trial.user_attrs["state"] == INFEASIBLE


def test_missing_source_models_are_pretrained_together_before_the_trials(ray_session, data, tmp_path, capsys):
    from autopeft.data import Protocol, read_manifest
    from autopeft.pretraining import cache_root, is_pretrained, model_file, source_spec

    # seed 5: no other test asks for these source models, so both are missing at the start.
    manifest = read_manifest(str(data))
    specs = [source_spec("cvtgan", s, manifest=manifest, preset="tiny", epochs=1, seed=5, protocol=Protocol(**PROTOCOL)) for s in "12"]
    assert not any(is_pretrained(spec) for spec in specs)
    run_dir = run_search(_config(data, tmp_path / "run", trials=1, priors=False, seed=5), outputs=SearchOutputs())
    out = capsys.readouterr().out
    assert "pre-training 2 source models side by side" in out
    assert "source model of scanner 1" in out and "source model of scanner 2" in out
    assert all(is_pretrained(spec) for spec in specs)
    # Both finished before any trial started (the trials fine-tune them; none trained its own).
    finished = max((cache_root() / model_file(spec)).stat().st_mtime for spec in specs)
    assert all(r["started"] >= finished for r in records(run_dir) if r["state"] != INFEASIBLE)


def test_time_budget_counts_from_the_start_and_still_launches_one_wave(ray_session, data, tmp_path):
    # One second is spent before the first trial (Ray, the study, source models): only the first
    # wave of `concurrency` plans launches, instead of the 4 asked for.
    run_dir = run_search(_config(data, tmp_path / "run", trials=4, time_budget_s=1.0, priors=False, budget="50%"),
                         outputs=SearchOutputs())
    rows = records(run_dir)
    assert sum(r["state"] != INFEASIBLE for r in rows) == 2


def test_multi_objective_study_gets_gain_and_fraction(ray_session, data, tmp_path):
    run_dir = run_search(_config(data, tmp_path / "run", trials=2, priors=False, objective="multi"), outputs=SearchOutputs())
    study = _study(run_dir)
    assert len(study.directions) == 2
    rows = {r["number"]: r for r in records(run_dir)}
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete and all(t.values == [pytest.approx(rows[t.number]["gain"]), pytest.approx(rows[t.number]["fraction"])]
                            for t in complete)
