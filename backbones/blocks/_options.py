"""Checking a preset's ``options`` against what a network's constructor accepts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from autopeft.errors import ConfigError, did_you_mean


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
            raise ConfigError(f"Unknown option {key!r}{did_you_mean(key, allowed)} for {owner}; accepted: {', '.join(allowed)}.")
    return dict(options)
