"""The study report, from a micro run built through the search's own functions (no Ray): real
1-epoch source models and fine-tunes on a tiny fake data set, trial records made and written by
the engine's functions (``new_record``, ``write_record``), the study, then ``finish_run``. One
source model and two targets keep it to one pre-training; one run for the module."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import asdict, replace
from pathlib import Path

import optuna
import pytest

from _fakes import make_dataset
from autopeft.data import Protocol
from autopeft.errors import ConfigError
from autopeft.report import load_run, write_report
from autopeft.report._figures import importance_figure
from autopeft.runs import FAILED, FINISHED, INFEASIBLE, STOPPED, new_record, study_storage_url, write_record

pytestmark = pytest.mark.slow  # the micro run trains source models and fine-tunes; Chromium

PROTOCOL = {"pretrain_train": 2, "pretrain_val": 1, "finetune_train": 1, "finetune_val": 1, "finetune_test": 1, "folds": 1}


class _StopAfterOnePair(Exception):
    """Stands in for ASHA stopping a trial after its first pair."""


def build_micro_run(root: Path) -> Path:
    """A finished micro search (source 1, targets 2 and 3): 1 finished trial, 1 stopped early,
    1 failed, 1 over budget,
    the three reference rows, results.csv, best_plan.yaml and best_weights/."""
    from autopeft.peft import Plan
    from autopeft.report._examples import write_examples
    from autopeft.report._results import finish_run
    from autopeft.runner.references import run_references
    from autopeft.runner.trial import TrialSetup, run_plan, source_model
    from autopeft.search.budget import PlanCounter
    from autopeft.search.config import SearchConfig
    from autopeft.search.space import load_space
    from autopeft.backbones import build_backbone

    manifest = make_dataset(root / "data", {"1": 3, "2": 3, "3": 3}, shape=(20, 18, 16), long_factor=1.5)
    run_dir = root / "run"
    run_dir.mkdir()
    config = SearchConfig(backbone="cvtgan", budget="5%", preset="tiny", scanners=["1", "2", "3"], trials=4, epochs=1,
                          data=str(manifest), out=str(run_dir), pretrain_epochs=1, protocol=PROTOCOL, device="cpu",
                          space="cvtgan", progress=False, concurrency=1)
    meta = {"study_name": "micro", "sessions": 1, "config": asdict(config), "versions": {"autopeft": "0.1.0"}}
    (run_dir / "run.json").write_text(json.dumps(meta))
    setup = TrialSetup(backbone="cvtgan", preset="tiny", manifest_path=str(manifest), pairs=(("1", "2"), ("1", "3")),
                       epochs=1, protocol=Protocol(**PROTOCOL), pretrain_epochs=1, run_dir=str(run_dir))
    source_model(setup, "1", 0)
    template = build_backbone("cvtgan", "tiny")
    space, counter = load_space("cvtgan", template.sites()), PlanCounter(template)
    study = optuna.create_study(storage=study_storage_url(run_dir), study_name="micro", direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=3))
    for number, outcome in enumerate((FINISHED, STOPPED, FAILED, INFEASIBLE)):
        trial = study.ask()
        plan = space.suggest(trial, train={"epochs": 1})
        if outcome != INFEASIBLE:  # a small, always feasible plan keeps the fine-tunes cheap
            plan = Plan.from_dict({**plan.to_dict(), "sites": {"decoder.*.block*": {"method": "ssf"}},
                                   "train": {"lr": 2e-3 * (number + 1), "epochs": 1}})
        count = counter.count(plan)
        # The trial's config as the engine hands it to Ray, and the record the engine starts from it.
        trial_config = {"number": number, "plan": plan.to_dict(), "params": dict(trial.params),
                        "trainable": count.trainable, "fraction": count.fraction}
        record = new_record(trial_config, len(setup.units), state="RUNNING")
        trial.set_user_attr("state", outcome)  # as the engine's searcher does before closing a trial
        if outcome == INFEASIBLE:
            record.update(state=INFEASIBLE, reason="trains 40% of the parameters, over the budget")
            study.tell(trial, 0.0)
        elif outcome == FAILED:
            record.update(state=FAILED, reason="FloatingPointError: pair 1->2 (fold 0) scored nan")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            def report(metrics, _record=record, _stop=outcome == STOPPED):
                _record.update(metrics)
                if _stop:
                    raise _StopAfterOnePair

            try:
                run_plan(setup, plan, report=report, save_dir=run_dir / "weights" / f"{number:04d}")
            except _StopAfterOnePair:
                pass
            record["state"] = outcome
            study.tell(trial, record["psnr"])
        write_record(run_dir, number, record)
    # The reference rows on the first pair only: three more fine-tunes per pair would double the fixture.
    run_references(replace(setup, pairs=setup.pairs[:1]), config, run_dir)
    summary = finish_run(run_dir, setup, config)
    assert write_examples(run_dir, setup, summary["best"], split="val")  # as the search does at its end
    return run_dir


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory) -> Path:
    return build_micro_run(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def report_html(micro_run) -> str:
    return write_report(micro_run).read_text(encoding="utf-8")


def test_report_holds_every_section(micro_run, report_html):
    path = micro_run / "report.html"
    assert path.is_file()
    for anchor in ("table", "confirmed", "selection", "history", "pareto", "importance", "pairs", "slices", "trials", "settings"):
        assert f"<section id='{anchor}'>" in report_html, anchor
    # Table 1 rows: every reference and the best plan.
    table = report_html.split("<section id='table'>")[1].split("</section>")[0]
    for label in ("No-FT", "Full-FT", "PETITE", "autopeft (best, #"):
        assert label in table, label
    # Too few finished trials for importances: a note, not an error.
    importance = report_html.split("<section id='importance'>")[1].split("</section>")[0]
    assert "need at least" in importance and "class=\"note\"" in importance
    # Example slices were drawn from what the search kept (examples/), against No-FT.
    slices = report_html.split("<section id='slices'>")[1].split("</section>")[0]
    assert "No-FT prediction" in slices and "Full-FT weights" in slices and "plotly-graph-div" in slices
    # States are shown as such, in the trials table and the figures' legends.
    trials = report_html.split("<section id='trials'>")[1].split("</section>")[0]
    for state in (FINISHED, STOPPED, FAILED, INFEASIBLE):
        assert f">{state}<" in trials, state
    assert "stopped early (ASHA)" in report_html and "FloatingPointError" in trials
    for name in ("torch", "monai", "optuna", "ray", "autopeft"):
        assert f"<th>{name}</th>" in report_html


def test_report_is_offline_with_plotly_inline_once(report_html):
    assert not re.search(r"<script[^>]+src=", report_html), "no script may come from the network"
    assert report_html.count("plotly.js v") == 1
    # plotly.js (several MB) embedded exactly once, whatever the number of figures.
    assert report_html.count("Plotly.newPlot") >= 4  # history, Pareto, pairs, slices (importances: a note)
    assert len(report_html) < 3 * 4_900_000


def test_report_numbers_match_the_run(micro_run, report_html):
    run = load_run(micro_run)
    best = run.best
    assert best is not None and best["state"] == FINISHED and best["pairs_done"] == 2
    assert f"trial #{best['number']}, validation PSNR {best['psnr']:.3f} dB" in report_html
    for ref in run.references:
        assert f"{ref['psnr']:.3f}" in report_html


def test_importances_drawn_with_enough_finished_trials(micro_run, tmp_path):
    # Copy the run and add finished trials (params drawn from the same distributions) to reach the minimum.
    run_dir = tmp_path / "run"
    shutil.copytree(micro_run, run_dir, ignore=shutil.ignore_patterns("weights", "best_weights", "report.html"))
    study = optuna.load_study(study_name="micro", storage=study_storage_url(run_dir))
    template = next(t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    run = load_run(run_dir)
    base = run.finished[0]
    for extra in range(4):
        params = dict(template.params)
        lr_name = next(n for n in params if "lr" in n)
        params[lr_name] = template.distributions[lr_name].choices[extra % len(template.distributions[lr_name].choices)] \
            if hasattr(template.distributions[lr_name], "choices") else params[lr_name]
        trial = optuna.trial.create_trial(params=params, distributions=template.distributions, value=30.0 + extra)
        study.add_trial(trial)
        number = len(study.trials) - 1
        write_record(run_dir, number, {**base, "number": number, "psnr": 30.0 + extra})
    figure = importance_figure(load_run(run_dir))
    assert not isinstance(figure, str), figure
    assert "importances" in figure.layout.title.text


def test_the_report_runs_no_model_a_run_without_examples_gets_a_note(micro_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(micro_run, run_dir, ignore=shutil.ignore_patterns("examples", "report.html"))
    text = write_report(run_dir).read_text(encoding="utf-8")
    slices = text.split("<section id='slices'>")[1].split("</section>")[0]
    assert "No example slices: the run holds none (examples/)" in slices and "plotly-graph-div" not in slices


def test_report_of_a_folder_that_is_not_a_run_says_so(tmp_path):
    with pytest.raises(ConfigError, match="run.json"):
        write_report(tmp_path)


def test_report_command_writes_the_file(micro_run, tmp_path, capsys):
    from autopeft.cli import main

    out = tmp_path / "r.html"
    assert main(["report", str(micro_run), "--out", str(out), "--no-slices"]) == 0
    text = out.read_text(encoding="utf-8")
    assert "<section id='slices'>" not in text and "<section id='pareto'>" in text
    assert str(out) in capsys.readouterr().out


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def test_report_renders_in_headless_chromium_without_console_errors(micro_run, report_html, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not found on PATH (Debian: apt-get install -y chromium); the render check needs it")
    shot = micro_run / "report.png"
    profile = tmp_path / "profile"
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=8000", "--window-size=1280,6000", f"--screenshot={shot}",
         (micro_run / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert shot.is_file() and shot.stat().st_size > 50_000, result.stderr[-2000:]
    # Page console messages reach stderr as 'CONSOLE(...)' lines; JS errors as 'Uncaught ...'.
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    errors = [line for line in console if "Uncaught" in line or "Error" in line or ":ERROR:" in line]
    assert not errors, "\n".join(errors)
