"""Bottleneck adapters (Houlsby et al. 2019), in Pfeiffer et al.'s placement (one per block, after the FFN).

``h -> h + up(act(down(h)))``, bottleneck width ``channels // reduction_factor``.

- ``vit`` sites: after the output of each MLP (``mlp``/``ffn`` module) of the block, i.e. on the
  FFN output before the block's residual sum; ``down``/``up`` are Linear over the last dim.
- ``cnn`` sites: after the whole block, on its ``B x C x D x H x W`` output; ``down``/``up`` are
  ``1x1x1`` Conv3d, i.e. the same per-voxel bottleneck over channels. ``C`` is the block's
  ``out_channels`` attribute when it has one (MONAI's blocks do not), otherwise the output
  channels of the last convolution registered in the block.

Initialisation: ``down`` random (PyTorch's default Linear/Conv init), ``up`` zero (weight and
bias), so the block starts as the pre-trained one and *both* projections receive gradients from
the first step. PETITE's code zeroed both, leaving the ``down`` weights with zero gradient for
ever (only ``up``'s bias could learn).

Adapters are non-linear, so :func:`autopeft.peft.merge_plan` leaves them in place. They are
attached as a child ``peft_adapter`` of the module they follow plus a forward hook, so the
pre-trained layers keep their names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from autopeft.errors import PlanError
from autopeft.peft._targets import CONV_TYPES, find_mlp_modules
from autopeft.peft.base import InjectContext, MethodConfig, PeftLayer, PeftMethod, register_method

__all__ = ["AdapterConfig", "Adapter", "BottleneckAdapter"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU}


class BottleneckAdapter(PeftLayer):
    """Residual bottleneck over channels, attached after a module by a forward hook.

    Args:
        channels: width of the features it adapts.
        reduction_factor: bottleneck width is ``max(1, channels // reduction_factor)``.
        channels_last: True for ``B x N x C`` tokens (Linear projections), False for
            ``B x C x D x H x W`` volumes (``1x1x1`` Conv3d projections).
        activation: ``relu`` (Pfeiffer) or ``gelu``. Defaults to ``relu``.
    """

    def __init__(self, channels: int, reduction_factor: int, channels_last: bool, activation: str = "relu") -> None:
        super().__init__()
        hidden = max(1, channels // reduction_factor)
        if channels_last:
            self.down: nn.Module = nn.Linear(channels, hidden)
            self.up: nn.Module = nn.Linear(hidden, channels)
        else:
            self.down = nn.Conv3d(channels, hidden, kernel_size=1)
            self.up = nn.Conv3d(hidden, channels, kernel_size=1)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.act = _ACTIVATIONS[activation]()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features + self.up(self.act(self.down(features)))

    def after_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook: adapt the output of the module it is registered on."""
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"An adapter follows a module returning one tensor, but {type(module).__name__} returned {type(output).__name__}.")
        return self(output)


@dataclass(frozen=True)
class AdapterConfig(MethodConfig):
    """Hyperparameters of the bottleneck adapter."""

    reduction_factor: int = field(default=8, metadata={"help": "bottleneck width = channels // reduction_factor."})
    activation: str = field(default="relu", metadata={"help": f"bottleneck non-linearity, one of {list(_ACTIVATIONS)}."})

    def __post_init__(self) -> None:
        if isinstance(self.reduction_factor, bool) or not isinstance(self.reduction_factor, int) or self.reduction_factor < 1:
            raise ValueError(f"`reduction_factor` must be a positive integer, but got {self.reduction_factor!r}.")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"`activation` must be one of {list(_ACTIVATIONS)}, but got {self.activation!r}.")


def _block_out_channels(block: nn.Module) -> int | None:
    declared = getattr(block, "out_channels", None)
    if isinstance(declared, int):
        return declared
    convs = [m for m in block.modules() if isinstance(m, CONV_TYPES)]
    return convs[-1].out_channels if convs else None


def _mlp_width(mlp: nn.Module) -> int | None:
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def _attach(module: nn.Module, adapter: BottleneckAdapter) -> None:
    module.add_module("peft_adapter", adapter)
    module.register_forward_hook(adapter.after_hook)


@register_method
class Adapter(PeftMethod):
    """Pfeiffer adapter after the FFN (vit) or a 1x1x1 conv adapter after the block (cnn)."""

    name = "adapter"
    site_kinds = ("vit", "cnn")
    config_class = AdapterConfig
    summary_fields = ("reduction_factor",)
    mergeable = False

    def inject(self, site, config: AdapterConfig, context: InjectContext) -> list[nn.Parameter]:
        if site.kind == "vit":
            places = [(mlp, _mlp_width(mlp), True) for _, mlp in find_mlp_modules(site.module)]
            if not places:
                raise PlanError(f"Adapter needs an `mlp`/`ffn` module in vit site {site.name!r}, but it has none.")
        else:
            places = [(site.module, _block_out_channels(site.module), False)]
        params: list[nn.Parameter] = []
        for module, channels, channels_last in places:
            if channels is None:
                raise PlanError(
                    f"Adapter cannot tell the output width of {type(module).__name__} in site {site.name!r}; "
                    "give the block an integer `out_channels` attribute."
                )
            if hasattr(module, "peft_adapter"):
                raise PlanError(f"Site {site.name!r} already has an adapter; apply a plan to a fresh model.")
            reference = next(module.parameters())
            adapter = BottleneckAdapter(channels, config.reduction_factor, channels_last, config.activation)
            adapter.to(device=reference.device, dtype=reference.dtype)
            _attach(module, adapter)
            params.extend(adapter.parameters())
        return params
