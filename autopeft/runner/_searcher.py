"""The bridge between Ray Tune and the Optuna study, through Optuna's public ask / tell only.

Why not Ray's ``OptunaSearch``: it tells Optuna COMPLETE, with the last partial value, for a
trial the scheduler stopped early, so the sampler learned from one-pair means as if they were
final; and every plan over the budget cost a Ray trial to be recorded. Here:

- a plan over the budget is drawn again inside :meth:`StudySearcher.suggest`: the draw is told to
  the study as PRUNED, with its budget constraint and the reason kept (``trial.set_constraint``,
  user attributes), and never becomes a Ray trial nor carries an objective value. PRUNED, not
  FAIL, so that the sampler learns where the budget ends. That sampling step is
  :func:`autopeft.search.asking.ask_feasible`, Ray-free, which a benchmark's replay calls too;
- the fate of a trial is decided in one place, :func:`autopeft.runs.trial_state` (which the run's
  records follow too): every pair done is FINISHED (Optuna COMPLETE with the objective), fewer
  pairs is STOPPED (Optuna PRUNED, its running values reported as intermediate values, step =
  the fidelity done: pairs, or pair-epochs with ``--fidelity epochs``), an error is FAILED
  (Optuna FAIL).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import optuna
from ray.tune.search import Searcher

from autopeft.runs import FINISHED, STOPPED, trial_state
from autopeft.search.asking import ask_feasible

__all__ = ["StudySearcher"]


class StudySearcher(Searcher):
    """Ray Tune searcher over an Optuna study (ask / tell).

    Args:
        study: the Optuna study (its sampler proposes, warm-start trials enqueued in it first).
        define: turns an ``optuna.Trial`` into a trial config (``{"number", "plan", "feasible",
            ...}``), sampling the space and setting the budget constraint.
        metric: the reported metric(s) told to the study: one name, or names for a
            multi-objective study (in the study's direction order).
        mode: ``"max"`` / ``"min"`` (or a list), as Ray expects.
        max_infeasible: over-budget draws allowed in all before the search gives up.
        on_infeasible: called with the config of each over-budget draw (to record it).
        guide: called with the study before each ask; it may enqueue the plan to train next
            (:class:`autopeft.search.priors.PriorGuide`). Defaults to the sampler alone.
        step: the result field that counts the fidelity done, the intermediate values' step (the
            scheduler's time attribute). Defaults to ``pairs_done``.
        make_sampler: ``seed -> sampler`` of the study's kind, for the view a GPSampler draws on
            (:func:`autopeft.search.asking.ask`); a GPSampler caches its search space per study, so a view needs a
            sampler of its own. Defaults to None: a GPSampler draws on the study alone.
        seed: seeds the views' samplers (with the number of trials so far). Defaults to 0.
    """

    def __init__(self, study, define: Callable[[Any], dict[str, Any]], *, metric: str | list[str], mode: str | list[str],
                 max_infeasible: int, on_infeasible: Callable[[dict[str, Any]], None],
                 guide: Callable[[Any], Any] | None = None, step: str = "pairs_done",
                 make_sampler: Callable[[int], Any] | None = None, seed: int = 0) -> None:
        super().__init__(metric=metric if isinstance(metric, str) else None, mode=mode if isinstance(mode, str) else None)
        self._study = study
        self._define = define
        self._metrics = [metric] if isinstance(metric, str) else list(metric)
        self._max_infeasible = max_infeasible
        self._on_infeasible = on_infeasible
        self._guide = guide
        self._step = step
        self._make_sampler, self._seed = make_sampler, seed
        self._open: dict[str, Any] = {}  # Ray trial id -> its Optuna trial
        self._reported: dict[str, set[int]] = {}
        self.infeasible = 0
        self.gave_up = False

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        # The sampling step is Ray-free (autopeft.search.asking), shared with a benchmark's replay.
        trial, config, infeasible = ask_feasible(self._study, self._define, tries=self._max_infeasible - self.infeasible,
                                                 guide=self._guide, make_sampler=self._make_sampler, seed=self._seed,
                                                 on_infeasible=self._on_infeasible)
        self.infeasible += infeasible
        if trial is None:
            self.gave_up = True
            return Searcher.FINISHED
        self._open[trial_id] = trial
        return config

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self._report(trial_id, result)

    def _report(self, trial_id: str, result: Mapping[str, Any] | None) -> None:
        """Each running value as an intermediate value (step = the fidelity done). Ray
        hands the result that made the scheduler stop a trial to on_trial_complete only, hence
        this is called from both, once per step."""
        if len(self._metrics) > 1 or trial_id not in self._open or not result or result.get("error"):
            return  # Optuna takes intermediate values for single-objective studies only; a failure has none
        ot_trial = self._open[trial_id]
        value, step = result.get(self._metrics[0]), int(result.get(self._step, 0))
        if value is not None and step not in self._reported.setdefault(trial_id, set()):
            ot_trial.report(float(value), step=step)
            self._reported[trial_id].add(step)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if trial_id not in self._open:
            return
        self._report(trial_id, result)
        self._reported.pop(trial_id, None)
        ot_trial = self._open.pop(trial_id)
        state = trial_state(result, error)
        ot_trial.set_user_attr("state", state)
        ot_trial.set_user_attr("pairs_done", int((result or {}).get("pairs_done", 0)))
        ot_trial.set_user_attr("epochs_done", int((result or {}).get("epochs_done", 0)))
        ot_trial.set_user_attr("fidelity", float((result or {}).get("fidelity", 0.0)))
        if state == FINISHED:
            values = [float(result[m]) for m in self._metrics]
            self._study.tell(ot_trial, values if len(values) > 1 else values[0])
        elif state == STOPPED:
            self._study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)
        else:
            self._study.tell(ot_trial, state=optuna.trial.TrialState.FAIL)

    # The study (SQLite) and the trial records are the search's state; a resumed search reads
    # them, so Ray's searcher checkpoints are not needed (and the define closure does not pickle).
    def save(self, checkpoint_path: str) -> None:
        return None

    def restore(self, checkpoint_path: str) -> None:
        return None

