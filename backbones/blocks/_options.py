"""Checking a preset's ``options`` against what a network's constructor accepts."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from autopeft.errors import ConfigError


def checked_options(owner: str, options: Mapping[str, Any], allowed: Iterable[str]) -> dict[str, Any]:
    """Return ``options`` as a dict after checking every key is one of ``allowed``.

    Args:
        owner: what the options configure, named in the error (``"unetr preset 'tiny'"``).
        options: the preset's options.
        allowed: the accepted keys.

    Raises:
        ConfigError: on an unknown key, naming the closest accepted one.
    """
    allowed = sorted(allowed)
    for key in options:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" By {key!r}, did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"Unknown option {key!r} for {owner}; accepted: {', '.join(allowed)}.{hint}"
            )
    return dict(options)
