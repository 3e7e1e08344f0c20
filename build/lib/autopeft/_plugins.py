"""Methods and backbones from outside autopeft, in every process that looks one up.

A third-party PEFT method or backbone registers itself when its module is imported
(``@register_method``, ``@register_backbone``). A search trains in other processes (Ray workers),
which import autopeft but not the user's module, so a plan naming the method would not load there.
Name such modules in ``AUTOPEFT_PLUGINS`` (comma-separated, importable in every process): each
process imports them before its first look-up. Local Ray workers inherit the environment.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

from autopeft.errors import ConfigError

PLUGINS_ENV = "AUTOPEFT_PLUGINS"


def load_plugins() -> None:
    """Import every module ``$AUTOPEFT_PLUGINS`` names (once: imported modules are skipped).

    Raises:
        ConfigError: a module that cannot be imported, naming it and the variable.
    """
    for name in (n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",")):
        if not name or name in sys.modules:  # in sys.modules: imported, or being imported now
            continue
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ConfigError(
                f"${PLUGINS_ENV} names {name!r}, which cannot be imported ({err}); put it on the Python path "
                f"of every process or remove it from {PLUGINS_ENV}."
            ) from err


def load_registry(builtin_modules: Sequence[str]) -> None:
    """The one way a registry fills itself before a look-up: import its built-in modules (their
    registration decorators run on import), then the plug-ins of ``$AUTOPEFT_PLUGINS``.

    Both registries (PEFT methods, backbones) call this; importing is done here, not at the top
    of the registries, because the built-in modules import their registry's base module.
    """
    for name in builtin_modules:
        importlib.import_module(name)
    load_plugins()
