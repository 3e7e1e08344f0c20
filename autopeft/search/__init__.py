"""The search: a declarative space of plans, a parameter budget, SH-PEFT priors, and the Ray Tune +
Optuna engine that fine-tunes sampled plans across scanner pairs.

>>> from autopeft.search import Budget
>>> Budget.parse("1%").fraction
0.01
"""

from autopeft.search.budget import Budget, PlanCount, PlanCounter
from autopeft.search.space import SearchSpace, load_space, space_files

__all__ = ["Budget", "PlanCount", "PlanCounter", "SearchSpace", "load_space", "space_files", "SearchConfig", "run_search",
           "resolve_defaults"]


def __getattr__(name: str):
    # The engine imports Ray and torch-heavy modules: load it on first use only.
    if name in ("SearchConfig", "run_search", "resolve_defaults"):
        from autopeft.search import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'autopeft.search' has no attribute {name!r}")
