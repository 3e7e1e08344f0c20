"""The search run on Ray: the engine (:func:`run_search`), Ray Tune's glue, the cluster, the source
models, the session and its study, and the evaluation protocol (a trial over every pair, the
references, the confirmation on test subjects).

The algorithm it runs (space, budget, priors, sampling) is :mod:`autopeft.search`, which needs no Ray.
What a run writes up at its end (results, best plan, tables, example slices) is handed in by the
caller as ``outputs`` (:class:`RunOutputs`; the report's ``SearchOutputs``): the runner never
imports the report.

Example:
    >>> from autopeft.report import SearchOutputs
    >>> from autopeft.runner import run_search
    >>> from autopeft.search import SearchConfig
    >>> run_search(SearchConfig(backbone="cvtgan", budget="1%"), outputs=SearchOutputs())  # doctest: +SKIP
"""

from __future__ import annotations

import importlib

__all__ = ["run_search", "RunOutputs", "SearchInterrupted"]

# Loaded on first use: the engine imports torch and Ray, which the CLI's --help does not need.
_LAZY = {"run_search": "engine", "RunOutputs": "engine", "SearchInterrupted": "engine"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"autopeft.runner.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'autopeft.runner' has no attribute {name!r}")
