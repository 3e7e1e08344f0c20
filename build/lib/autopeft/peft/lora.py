"""LoRA (Hu et al., ICLR 2022) on the layers of a site chosen by role.

``targets`` names roles (see :mod:`autopeft.peft._targets`): ``[q, k]`` is PETITE's choice (on
UNETR's fused ``qkv`` that is two thirds of the output rows, see
:class:`~autopeft.peft.lora_layers.LoraFusedQKV`), ``[qkv, out_proj, mlp]`` adapts all attention
and MLP linears, ``[conv]`` every convolution of a CNN block (grouped, depthwise and transposed
included). Each targeted layer is replaced by its LoRA wrapper, chosen by layer type; the update
starts at zero, so the network is unchanged at injection, and merges exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from autopeft.peft._targets import (
    CONV_TRANSPOSE_TYPES,
    PLAIN_CONV_TYPES,
    TARGET_ROLES,
    Target,
    site_targets,
)
from autopeft.peft.base import InjectContext, MethodConfig, PeftMethod, dispatch, register_method, replace_layer
from autopeft.peft.lora_layers import LoraConv, LoraConvTranspose, LoraFusedQKV, LoraLayer, LoraLinear

__all__ = ["LoraConfig", "Lora", "wrap_with_lora"]

_DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {"vit": ("q", "k"), "cnn": ("conv",)}


@dataclass(frozen=True)
class LoraConfig(MethodConfig):
    """Hyperparameters of LoRA."""

    rank: int = field(default=8, metadata={"help": "rank r of the update (per group for grouped convs)."})
    alpha: float | None = field(default=None, metadata={"help": "scaling numerator; update x alpha/r. Defaults to 2r."})
    targets: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": f"roles to adapt, among {TARGET_ROLES}. Defaults to [q, k] on vit, [conv] on cnn sites."},
    )
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch input."})

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"`rank` must be a positive integer, but got {self.rank!r}.")
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(2 * self.rank))
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"`alpha` must be a positive number, but got {self.alpha!r}.")
        if self.targets is not None:
            targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
            unknown = [t for t in targets if t not in TARGET_ROLES]
            if not targets or unknown:
                raise ValueError(f"`targets` must be a non-empty list among {list(TARGET_ROLES)}, but got {list(targets)}.")
            object.__setattr__(self, "targets", targets)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), but got {self.dropout!r}.")


def _linear(target: Target, config: LoraConfig) -> LoraLayer:
    if target.parts is not None:
        return LoraFusedQKV(target.layer, target.parts, config.rank, config.alpha, config.dropout)
    return LoraLinear(target.layer, config.rank, config.alpha, config.dropout)


def _conv(target: Target, config: LoraConfig) -> LoraLayer:
    return LoraConv(target.layer, config.rank, config.alpha, config.dropout)


def _conv_transpose(target: Target, config: LoraConfig) -> LoraLayer:
    return LoraConvTranspose(target.layer, config.rank, config.alpha, config.dropout)


# Dispatch by layer type, first match wins.
_LAYERS: tuple[tuple[type | tuple[type, ...], Callable[[Target, LoraConfig], LoraLayer]], ...] = (
    (nn.Linear, _linear),
    (PLAIN_CONV_TYPES, _conv),
    (CONV_TRANSPOSE_TYPES, _conv_transpose),
)


def wrap_with_lora(layer: nn.Module, config: LoraConfig, parts: tuple[str, ...] | None = None) -> LoraLayer:
    """Wrap one layer with the LoRA variant for its type (``parts`` for a fused qkv Linear)."""
    factory = dispatch(layer, [(t, f) for t, f in _LAYERS], "LoRA")
    return factory(Target("", layer, parts), config)


@register_method
class Lora(PeftMethod):
    """LoRA on the targeted layers of a site; trains only the new factors."""

    name = "lora"
    site_kinds = ("vit", "cnn")
    config_class = LoraConfig
    mergeable = True
    summary_fields = ("rank", "targets")  # alpha follows rank by default; dropout is rarely set

    def inject(self, site, config: LoraConfig, context: InjectContext) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for target in site_targets(site, config.targets or _DEFAULT_TARGETS[site.kind], context, "LoRA"):
            wrapper = wrap_with_lora(target.layer, config, target.parts)
            replace_layer(context, site.module, target.name, wrapper)
            params.extend(wrapper.lora_parameters())
        return params
