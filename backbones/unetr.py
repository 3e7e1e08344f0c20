"""UNETR (Hatamizadeh et al., WACV 2022) as a backbone: MONAI's ``monai.networks.nets.UNETR``, wrapped.

A ViT encoder (16^3 patches, 12 pre-norm transformer blocks) whose hidden states 3, 6 and 9 feed CNN
skip paths, and a CNN decoder that upsamples back to the input resolution. Trained with an L1
loss (``loss = "l1"``) between the output and the long scan.

Global residual (``residual: True``, the default in both presets): the output is ``x + UNETR(x)``,
so UNETR predicts the correction from the short scan to the long scan, as CVT-GAN's generator
does. PETITE used UNETR's output directly; with the residual the network starts near the identity
map and learns the denoising in far fewer steps, which matters on a CPU budget. It adds no
parameters; set ``residual: False`` in a preset for PETITE's form.

Sites (names keep MONAI's numbering, so ``encoder.cnn.2`` is ``unetr.encoder2``):

=================  ========================  ====  =====  =========================================
site               module                    kind  stage  what it is
=================  ========================  ====  =====  =========================================
encoder.vit.0..11  ``unetr.vit.blocks[i]``   vit   4      transformer block on 1/16-scale tokens
encoder.cnn.1      ``unetr.encoder1``        cnn   0      residual conv block on the input
encoder.cnn.2..4   ``unetr.encoder2..4``     cnn   1..3   upsampling skip paths from hidden states
decoder.cnn.5..2   ``unetr.decoder5..2``     cnn   3..0   upsample + concat skip + residual conv
=================  ========================  ====  =====  =========================================

``stage`` is the resolution level of the block's output, ``log2(input side / block side)``.

Not sites: the patch embedding with its learned position embedding, the ViT's final LayerNorm,
and the 1x1 output convolution ``unetr.out`` (``feature_size + 1`` parameters, 33 at the paper
preset). The output layer is left out on purpose: it is already as small as any PEFT module one
could attach to it (a rank-1 LoRA on a 32 -> 1 map has 33 parameters), and its bias is reached by
BitFit. The position embedding fixes the input size: UNETR only accepts inputs of the preset's crop
size (sliding-window inference feeds exactly that).

Presets: ``paper`` is PETITE's setting (hidden 768, MLP 3072, 12 heads, feature size 32, instance
norm, residual blocks; 64^3 crops, batch 6; 101,688,481 parameters); ``tiny`` keeps the topology
with hidden 96, MLP 384, 4 heads and feature size 8 on 32^3 crops (2,440,585 parameters).
"""

from __future__ import annotations

import math

import torch
from monai.networks.nets import UNETR

from autopeft.errors import ConfigError
from autopeft.backbones.base import Backbone, FinetuneSchedule, Preset, PretrainSchedule, Site, register_backbone
from autopeft.backbones.blocks._options import checked_options

__all__ = ["UNETRBackbone", "PRESETS"]

_PATCH_SIZE = 16  # fixed inside MONAI's UNETR

_PAPER_OPTIONS = {
    "feature_size": 32,
    "hidden_size": 768,
    "mlp_dim": 3072,
    "num_heads": 12,
    "norm_name": "instance",
    "res_block": True,
    "conv_block": True,
    "dropout_rate": 0.0,
}

PRESETS: dict[str, Preset] = {
    # PETITE pre-trains for 1000 epochs (lr 1e-4) and fine-tunes UNETR for 200 epochs, lr 1e-3
    # (PEFT) and 1e-4 (Full-FT).
    "paper": Preset("paper", (64, 64, 64), 6, dict(_PAPER_OPTIONS),
                    FinetuneSchedule(epochs=200, lr_peft=1e-3, lr_full=1e-4), PretrainSchedule.paper()),
    "tiny": Preset(
        "tiny",
        (32, 32, 32),
        2,
        {**_PAPER_OPTIONS, "feature_size": 8, "hidden_size": 96, "mlp_dim": 384, "num_heads": 4},
        pretrain=PretrainSchedule(),  # CPU-scaled
    ),
}

# Constructor arguments of MONAI's UNETR that a preset may set; channels and image size are ours.
_ALLOWED_OPTIONS = (
    "feature_size hidden_size mlp_dim num_heads proj_type norm_name conv_block res_block dropout_rate qkv_bias"
    " residual"
).split()


@register_backbone("unetr", PRESETS)
class UNETRBackbone(Backbone):
    """MONAI's UNETR for ``B x 1 x D x H x W`` -> ``B x 1 x D x H x W`` with ``D x H x W`` the crop.

    Args:
        preset: ``crop_size`` becomes UNETR's ``img_size`` (sides multiples of 16); ``options``
            are UNETR constructor arguments (``feature_size``, ``hidden_size``, ``mlp_dim``,
            ``num_heads``, ``norm_name``, ``res_block``, ...).

    >>> from autopeft.backbones import build_backbone
    >>> model = build_backbone("unetr", "tiny")
    >>> model(torch.rand(1, 1, 32, 32, 32)).shape
    torch.Size([1, 1, 32, 32, 32])
    """

    loss = "l1"  # Backbone.generator_loss

    def __init__(self, preset: Preset) -> None:
        super().__init__(preset)
        owner = f"unetr preset {preset.name!r}"
        options = dict(checked_options(owner, preset.options, _ALLOWED_OPTIONS))
        self.residual = bool(options.pop("residual", True))
        if len(preset.crop_size) != 3 or any(side < 1 or side % _PATCH_SIZE for side in preset.crop_size):
            raise ConfigError(
                f"{owner}: `crop_size` must be 3 sides that are multiples of {_PATCH_SIZE}, "
                f"but got {preset.crop_size}."
            )
        try:
            self.unetr = UNETR(in_channels=1, out_channels=1, img_size=tuple(preset.crop_size), **options)
        except ValueError as err:
            raise ConfigError(f"{owner}: {err}") from err

    @property
    def net(self) -> UNETR:
        return self.unetr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``B x 1 x D x H x W`` (exactly the crop size) to the same shape."""
        expected = tuple(self.preset.crop_size)
        if x.ndim != 5 or x.shape[1] != 1 or tuple(x.shape[2:]) != expected:
            raise ValueError(
                f"UNETR input must be B x 1 x {' x '.join(map(str, expected))} (its position embedding "
                f"fixes the size), but got shape {tuple(x.shape)}."
            )
        out = self.unetr(x)
        return x + out if self.residual else out

    def sites(self) -> list[Site]:
        unetr = self.unetr
        token_level = int(math.log2(_PATCH_SIZE))
        sites = [
            Site(f"encoder.vit.{i}", "encoder", "vit", block, token_level) for i, block in enumerate(unetr.vit.blocks)
        ]
        # encoderN outputs at level N - 1; decoderN (N = 5..2) outputs at level N - 2.
        for n in range(1, 5):
            sites.append(Site(f"encoder.cnn.{n}", "encoder", "cnn", getattr(unetr, f"encoder{n}"), n - 1))
        for n in range(5, 1, -1):
            sites.append(Site(f"decoder.cnn.{n}", "decoder", "cnn", getattr(unetr, f"decoder{n}"), n - 2))
        return sites
