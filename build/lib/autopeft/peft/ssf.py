"""SSF (Lian et al., NeurIPS 2022): scale and shift the features a layer outputs.

``y = gamma * layer(x) + beta`` per output channel, ``gamma = 1`` and ``beta = 0`` at start. PETITE
puts SSF after the attention, the MLP and the norms of a ViT block, and after the convolutions and
norms of a CNN block. Here each SSF sits directly on the output of one layer, so that it always
folds into that layer's weight and bias at merge time:

- ``vit`` sites (default ``targets: [norm, out_proj, mlp_out]``): after every norm layer (the
  LayerNorms, and in CVT-GAN's blocks also the BatchNorms after the depthwise q/k/v projections), after the
  attention's output projection (the last linear map of multi-head attention; SSF "after MHSA") and
  after the MLP's last Linear (SSF "after the MLP"). Dropout placed between the projection and
  the residual sum then acts on the scaled output; in eval mode this is exactly "after".
- ``cnn`` sites (default ``targets: [conv, norm]``): after every (transposed) convolution and every
  norm layer. A norm built without affine parameters gets them at merge time (``gamma``, ``beta``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from autopeft.peft._targets import (
    CONV_TRANSPOSE_TYPES,
    CONV_TYPES,
    NORM_TYPES,
    PLAIN_CONV_TYPES,
    TARGET_ROLES,
    site_targets,
)
from autopeft.peft.base import InjectContext, MergeableLayer, MethodConfig, PeftMethod, dispatch, register_method, replace_layer

__all__ = ["SSFConfig", "SSF", "SSFLayer"]

_DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {"vit": ("norm", "out_proj", "mlp_out"), "cnn": ("conv", "norm")}


def _channels(layer: nn.Module) -> tuple[int, int]:
    """(number of output channels, dimension holding them) of a layer SSF can follow."""
    if isinstance(layer, nn.Linear):
        return layer.out_features, -1
    if isinstance(layer, nn.LayerNorm):
        return layer.normalized_shape[0], -1
    if isinstance(layer, CONV_TYPES):
        return layer.out_channels, 1
    if isinstance(layer, nn.GroupNorm):
        return layer.num_channels, 1
    return layer.num_features, 1  # BatchNorm / InstanceNorm


def _fold_rows(weight_rows: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor):
    """(scale * W per output row, scale * b + shift)."""
    new_bias = shift.clone() if bias is None else scale * bias + shift
    return weight_rows * scale.reshape(-1, *([1] * (weight_rows.dim() - 1))), new_bias


def _set(layer: nn.Module, name: str, value: torch.Tensor) -> None:
    current = getattr(layer, name, None)
    if isinstance(current, nn.Parameter):
        current.data.copy_(value)
    else:
        setattr(layer, name, nn.Parameter(value.detach().clone(), requires_grad=False))


def _fold_linear_or_conv(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    weight, bias = _fold_rows(layer.weight, layer.bias, scale, shift)
    _set(layer, "weight", weight)
    _set(layer, "bias", bias)


def _fold_conv_transpose(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    # Weight is C_in x C_out/g x k...; output channel o = group * (C_out/g) + local index.
    groups = layer.groups
    weight = layer.weight.reshape(groups, layer.in_channels // groups, layer.out_channels // groups, -1)
    weight = weight * scale.reshape(groups, 1, -1, 1)
    _set(layer, "weight", weight.reshape(layer.weight.shape))
    _set(layer, "bias", shift.clone() if layer.bias is None else scale * layer.bias + shift)


def _fold_norm(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    weight = getattr(layer, "weight", None)
    bias = getattr(layer, "bias", None)
    _set(layer, "weight", scale.clone() if weight is None else scale * weight)
    _set(layer, "bias", shift.clone() if bias is None else scale * bias + shift)
    if hasattr(layer, "affine"):
        layer.affine = True
    if hasattr(layer, "elementwise_affine"):
        layer.elementwise_affine = True


_FOLDS: tuple[tuple[type | tuple[type, ...], Callable[[nn.Module, torch.Tensor, torch.Tensor], None]], ...] = (
    ((nn.Linear,) + PLAIN_CONV_TYPES, _fold_linear_or_conv),
    (CONV_TRANSPOSE_TYPES, _fold_conv_transpose),
    (NORM_TYPES, _fold_norm),
)


class SSFLayer(MergeableLayer):
    """``gamma * base_layer(x) + beta`` over the base layer's output channels.

    Args:
        base_layer: a Linear, (transposed) convolution or norm layer.

    Shapes: as the base layer; channels are the last dim for Linear/LayerNorm
    (``B x N x C``) and dim 1 otherwise (``B x C x D x H x W``).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        dispatch(base_layer, _FOLDS, "SSF")  # fail early on a layer it could not merge into
        channels, self.channel_dim = _channels(base_layer)
        self.base_layer = base_layer
        reference = next(base_layer.parameters(), None)
        factory = {"device": reference.device, "dtype": reference.dtype} if reference is not None else {}
        self.ssf_scale = nn.Parameter(torch.ones(channels, **factory))
        self.ssf_shift = nn.Parameter(torch.zeros(channels, **factory))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.channel_dim == -1:
            return out * self.ssf_scale + self.ssf_shift
        shape = (-1,) + (1,) * (out.dim() - 2)
        return out * self.ssf_scale.reshape(shape) + self.ssf_shift.reshape(shape)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        fold = dispatch(self.base_layer, _FOLDS, "SSF")
        fold(self.base_layer, self.ssf_scale, self.ssf_shift)
        return self.base_layer


@dataclass(frozen=True)
class SSFConfig(MethodConfig):
    """Hyperparameters of SSF."""

    targets: tuple[str, ...] | None = field(
        default=None,
        metadata={
            "help": f"roles whose outputs are scaled and shifted, among {TARGET_ROLES}. "
            "Defaults to [norm, out_proj, mlp_out] on vit, [conv, norm] on cnn sites."
        },
    )

    def __post_init__(self) -> None:
        if self.targets is not None:
            targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
            unknown = [t for t in targets if t not in TARGET_ROLES]
            if not targets or unknown:
                raise ValueError(f"`targets` must be a non-empty list among {list(TARGET_ROLES)}, but got {list(targets)}.")
            object.__setattr__(self, "targets", targets)


@register_method
class SSF(PeftMethod):
    """SSF after the targeted layers of a site; trains only ``gamma`` and ``beta``."""

    name = "ssf"
    site_kinds = ("vit", "cnn")
    config_class = SSFConfig
    mergeable = True

    def inject(self, site, config: SSFConfig, context: InjectContext) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for target in site_targets(site, config.targets or _DEFAULT_TARGETS[site.kind], context, "SSF"):
            wrapper = SSFLayer(target.layer)
            replace_layer(context, site.module, target.name, wrapper)
            params.extend([wrapper.ssf_scale, wrapper.ssf_shift])
        return params
