"""A resumed session: what an interruption left RUNNING is told to the study and enqueued again."""

from __future__ import annotations

import optuna
import pytest

from autopeft.runner._session import requeue_interrupted
from autopeft.search._plans import plan_definer
from autopeft.search.budget import Budget, PlanCounter
from autopeft.search.portfolio import enqueue_portfolio, portfolio
from autopeft.search.space import load_space
from autopeft.backbones import build_backbone


@pytest.fixture(scope="module")
def cvtgan():
    template = build_backbone("cvtgan", "tiny")
    return load_space("cvtgan", template.sites()), PlanCounter(template)


def test_an_interrupted_portfolio_trial_is_requeued_as_the_same_row(cvtgan, tmp_path):
    space, counter = cvtgan
    budget = Budget.parse("1%")
    entries = portfolio(space, counter, budget, train={"epochs": 3})
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    enqueue_portfolio(study, entries[:1])
    define = plan_definer(space, counter, budget, None, train={"epochs": 3}, portfolio=entries)
    define(study.ask())  # RUNNING when the session died
    requeue_interrupted(tmp_path, study)
    again = define(study.ask())
    assert again["portfolio"] == entries[0].name and again["plan"] == entries[0].plan.to_dict()
