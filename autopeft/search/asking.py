"""Drawing the next plan to train from an Optuna study, without Ray: the searcher's sampling step.

:class:`~autopeft.runner._searcher.StudySearcher` (inside Ray Tune) and a benchmark's replay
(an in-memory study driven in a loop) draw plans the same way, through :func:`ask_feasible`:

1. the guide (:class:`~autopeft.search.priors.PriorGuide`), if any, may enqueue the next plan;
2. the study's next trial is asked (:func:`ask`; a GPSampler draws on :func:`gp_view`);
3. the define-by-run step (:func:`autopeft.search._plans.plan_definer`) samples the plan and sets
   its budget constraint; a plan over the budget is told to the study as PRUNED, with no value
   (:func:`tell_infeasible`), and drawn again. PRUNED, not FAIL: TPE reads PRUNED trials and
   ranks those with a positive constraint below every feasible one, so it learns where the budget
   ends (a FAIL it never reads, and it drew there again and again).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna

__all__ = ["ask", "ask_feasible", "gp_view", "tell_infeasible"]


def ask(study, define: Callable[[Any], dict[str, Any]], *, make_sampler: Callable[[int], Any] | None = None,
        seed: int = 0):
    """The study's next trial, drawn where the sampler knows of the over-budget draws.

    TPESampler reads COMPLETE and PRUNED trials, so the PRUNED draws steer it as they are.
    GPSampler reads COMPLETE trials only: for it the plan is drawn on an in-memory view of the
    study (:func:`gp_view`, a sampler of its own from ``make_sampler(seed * 100003 + trials)``)
    and enqueued in the study, whose over-budget draws stay PRUNED, with no value.
    """
    view = None
    if make_sampler is not None and isinstance(study.sampler, optuna.samplers.GPSampler) \
            and not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
        view = gp_view(study, make_sampler(seed * 100_003 + len(study.get_trials(deepcopy=False))))
    if view is not None:
        drawn = view.ask()
        define(drawn)  # the define-by-run step draws the plan's parameters
        study.enqueue_trial(dict(drawn.params))
    return study.ask()


def tell_infeasible(study, trial) -> None:
    """Tell ``study`` that ``trial`` drew a plan over the budget: PRUNED with no value, its user
    attribute ``state`` INFEASIBLE (its constraint and reason were set by the define step)."""
    trial.set_user_attr("state", "INFEASIBLE")
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)


def ask_feasible(study, define: Callable[[Any], dict[str, Any]], *, tries: int,
                 guide: Callable[[Any], Any] | None = None, make_sampler: Callable[[int], Any] | None = None,
                 seed: int = 0, on_infeasible: Callable[[dict[str, Any]], None] | None = None,
                 ) -> tuple[Any, dict[str, Any] | None, int]:
    """Draw until a plan within the budget comes, at most ``tries`` draws.

    Args:
        study: the Optuna study.
        define: the define-by-run step: an ``optuna.Trial`` -> its config (``"feasible"`` says
            whether it is within the budget).
        tries: the most draws; 0 draws nothing.
        guide: called with the study before each draw (it may enqueue the plan to train next).
        make_sampler: ``seed -> sampler`` of the study's kind, for a GPSampler's view (:func:`ask`).
        seed: seeds the views' samplers. Defaults to 0.
        on_infeasible: called with the config of each over-budget draw (to record it).

    Returns:
        ``(trial, config, infeasible)``: the open trial and its config (None, None when every
        draw was over the budget) and how many draws were.
    """
    infeasible = 0
    while infeasible < tries:
        if guide is not None:
            guide(study)
        trial = ask(study, define, make_sampler=make_sampler, seed=seed)
        config = define(trial)
        if config["feasible"]:
            return trial, config, infeasible
        infeasible += 1
        tell_infeasible(study, trial)
        if on_infeasible is not None:
            on_infeasible(config)
    return None, None, infeasible


def gp_view(study, sampler):
    """An in-memory copy of ``study`` for ``sampler`` (a GPSampler) to draw on, or None when it would
    change nothing.

    Each over-budget draw (PRUNED, positive constraint) becomes COMPLETE at the worst value of the
    study's COMPLETE trials, constraint kept: GPSampler then models the constraint (constrained
    expected improvement) and stops proposing plans over the budget. The stand-in value lives
    in this copy only; without a COMPLETE trial there is none to take (GPSampler is still
    drawing at random then).
    """
    TrialState = optuna.trial.TrialState
    history = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
    complete = [t for t in history if t.state == TrialState.COMPLETE]
    over = {t.number for t in history if t.state == TrialState.PRUNED and any(v > 0 for v in t.constraints.values())}
    if not complete or not over:
        return None
    worst = [max(values) if direction == optuna.study.StudyDirection.MINIMIZE else min(values)
             for direction, values in zip(study.directions, zip(*(t.values for t in complete)))]
    view = optuna.create_study(directions=study.directions, sampler=sampler)
    view.add_trials([t if t.number not in over else
                     optuna.trial.create_trial(values=worst, params=t.params, distributions=t.distributions,
                                               constraints=t.constraints)
                     for t in history])
    return view
