"""LayerNorm tuning: train the affine parameters of the normalisation layers.

On ``vit`` sites these are the LayerNorms; on ``cnn`` sites the affine parameters of BatchNorm,
InstanceNorm, GroupNorm or LayerNorm layers (norms built without affine parameters have none and
are skipped). On ``vit`` sites other norms (CVT-GAN's BatchNorm3d after the depthwise q/k/v
convolutions) are left frozen: the method is LayerNorm tuning there, as in PETITE.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from autopeft.peft._targets import NORM_TYPES
from autopeft.peft.base import InjectContext, MethodConfig, PeftMethod, register_method

__all__ = ["LayerNormConfig", "LayerNormTuning"]


@dataclass(frozen=True)
class LayerNormConfig(MethodConfig):
    """No hyperparameters."""


@register_method
class LayerNormTuning(PeftMethod):
    """Trains the affine weight and bias of every norm layer in the site."""

    name = "layernorm"
    site_kinds = ("vit", "cnn")
    config_class = LayerNormConfig
    mergeable = True

    def inject(self, site, config: MethodConfig, context: InjectContext) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for module in site.module.modules():
            if site.kind == "vit" and not isinstance(module, nn.LayerNorm):
                continue
            if isinstance(module, NORM_TYPES):
                params.extend(p for p in module.parameters(recurse=False))
        return params
