"""A toy backbone with every layer kind the PEFT methods handle, fast enough for every test.

``B x 1 x 8 x 8 x 8`` -> same. Sites:

- ``enc.vit.0``, ``enc.vit.1`` (vit, stage 2): MONAI ``TransformerBlock`` (fused ``qkv`` with bias).
- ``dec.cnn.0`` (cnn, stage 2 -> 0): grouped Conv3d + affine InstanceNorm3d + depthwise Conv3d +
  BatchNorm3d + grouped ConvTranspose3d (the layers LoRA on grouped/transposed convs must handle).
- ``dec.cnn.1`` (cnn, stage 0): one bare Conv3d with bias (a site that is a single layer).
"""

from __future__ import annotations

import torch
from monai.networks.blocks import TransformerBlock
from torch import nn

from autopeft.backbones.base import Backbone, Preset, Site

__all__ = ["ToyBackbone", "make_toy", "l1_loss"]

WIDTH = 16


class _ConvBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(WIDTH, WIDTH, 3, padding=1, groups=4)
        self.norm = nn.InstanceNorm3d(WIDTH, affine=True)
        self.act = nn.LeakyReLU(0.1)
        self.depthwise = nn.Conv3d(WIDTH, WIDTH, 3, padding=1, groups=WIDTH, bias=False)
        self.bn = nn.BatchNorm3d(WIDTH)
        self.up = nn.ConvTranspose3d(WIDTH, 8, kernel_size=4, stride=4, groups=2)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.norm(self.conv(volume)))
        return self.up(self.act(self.bn(self.depthwise(hidden))))


class _ToyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv3d(1, WIDTH, kernel_size=4, stride=4)
        self.blocks = nn.ModuleList(TransformerBlock(WIDTH, 32, num_heads=2, qkv_bias=True) for _ in range(2))
        self.decode = _ConvBlock()
        self.head = nn.Conv3d(8, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.embed(x)
        batch, channels, *spatial = grid.shape
        tokens = grid.flatten(2).transpose(1, 2)
        for block in self.blocks:
            tokens = block(tokens)
        grid = tokens.transpose(1, 2).reshape(batch, channels, *spatial)
        return self.head(self.decode(grid)) + x


class ToyBackbone(Backbone):
    """Toy encoder-decoder with a tiny frozen discriminator."""

    name = "toy"

    def __init__(self, preset: Preset) -> None:
        super().__init__(preset)
        self.toy = _ToyNet()
        self.discriminator = nn.Sequential(nn.Conv3d(2, 4, 3, stride=2), nn.LeakyReLU(0.2), nn.Conv3d(4, 1, 1))

    @property
    def net(self) -> nn.Module:
        return self.toy

    def sites(self) -> list[Site]:
        toy = self.toy
        return [
            Site("enc.vit.0", "encoder", "vit", toy.blocks[0], 2),
            Site("enc.vit.1", "encoder", "vit", toy.blocks[1], 2),
            Site("dec.cnn.0", "decoder", "cnn", toy.decode, 2),
            Site("dec.cnn.1", "decoder", "cnn", toy.head, 0),
        ]


def make_toy(seed: int = 0) -> ToyBackbone:
    torch.manual_seed(seed)
    model = ToyBackbone(Preset("tiny", (8, 8, 8), 2))
    # Non-trivial norm statistics and affine parameters, so that merges are really tested.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm3d, nn.InstanceNorm3d, nn.LayerNorm)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
            if isinstance(module, nn.BatchNorm3d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def l1_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean absolute error of ``model(x)`` against ``y`` for a batch ``(x, y)``."""
    return (model(batch[0]) - batch[1]).abs().mean()
