"""The Tune run of a search: the trainable (in Ray workers), the driver's callback, the limiter.

A trial writes nothing into the run directory, which may be on another machine. After each pair
it hands back, through ``tune.report``, its running metrics and every pair's per-subject scores,
with its trained parts so far as a Tune checkpoint (under the storage path, where every node and
the driver read it). :class:`RecordKeeper`, in the driver, turns those into ``trials/NNNN.json``
and ``weights/NNNN/``.

Two kinds of failure: an error in the trial's own work (a plan whose loss turns NaN) is reported
as the trial's last result and ends it FAILED at once; a dead worker process or node is retried
by Tune (``FailureConfig``), from its last checkpoint (the pairs done are not repeated), and is
recorded FAILED with the reason once the retries are spent.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher

from autopeft._io import atomic_write_json
from autopeft.peft import Plan
from autopeft.runner._searcher import StudySearcher
from autopeft.runner.trial import TrialSetup, progress_metrics, run_plan, scores_from_json
from autopeft.runs import (
    FAILED, FINISHED, INFEASIBLE, RUNNING, STOPPED, new_record, ranked_finished, read_record, records, trial_state,
    weights_dir, write_record,
)
from autopeft.search.sampler import make_sampler, search_seed

__all__ = ["TuneRun", "run_trials", "scheduler_for", "RecordKeeper", "TrialLimiter", "MAX_INFEASIBLE_DRAWS_PER_TRIAL"]

# Over-budget draws allowed per trial asked for before the search gives up on the space: a space
# whose plans almost never fit the budget would otherwise draw forever.
MAX_INFEASIBLE_DRAWS_PER_TRIAL = 25

_PAIRS_FILE = "pairs.json"
_REPORTED = ("psnr", "ssim", "nrmse", "gain", "pairs_done", "epochs_done", "pairs_total", "fidelity")


def _trainable(config: dict[str, Any], setup: TrialSetup) -> None:
    """Ray Tune function trainable: one trial (runs in a Ray worker, on any node)."""
    torch.set_num_threads(max(1, setup.threads))  # oversubscribing 2 cores makes tiny steps 5-10x slower
    node = ray.get_runtime_context().get_node_id()
    setup = setup.on_node()
    plan = Plan.from_dict(config["plan"])
    last: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="autopeft-trial-") as folder:
        work = Path(folder)
        previous = []
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:  # a retry after its process or node died: go on after the pairs done
            checkpoint.to_directory(str(work))
            previous = scores_from_json(json.loads((work / _PAIRS_FILE).read_text(encoding="utf-8")))

        def report(metrics: dict[str, Any]) -> None:
            (work / _PAIRS_FILE).write_text(json.dumps(metrics["pairs"]), encoding="utf-8")
            last.update({k: metrics[k] for k in _REPORTED})
            tune.report({**last, "fraction": config["fraction"], "pairs": metrics["pairs"], "node": node},
                        checkpoint=tune.Checkpoint.from_directory(str(work)))

        if previous and len(previous) == len(setup.units):  # it had finished: report that, train nothing
            report(progress_metrics(setup, previous, total=len(previous), epochs_done=len(previous) * setup.epochs))
            return
        try:
            run_plan(setup, plan, report=report, save_dir=work, skip=len(previous), previous=previous)
        except Exception as err:  # noqa: BLE001 - the plan's own failure: reported, so that Tune does not retry it
            failed = {"pairs_done": len(previous), "epochs_done": len(previous) * setup.epochs,
                      "pairs_total": len(setup.units), "fidelity": 0.0, "gain": float("-inf"),
                      **{k: v for k, v in last.items() if v is not None}}
            tune.report({**failed, "fraction": config["fraction"], "error": f"{type(err).__name__}: {err}"[:500],
                         "node": node})


def _reason(trial) -> str:
    """The last line of a failed trial's error (Ray's text trace, never its pickle)."""
    error = trial.get_error()
    lines = [line for line in str(error or "").strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "the trial process failed")[:500]


class RecordKeeper(tune.Callback):
    """The driver's side of every trial: writes its record (RUNNING, after each pair, then its
    final state by :func:`~autopeft.runs.trial_state`), copies its trained parts from its last
    checkpoint into ``weights/NNNN/`` and prints one line per event.

    Args:
        run_dir: the run directory.
        pairs_total: units per trial.
        line: prints a record's console line (None: quiet).
    """

    def __init__(self, run_dir: Path, pairs_total: int, line: Callable[[dict[str, Any]], None] | None) -> None:
        self.run_dir = run_dir
        self.pairs_total = pairs_total
        self.line = line

    def _record(self, trial) -> dict[str, Any]:
        number = int(trial.config["number"])
        return read_record(self.run_dir, number) or new_record(trial.config, self.pairs_total, state=RUNNING)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        record = self._record(trial)
        write_record(self.run_dir, record["number"], record)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        record = self._record(trial)
        record.update({k: result[k] for k in (*_REPORTED, "pairs", "node") if k in result})
        record["seconds"] = time.time() - record["started"]  # retries included
        write_record(self.run_dir, record["number"], record)

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        record = self._record(trial)
        record["retries"] = int(record.get("retries", 0)) + 1
        record["reason"] = f"retried after: {_reason(trial)}"
        write_record(self.run_dir, record["number"], record)
        if self.line is not None:
            self.line({**record, "state": "RETRIED"})

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        record = self._record(trial)
        result = trial.last_result or {}
        record["state"] = trial_state(result, False)
        if record["state"] == FAILED:
            record.update(reason=result.get("error"), gain=None)
        else:
            self._keep_weights(trial, record["number"])
            record["reason"] = "" if not record.get("retries") else f"finished after {record['retries']} retry(ies)"
        self._close(record)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        record = self._record(trial)
        record.update(state=FAILED, reason=_reason(trial))
        self._close(record)

    def _close(self, record: dict[str, Any]) -> None:
        record["seconds"] = time.time() - record["started"]
        write_record(self.run_dir, record["number"], record)
        if self.line is not None:
            self.line(record)

    def _keep_weights(self, trial, number: int) -> None:
        checkpoint = trial.checkpoint
        if checkpoint is None:
            return
        target = weights_dir(self.run_dir, number)
        with tempfile.TemporaryDirectory(dir=self.run_dir, prefix=".weights-") as folder:
            checkpoint.to_directory(folder)
            Path(folder, _PAIRS_FILE).unlink(missing_ok=True)
            if any(Path(folder).iterdir()):
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.exists():
                    shutil.rmtree(target)
                Path(folder).rename(target)  # whole or absent: no half-copied weights
                Path(folder).mkdir()  # for TemporaryDirectory's clean-up


class TrialLimiter(ConcurrencyLimiter):
    """A concurrency limit that also stops *launching* trials (running ones finish) after
    ``deadline_at`` (once a first wave of ``max_concurrent`` plans has been launched) or once
    ``wanted`` plans have been launched."""

    def __init__(self, searcher, max_concurrent: int, deadline_at: float | None, wanted: int) -> None:
        super().__init__(searcher, max_concurrent=max_concurrent)
        self.deadline_at = deadline_at
        self.wanted = wanted
        self.launched = 0

    def suggest(self, trial_id: str):
        first_wave = self.launched < min(self.wanted, self.max_concurrent)
        if self.deadline_at is not None and time.time() >= self.deadline_at and not first_wave:
            return Searcher.FINISHED
        if self.launched >= self.wanted:
            return Searcher.FINISHED
        config = super().suggest(trial_id)
        if isinstance(config, dict):
            self.launched += 1
        return config


@dataclass
class TuneRun:
    """Everything one Tune run of a search needs.

    Args:
        config: the search's settings.
        run_dir: the run directory (written here, by the driver, only).
        storage: Ray Tune's storage path (a folder every node reads, or a URI).
        name: the Tune experiment's name (one per session).
        setup: the trial set-up every trial receives.
        study: the Optuna study.
        define: the define-by-run step (``autopeft.search._plans.plan_definer``).
        remaining: plans still to train.
        deadline: when to stop launching trials (epoch seconds), or None.
        started: when the session started (for the console lines).
        resources: one trial's Ray resources, as ``tune.with_resources`` takes them.
        guide: called with the study before each ask (``autopeft.search.priors.PriorGuide``), or None.
    """

    config: Any
    run_dir: Path
    storage: str
    name: str
    setup: TrialSetup
    study: Any
    define: Callable[[Any], dict[str, Any]]
    remaining: int
    deadline: float | None
    started: float
    resources: dict[str, float]
    guide: Callable[[Any], Any] | None = None

    def line(self, record: dict[str, Any]) -> None:
        """One console line: the trial's event and the search's counts so far."""
        done = records(self.run_dir)
        counts = {state: sum(r.get("state") == state for r in done) for state in (FINISHED, STOPPED, FAILED, INFEASIBLE, RUNNING)}
        best = next(iter(ranked_finished(done)), None)
        left = f", {max(self.deadline - time.time(), 0) / 60:.1f} min left to launch" if self.deadline else ""
        best_text = (f"best {best['psnr']:.3f} dB (validation) at {100 * best['fraction']:.3f}% (#{best['number']})"
                     if best else "no finished trial yet")
        print(
            f"[{(time.time() - self.started) / 60:5.1f} min] trial #{record['number']} {record['state'].lower()}"
            + (f" ({record.get('reason')})" if record.get("state") in (FAILED, "RETRIED") else "")
            + f" | finished {counts[FINISHED]}, stopped early {counts[STOPPED]}, failed {counts[FAILED]}, "
            f"running {counts[RUNNING]} of {self.config.trials} plans; {counts[INFEASIBLE]} over-budget draws skipped | "
            f"{best_text}{left}",
            flush=True,
        )


def scheduler_for(config, setup: TrialSetup):
    """The trial scheduler of a search, the result field it counts fidelity in, and ``setup`` with
    the pair-epochs where trials must score mid-pair.

    ``--fidelity pairs``: ASHA judges after each pair (rungs 1, 2, 4, ... pairs). ``epochs``: ASHA
    judges on pair-epochs, rungs grace x 2^k, the first a quarter of the way into a trial's first
    pair (judged earlier, a short fine-tuning's score says little); trials score on validation at
    the rungs inside a pair. Without ASHA (``--no-asha``, a multi-objective study, a single
    pair under ``pairs``): FIFO, every trial runs to the end.
    """
    units, epochs = len(setup.units), int(setup.epochs)
    if config.fidelity == "epochs":
        max_t, grace, time_attr = units * epochs, max(1, epochs // 4), "epochs_done"
    else:
        max_t, grace, time_attr = units, 1, "pairs_done"
    if not config.asha or config.objective == "multi" or max_t <= grace:
        return FIFOScheduler(), time_attr, setup
    if time_attr == "epochs_done":
        # ASHA's rungs at this reduction factor (its own list is private): grace, 2 grace, ... < max_t;
        # those inside a pair need a mid-pair score.
        rungs, at = [], grace
        while at < max_t:
            rungs.append(at)
            at *= 2
        setup = replace(setup, score_at=tuple(r for r in rungs if r % epochs))
    # On the fidelity done, not Tune's iteration count: a retried trial goes on from its checkpoint.
    return ASHAScheduler(time_attr=time_attr, max_t=max_t, grace_period=grace, reduction_factor=2), time_attr, setup


def run_trials(run: TuneRun) -> None:
    """Ray Tune over the remaining trials (nothing when none remain)."""
    if run.remaining <= 0:
        return
    config = run.config
    line = run.line if config.progress else None
    multi = config.objective == "multi"
    # The objective: the mean validation PSNR gain over No-FT, per pair; PSNR is kept beside it.
    metric, mode = (["gain", "fraction"], ["max", "min"]) if multi else ("gain", "max")

    def infeasible(trial_config: dict[str, Any]) -> None:
        record = new_record(trial_config, len(run.setup.units), state=INFEASIBLE, reason=trial_config["reason"])
        write_record(run.run_dir, trial_config["number"], record)
        if line is not None:
            line(record)

    scheduler, time_attr, setup = scheduler_for(config, run.setup)
    searcher = StudySearcher(run.study, run.define, metric=metric, mode=mode,
                             max_infeasible=MAX_INFEASIBLE_DRAWS_PER_TRIAL * run.remaining, on_infeasible=infeasible,
                             guide=run.guide, step=time_attr, make_sampler=lambda seed: make_sampler(config, seed),
                             seed=search_seed(config))
    search_alg = TrialLimiter(searcher, max_concurrent=config.concurrency, deadline_at=run.deadline, wanted=run.remaining)
    units = len(setup.units)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_trainable, setup=setup), run.resources),
        # The limiter ends the run (plans launched, deadline); this is the most trials it allows.
        tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, num_samples=run.remaining, reuse_actors=True,
                                    **({} if multi else {"metric": metric, "mode": mode})),
        run_config=tune.RunConfig(
            name=run.name, storage_path=run.storage, verbose=0,
            # Tune's CSV and JSON results, without its TensorBoard logger (_quiet_tune).
            callbacks=[RecordKeeper(run.run_dir, units, line), CSVLoggerCallback(), JsonLoggerCallback()],
            failure_config=tune.FailureConfig(max_failures=config.max_failures),
        ),
    )
    phase_started = time.time()
    with _quiet_tune():
        tuner.fit()
    _record_slots(run.run_dir, config, phase_started, time.time())
    if searcher.gave_up:
        print(f"stopping: {searcher.infeasible} plans drawn over the budget; raise the budget or narrow the space "
              "(see 'autopeft space --budget ... --sample N')", flush=True)


@contextmanager
def _quiet_tune():
    """Tune's own console output off for this run, which prints its progress itself: its experiment
    banner and TensorBoard hint (printed by its newer output engine at any verbosity), and its
    TensorBoard logger's warnings about the per-pair list in each result. Ray's documented
    environment switches, in this process only while the tuner runs; a value the user set is kept."""
    switches = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}
    saved = {name: os.environ.get(name) for name in switches}
    for name, value in switches.items():
        os.environ.setdefault(name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _record_slots(run_dir: Path, config, phase_started: float, phase_ended: float) -> None:
    """Slot utilisation of this session's trial phase: trial seconds over slots x wall time."""
    busy = 0.0
    for record in records(run_dir):
        begin, seconds = float(record.get("started") or 0.0), float(record.get("seconds") or 0.0)
        if record.get("state") != INFEASIBLE and begin >= phase_started:
            busy += min(seconds, max(phase_ended - begin, 0.0))
    wall = max(phase_ended - phase_started, 1e-9)
    slots = {"concurrency": config.concurrency, "phase_seconds": round(wall, 1), "trial_seconds": round(busy, 1),
             "busy_share": busy / (wall * max(config.concurrency or 1, 1))}
    path = run_dir / "slots.json"
    sessions = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
    atomic_write_json(path, sessions + [slots])
    if config.progress:
        print(f"trial slots {100 * slots['busy_share']:.0f}% busy over the trial phase ({slots['phase_seconds'] / 60:.1f} min, "
              f"{config.concurrency} slot(s))", flush=True)
