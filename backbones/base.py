"""What every backbone provides: an image-to-image network with named PEFT sites.

A *site* is a block where a PEFT method can go. It has a dotted name (``encoder.vit.3``), a role
in the encoder-decoder (``encoder``/``bottleneck``/``decoder``), a kind (``vit`` for a block with
attention, ``cnn`` for a convolutional block) and the ``nn.Module`` that implements it. Sites never
nest: a module belongs to at most one site.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from autopeft._plugins import load_registry
from autopeft.errors import ConfigError, did_you_mean

__all__ = [
    "Site", "PretrainSchedule", "FinetuneSchedule", "Preset", "Backbone", "register_backbone", "build_backbone",
    "registered_backbones",
]

Role = Literal["encoder", "bottleneck", "decoder"]
Kind = Literal["vit", "cnn"]
ROLES: tuple[str, ...] = ("encoder", "bottleneck", "decoder")
KINDS: tuple[str, ...] = ("vit", "cnn")


@dataclass(frozen=True, eq=False)
class Site:
    """A named place in a backbone where PEFT can be applied.

    Args:
        name: dotted, unique within the backbone, e.g. ``encoder.vit.3``. Plans address sites by
            this name or by glob patterns over it (``encoder.*``).
        role: ``encoder``, ``bottleneck`` or ``decoder``.
        kind: ``vit`` (a block with attention) or ``cnn`` (a convolutional block).
        module: the module implementing the block.
        stage: index of the resolution stage the block belongs to, counted from the input
            (0 = full resolution); used by methods that act "from stage k on" (VPT-shallow).
    """

    name: str
    role: Role
    kind: Kind
    module: nn.Module = field(repr=False)
    stage: int = 0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"`role` must be one of {ROLES}, but got {self.role!r}.")
        if self.kind not in KINDS:
            raise ValueError(f"`kind` must be one of {KINDS}, but got {self.kind!r}.")


@dataclass(frozen=True)
class PretrainSchedule:
    """How a preset pre-trains a source model when the caller does not say: epochs, learning rate,
    crops. The batch is the preset's ``batch_size``.

    Args:
        epochs: pre-training epochs. Defaults to 120 (CPU-scaled: a tiny source model in minutes on
            2 CPU cores).
        lr: AdamW learning rate. Defaults to 2e-3.
        crops_per_volume: random training crops per volume and epoch. Defaults to 4.
    """

    # 120: on the tiny presets validation PSNR still rises there, and at 40 epochs the UNETR source
    # model did worse than the input scan on scanner 5.
    epochs: int = 120
    lr: float = 2e-3
    crops_per_volume: int = 4

    @classmethod
    def paper(cls) -> PretrainSchedule:
        """PETITE's pre-training: 1000 epochs at lr 1e-4, one crop per volume and epoch."""
        return cls(epochs=1000, lr=1e-4, crops_per_volume=1)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.crops_per_volume < 1:
            raise ValueError(f"`epochs` and `crops_per_volume` must be >= 1, but got {self}.")
        if self.lr <= 0:
            raise ValueError(f"`lr` must be positive, but got {self}.")


@dataclass(frozen=True)
class FinetuneSchedule:
    """How a preset fine-tunes when a plan does not say: epochs, learning rates, crops.

    Args:
        epochs: fine-tuning epochs. Defaults to 20 (CPU-scaled).
        lr_peft: AdamW learning rate of PEFT plans. Defaults to 2e-3.
        lr_full: AdamW learning rate of Full-FT plans. Defaults to 5e-4.
        crops_per_volume: random training crops per volume and epoch. Defaults to 1.
    """

    epochs: int = 20
    lr_peft: float = 2e-3
    lr_full: float = 5e-4
    crops_per_volume: int = 1

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.crops_per_volume < 1:
            raise ValueError(f"`epochs` must be >= 0 and `crops_per_volume` >= 1, but got {self}.")
        if self.lr_peft <= 0 or self.lr_full <= 0:
            raise ValueError(f"learning rates must be positive, but got {self}.")


@dataclass(frozen=True)
class Preset:
    """Sizes of one backbone configuration, and how it pre-trains and fine-tunes by default.

    Args:
        name: ``tiny`` (CPU, seconds per epoch) or ``paper`` (PETITE's sizes, GPU); a plug-in
            names its own.
        crop_size: training crop, D x H x W voxels.
        batch_size: training batch size (pre-training and fine-tuning).
        options: constructor arguments of the network for this preset.
        finetune: the fine-tuning schedule a plan without its own ``train`` values gets.
            Defaults to ``FinetuneSchedule()`` (CPU-scaled).
        pretrain: the pre-training schedule of source models when no ``epochs``/``lr`` are given.
            Defaults to ``PretrainSchedule()`` (CPU-scaled), never to the paper's 1000 epochs.
    """

    name: str
    crop_size: tuple[int, int, int]
    batch_size: int
    options: dict = field(default_factory=dict)
    finetune: FinetuneSchedule = FinetuneSchedule()
    pretrain: PretrainSchedule = PretrainSchedule()


