"""Drawing plans: the warm start's enqueued plans, and the define-by-run step every draw goes through."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from autopeft.search.priors import top_plans
from autopeft.search.sampler import search_seed

__all__ = ["warm_start", "plan_definer"]


def warm_start(study, space, prior_model, budget, config, *, preset_lr: float, train: dict[str, Any]) -> int:
    """Enqueue the plans with the best importance prior (``config.warm_start`` of them, or trials/4
    between 2 and 8); returns how many."""
    k = config.warm_start if config.warm_start is not None else max(2, min(8, config.trials // 4))
    # Warm-start plans learn at the preset's PEFT rate (that of `autopeft finetune` and the
    # references) unless the space sets its own default: the middle of a wide log range can be
    # several times too slow for a short fine-tuning.
    plans = top_plans(space, prior_model, budget, k=k, seed=search_seed(config), lr=preset_lr, train=train)
    for score, params, _plan in plans:
        study.enqueue_trial(params, user_attrs={"warm_start": True, "prior": score})
    return len(plans)


def plan_definer(space, counter, budget, prior_model, *, train: dict[str, Any],
                 portfolio: Sequence[Any] = ()) -> Callable[[Any], dict[str, Any]]:
    """The define-by-run step: an ``optuna.Trial`` -> the trial config a Ray trial runs (plan,
    counts, prior), with the budget constraint and user attributes set on the Optuna trial.

    A trial enqueued by :func:`autopeft.search.portfolio.enqueue_portfolio` (its ``portfolio``
    user attribute indexes ``portfolio``) trains that Table-1 row as written; its params, the
    row's projection onto the space, are still suggested so that the study records them."""

    def define(trial) -> dict[str, Any]:
        plan = space.suggest(trial, train=train)
        index = trial.user_attrs.get("portfolio")
        entry = portfolio[int(index)] if index is not None and int(index) < len(portfolio) else None
        if entry is not None:
            plan = entry.plan
        count = counter.count(plan)
        limit = budget.limit(count.total)
        trial.set_constraint("budget", float(count.trainable - limit))
        prior = prior_model.score(plan, count) if prior_model is not None else None
        trial.set_user_attr("fraction", count.fraction)
        trial.set_user_attr("trainable", count.trainable)
        if prior is not None:
            trial.set_user_attr("prior", prior)
        config = {"number": trial.number, "plan": plan.to_dict(), "params": dict(trial.params),
                  "trainable": count.trainable, "fraction": count.fraction, "feasible": count.trainable <= limit,
                  "prior": prior, "warm_start": bool(trial.user_attrs.get("warm_start", False)),
                  "portfolio": entry.name if entry is not None else None}
        if not config["feasible"]:  # kept in the study and, through the searcher, in the record
            config["reason"] = f"trains {100 * count.fraction:.3f}% of the parameters, over the budget"
            trial.set_user_attr("reason", config["reason"])
        return config

    return define
