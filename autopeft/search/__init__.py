"""The search algorithm: a declarative space of plans, a parameter budget, SH-PEFT priors, the
baseline portfolio, the warm start and the Optuna sampling step. Nothing here imports Ray: the
execution on Ray Tune is :mod:`autopeft.runner`.

>>> from autopeft.search import Budget
>>> Budget.parse("1%").fraction
0.01
"""

import importlib

from autopeft.search.options import PRIOR_CANDIDATES, PRIOR_SIGNALS, SAMPLERS

__all__ = ["Budget", "PlanCount", "PlanCounter", "SearchSpace", "load_space", "space_files", "SearchConfig",
           "resolve_defaults", "PRIOR_CANDIDATES", "PRIOR_SIGNALS", "SAMPLERS"]

# Names loaded on first use: they import torch, which the CLI's --help does not need.
_LAZY = {"Budget": "budget", "PlanCount": "budget", "PlanCounter": "budget", "SearchSpace": "space",
         "load_space": "space", "space_files": "space", "SearchConfig": "config", "resolve_defaults": "config"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"autopeft.search.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'autopeft.search' has no attribute {name!r}")