class Backbone(nn.Module):
    """An image-to-image network (``B x 1 x D x H x W -> B x 1 x D x H x W``) with named sites.

    Subclasses set ``self.net`` (the network that is fine-tuned; its parameters are what trainable
    fractions are counted against) and, for adversarial backbones, ``self.discriminator``
    (``B x 2 x D x H x W -> B x 1 x d x h x w`` patch logits, no sigmoid: losses apply
    ``BCEWithLogitsLoss``; pre-trained, then frozen) and :meth:`discriminator_loss`. The loss the
    network trains with is :meth:`generator_loss` (L1 unless overridden); ``loss`` names it in
    listings. ``in_channels`` is what a probe of the network feeds it (1 for scans; a network by
    reference may declare more, for inspection only).
    """

    name: str = ""
    loss: str = "l1"
    in_channels: int = 1

    def generator_loss(self, short: torch.Tensor, long: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """The loss the network minimises for its prediction ``fake`` of ``long`` from ``short``
        (each ``B x 1 x D x H x W``). Defaults to the L1 loss between ``fake`` and ``long``."""
        return F.l1_loss(fake, long)

    def discriminator_loss(self, short: torch.Tensor, long: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """The loss ``self.discriminator`` minimises (``fake`` detached); adversarial backbones only."""
        raise NotImplementedError(f"Backbone {self.name!r} has no discriminator loss.")

    def __init__(self, preset: Preset) -> None:
        super().__init__()
        self.preset = preset
        self.discriminator: nn.Module | None = None

    @property
    def net(self) -> nn.Module:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a short scan ``B x 1 x D x H x W`` to a long-scan estimate of the same shape."""
        return self.net(x)

    def sites(self) -> list[Site]:
        """The PEFT sites of ``self.net``, encoder first, in forward order."""
        raise NotImplementedError

    def site(self, name: str) -> Site:
        for candidate in self.sites():
            if candidate.name == name:
                return candidate
        names = [s.name for s in self.sites()]
        raise ConfigError(f"No site named {name!r}{did_you_mean(name, names)} in backbone {self.name!r}; sites: {', '.join(names)}.")


_REGISTRY: dict[str, tuple[Callable[[Preset], Backbone], dict[str, Preset]]] = {}


def register_backbone(name: str, presets: dict[str, Preset]) -> Callable:
    """Class or factory decorator that registers a backbone under ``name`` with its presets.

    A third-party backbone registers itself the same way, without touching autopeft::

        @register_backbone("mynet", {"tiny": Preset("tiny", (32, 32, 32), 2, {...})})
        class MyNet(Backbone): ...
    """

    def decorator(factory: Callable[[Preset], Backbone]) -> Callable[[Preset], Backbone]:
        if name in _REGISTRY:
            raise ValueError(f"A backbone named {name!r} is already registered.")
        for key, preset in presets.items():
            if key != preset.name:
                raise ValueError(f"Preset key {key!r} differs from its name {preset.name!r}.")
        _REGISTRY[name] = (factory, dict(presets))
        return factory

    return decorator


def registered_backbones() -> dict[str, dict[str, Preset]]:
    """Name -> presets of every registered backbone."""
    _load_builtin()
    return {name: dict(presets) for name, (_, presets) in _REGISTRY.items()}


def build_backbone(name: str, preset: str | Preset = "tiny") -> Backbone:
    """Build a registered backbone with freshly initialised weights.

    Args:
        name: a registered backbone (``unetr``, ``cvtgan``, or one registered by a plug-in).
        preset: a preset name of that backbone, or a ``Preset``. Defaults to ``tiny``.
    """
    _load_builtin()
    if name not in _REGISTRY:
        hint = " (a network by reference is registered by the command that names it: --backbone with --net-args)" if ":" in name else ""
        raise ConfigError(f"Unknown backbone {name!r}{did_you_mean(name, _REGISTRY)}{hint}; registered: {', '.join(sorted(_REGISTRY))}.")
    factory, presets = _REGISTRY[name]
    if isinstance(preset, str):
        if preset not in presets:
            raise ConfigError(f"Backbone {name!r} has no preset {preset!r}{did_you_mean(preset, presets)}; presets: {', '.join(presets)}.")
        preset = presets[preset]
    model = factory(preset)
    model.name = name
    return model


_BUILTIN_MODULES: tuple[str, ...] = ("autopeft.backbones.cvtgan", "autopeft.backbones.unetr")


def _load_builtin() -> None:
    load_registry(_BUILTIN_MODULES)  # and third-party backbones ($AUTOPEFT_PLUGINS), also in Ray workers
    # Lazy: network.py builds on this module (Backbone, register_backbone).
    from autopeft.backbones.network import load_networks

    load_networks()  # users' networks by reference ($AUTOPEFT_NETWORKS), also in Ray workers
