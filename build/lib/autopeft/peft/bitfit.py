"""BitFit (Ben Zaken et al., ACL 2022): train only the bias terms.

On a site it trains every parameter called ``bias`` inside the site (linear, conv and norm biases).
The plan-level ``bitfit: true`` does the same over the whole network, on top of any other method;
:func:`bias_parameters` serves both. Biases are plain weights, so there is nothing to merge.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from autopeft.peft.base import InjectContext, MethodConfig, PeftMethod, register_method

__all__ = ["BitFitConfig", "BitFit", "bias_parameters"]


def bias_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Every parameter named ``bias`` under ``module``, in module order."""
    return [p for name, p in module.named_parameters() if name.rpartition(".")[2] == "bias"]


@dataclass(frozen=True)
class BitFitConfig(MethodConfig):
    """No hyperparameters."""


@register_method
class BitFit(PeftMethod):
    """Trains the site's biases."""

    name = "bitfit"
    site_kinds = ("vit", "cnn")
    config_class = BitFitConfig
    mergeable = True

    def inject(self, site, config: MethodConfig, context: InjectContext) -> list[nn.Parameter]:
        return bias_parameters(site.module)
