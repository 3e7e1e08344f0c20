"""No-FT on a site: nothing in it trains (a placeholder choice in search spaces and Mix-PEFT).

A whole-network No-FT is the empty plan (no sites, ``bitfit: false``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from autopeft.peft.base import InjectContext, MethodConfig, PeftMethod, register_method

__all__ = ["FrozenConfig", "Frozen"]


@dataclass(frozen=True)
class FrozenConfig(MethodConfig):
    """No hyperparameters."""


@register_method
class Frozen(PeftMethod):
    """Leaves the site frozen."""

    name = "none"
    site_kinds = ("vit", "cnn")
    config_class = FrozenConfig
    mergeable = True
    trains_nothing = True

    def inject(self, site, config: MethodConfig, context: InjectContext) -> list[nn.Parameter]:
        return []
