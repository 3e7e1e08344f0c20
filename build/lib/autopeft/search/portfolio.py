"""The baseline portfolio: the hand-made answers every search must beat, trained first.

A user's first question is whether the search beats what they would do by hand: take one of
PETITE's Table-1 methods for the backbone and tune its learning rate. So every search begins by
training, as ordinary trials of its study, each Table-1 row that fits the budget (LayerNorm,
BitFit, LoRA, Adapters, SSF, VPT and PETITE's winner, as ``autopeft/plans/`` defines them for the
backbone) at a small learning-rate ladder (:func:`lr_ladder`). The sampler learns from them, their
cost counts toward the search's, and the best of them by validation is confirmed on test beside
the recommended plan.

A row is trained exactly as the named plan says. The study records, as the trial's parameters,
the row's projection onto the space (:meth:`SearchSpace.params_near`): exact where the space can
express the row, the nearest plan it can express otherwise (the trial's ``portfolio_exact`` user
attribute says which), so that the sampler's model sees the row where it sits in the space.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from autopeft.peft import Plan, load_plan, named_plans

__all__ = ["TABLE1_ROWS", "PORTFOLIO_ATTRS", "PortfolioEntry", "table1_plans", "lr_ladder", "full_ft_ladder", "portfolio", "enqueue_portfolio"]

# PETITE's Table-1 PEFT rows, in the paper's order (named plans ``<backbone>-<row>``), then its
# Mix-PEFT winner (``petite-<backbone>``). No-FT and Full-FT are references, not rows to beat.
TABLE1_ROWS = ("layernorm", "bitfit", "lora", "adapters", "ssf", "vpt")
# The Optuna user attributes that make an enqueued trial a portfolio trial (kept when it is requeued).
PORTFOLIO_ATTRS = ("portfolio", "portfolio_name", "portfolio_exact")
_ROW_LABELS = {"layernorm": "LayerNorm", "bitfit": "BitFit", "lora": "LoRA", "adapters": "Adapters", "ssf": "SSF",
               "vpt": "VPT"}


def table1_plans(backbone: str) -> list[tuple[str, Plan]]:
    """(label, plan) of every Table-1 PEFT row the backbone ships a named plan for, then PETITE's
    winner for it."""
    shipped = named_plans()
    rows = [(_ROW_LABELS[row], load_plan(f"{backbone}-{row}")) for row in TABLE1_ROWS if f"{backbone}-{row}" in shipped]
    if f"petite-{backbone}" in shipped:
        rows.append(("PETITE", load_plan(f"petite-{backbone}")))
    return rows


def lr_ladder(low: float, high: float, steps: int = 3) -> tuple[float, ...]:
    """``steps`` learning rates spanning ``[low, high]`` on a log scale: the centres of equal log
    bins, so that no rung sits on an end of the range (where the space's own bounds were drawn
    half a decade beyond every measured optimum).

    >>> [f"{x:.3g}" for x in lr_ladder(1e-4, 1e-2)]
    ['0.000215', '0.001', '0.00464']
    """
    if not 0 < low < high:
        raise ValueError(f"`low` must be positive and below `high`, but got low={low}, high={high}.")
    if steps < 1:
        raise ValueError(f"`steps` must be at least 1, but got {steps}.")
    span = math.log(high / low)
    return tuple(float(low * math.exp(span * (2 * i + 1) / (2 * steps))) for i in range(steps))


@dataclass(frozen=True)
class PortfolioEntry:
    """One portfolio trial: a Table-1 row at one learning rate.

    Args:
        label: the row's label (``SSF``, ``PETITE``).
        lr: its learning rate.
        plan: the plan trained (the named plan, with ``train.lr`` and the search's epochs).
        params: the Optuna params recorded for it (the row's projection onto the space).
        exact: whether the space expresses the row exactly.
    """

    label: str
    lr: float
    plan: Plan
    params: dict[str, Any]
    exact: bool

    @property
    def name(self) -> str:
        """``SSF lr=0.001``: the row and its rate, as tables show it."""
        return f"{self.label} lr={self.lr:.2g}"


def portfolio(space, counter, budget, *, train: Mapping[str, Any], steps: int = 3) -> list[PortfolioEntry]:
    """Every Table-1 row of ``space.backbone`` that fits ``budget``, at :func:`lr_ladder` of the
    space's learning-rate range (the range's own choices when it is categorical, its value when
    fixed), row by row.

    Args:
        space: the search space (``autopeft.search.space.SearchSpace``).
        counter: counts a plan's trainable parameters (``PlanCounter``).
        budget: the parameter budget (``Budget``).
        train: training settings every trial gets (``{"epochs": ...}``).
        steps: rungs of the ladder. Defaults to 3.
    """
    rates = space.lr_values(steps)
    entries = []
    for label, row in table1_plans(space.backbone):
        count = counter.count(row)
        if not budget.allows(count.trainable, count.total):
            continue
        for lr in rates:
            plan = Plan.from_dict(dict(row.to_dict(), train={**dict(row.train), **dict(train), "lr": lr}))
            params, exact = space.params_near(plan, lr=lr)
            entries.append(PortfolioEntry(label, lr, plan, params, exact))
    return entries


def enqueue_portfolio(study, entries: Sequence[PortfolioEntry]) -> None:
    """Enqueue the portfolio in the study, before any other trial: the define step trains the row
    (``portfolio`` user attribute) instead of the projection."""
    for index, entry in enumerate(entries):
        study.enqueue_trial(entry.params, user_attrs=dict(zip(PORTFOLIO_ATTRS, (index, entry.name, entry.exact))))


def full_ft_ladder(preset_lr: float, steps: int = 3) -> tuple[float, ...]:
    """The Full-FT reference's learning rates: :func:`lr_ladder` over the two decades centred on
    the preset's Full-FT rate, so that Full-FT is tuned on validation as every searched plan is."""
    return lr_ladder(preset_lr / 10, preset_lr * 10, steps)
