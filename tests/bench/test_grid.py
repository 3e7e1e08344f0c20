"""PETITE's grid (bench/_grid.py), the benchmarks' reference: 21 distinct plans that apply."""

from __future__ import annotations

import pytest

from _grid import grid_plans
from autopeft.search import PlanCounter
from autopeft.backbones import build_backbone


@pytest.mark.parametrize("backbone", ["unetr", "cvtgan"])
def test_petite_grid_has_21_distinct_plans_that_apply(backbone):
    plans = grid_plans(backbone)
    assert len(plans) == 21 and len({p.to_yaml() for p in plans}) == 21
    counter = PlanCounter(build_backbone(backbone, "tiny"))
    assert all(counter.count(plan).trainable > 0 for plan in plans)
    winner = {"unetr": "lora-ssf+bitfit", "cvtgan": "vpt-lora+bitfit"}[backbone]
    assert winner in {p.name for p in plans}
