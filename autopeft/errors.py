"""Errors autopeft raises for problems in what a user hands it.

Each message names the file, field or argument at fault and says how to fix it. The command line
prints these as one line without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["AutopeftError", "DataError", "CheckpointError", "PlanError", "ConfigError", "did_you_mean"]


class AutopeftError(Exception):
    """Base class: a user-facing problem with a message that says what to do."""


class DataError(AutopeftError, ValueError):
    """A scan, manifest row or data directory that cannot be used as given."""


class CheckpointError(AutopeftError, ValueError):
    """A checkpoint that is missing, corrupt, or does not match the model it is loaded into."""


class PlanError(AutopeftError, ValueError):
    """A PEFT plan that cannot be applied to the backbone it names."""


class ConfigError(AutopeftError, ValueError):
    """A bad option value (preset, scanner id, budget, ...)."""


def did_you_mean(value: object, valid: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the valid name closest to ``value``, else "": the one hint every
    message about a misspelt name ends its first clause with."""
    close = difflib.get_close_matches(str(value), [str(v) for v in valid], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
