"""Library errors in command-line words.

The library names a setting by its field, in backticks (`` `budget` must be ...``); a command names
it by its flag. :func:`flag_errors` rewrites the fields a command has flags for in the
:class:`~autopeft.errors.ConfigError` raised inside it, so the library never needs to know which
command called it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from autopeft.errors import ConfigError

_FIELD = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")


def flags_of(config_class: type, **renamed: str) -> dict[str, str]:
    """Field -> flag of a config dataclass: ``--`` and the field with dashes, unless ``renamed``
    (which may also name arguments that are not fields, such as ``resume_dir``)."""
    return {**{f.name: "--" + f.name.replace("_", "-") for f in dataclasses.fields(config_class)}, **renamed}


def in_flags(message: str, flags: Mapping[str, str]) -> str:
    """``message`` with every `` `field` `` that has a flag written as the flag."""
    return _FIELD.sub(lambda m: flags.get(m.group(1), m.group(0)), message)


@contextmanager
def flag_errors(flags: Mapping[str, str]) -> Iterator[None]:
    """Re-raise a ConfigError from the block with its fields written as ``flags``."""
    try:
        yield
    except ConfigError as err:
        raise ConfigError(in_flags(str(err), flags)) from err
