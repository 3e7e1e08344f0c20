"""The baseline portfolio: PETITE's Table-1 rows within the budget, at a learning-rate ladder, as
the first trials of the study."""

from __future__ import annotations

import optuna
import pytest

from autopeft.search._plans import plan_definer
from autopeft.search.budget import Budget, PlanCounter
from autopeft.search.portfolio import enqueue_portfolio, full_ft_ladder, lr_ladder, portfolio, table1_plans
from autopeft.search.space import load_space
from autopeft.backbones import build_backbone


@pytest.fixture(scope="module")
def cvtgan():
    template = build_backbone("cvtgan", "tiny")
    return load_space("cvtgan", template.sites()), PlanCounter(template)


def test_the_ladder_spans_the_range_without_touching_its_ends():
    assert lr_ladder(1e-4, 1e-2) == pytest.approx((10 ** -3.6667, 1e-3, 10 ** -2.3333), rel=1e-3)
    assert lr_ladder(1e-3, 1e-1, steps=1) == pytest.approx((1e-2,))
    assert full_ft_ladder(5e-4)[1] == pytest.approx(5e-4)  # centred on the preset's Full-FT rate
    with pytest.raises(ValueError, match="`low` must be positive"):
        lr_ladder(1e-2, 1e-4)


def test_rows_over_the_budget_stay_out_and_each_row_runs_at_every_rung(cvtgan):
    space, counter = cvtgan
    budget = Budget.parse("1%")
    entries = portfolio(space, counter, budget, train={"epochs": 3})
    rows = {label for label, plan in table1_plans("cvtgan")
            if budget.allows(counter.count(plan).trainable, counter.count(plan).total)}
    assert rows and rows != {label for label, _ in table1_plans("cvtgan")}  # some rows do not fit 1% on tiny
    assert {e.label for e in entries} == rows
    assert len(entries) == 3 * len(rows)
    for entry in entries:
        assert entry.plan.train["lr"] == entry.lr == entry.params["lr"] and entry.plan.train["epochs"] == 3
        assert budget.allows(counter.count(entry.plan).trainable, counter.count(entry.plan).total)


def test_a_row_the_space_expresses_is_projected_exactly(cvtgan):
    space, counter = cvtgan
    entries = portfolio(space, counter, Budget.parse("1%"), train={"epochs": 3})
    bitfit = next(e for e in entries if e.label == "BitFit")
    assert bitfit.exact
    projected = space.plan_from_params(bitfit.params, train={"epochs": 3})
    assert counter.count(projected).trainable == counter.count(bitfit.plan).trainable
    vpt = next(e for e in entries if e.label == "VPT")  # 0/8/32 tokens per stage: not a choice of the space
    assert not vpt.exact and space.plan_from_params(vpt.params).sites  # ... but its nearest plan is VPT there


def test_portfolio_trials_come_first_in_the_study_and_train_the_row_itself(cvtgan):
    space, counter = cvtgan
    budget = Budget.parse("1%")
    entries = portfolio(space, counter, budget, train={"epochs": 3})
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    enqueue_portfolio(study, entries)
    define = plan_definer(space, counter, budget, None, train={"epochs": 3}, portfolio=entries)
    for entry in entries:
        trial = study.ask()
        config = define(trial)
        assert config["portfolio"] == entry.name and config["plan"] == entry.plan.to_dict()
        assert trial.params == pytest.approx(entry.params) and config["feasible"]
        study.tell(trial, 0.0)
    later = define(study.ask())  # the sampler's own draws follow
    assert later["portfolio"] is None
