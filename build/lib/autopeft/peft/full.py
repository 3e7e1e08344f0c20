"""Full fine-tuning of a site: every parameter of the site's module trains.

Full-FT of the whole network is the plan-level ``full_ft: true`` (it also trains what lies outside
any site: patch embedding, stem, output head).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from autopeft.peft.base import InjectContext, MethodConfig, PeftMethod, register_method

__all__ = ["FullConfig", "Full"]


@dataclass(frozen=True)
class FullConfig(MethodConfig):
    """No hyperparameters."""


@register_method
class Full(PeftMethod):
    """Trains every parameter of the site; nothing is added, so it is trivially merged."""

    name = "full"
    site_kinds = ("vit", "cnn")
    config_class = FullConfig
    mergeable = True

    def inject(self, site, config: MethodConfig, context: InjectContext) -> list[nn.Parameter]:
        return list(site.module.parameters())
