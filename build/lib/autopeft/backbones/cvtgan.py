"""3D CVT-GAN (Zeng et al., MICCAI 2022): a convolutional-vision-transformer generator and a patch
discriminator for PET image-to-image translation, written once from the published description.

Generator on an ``S^3`` input with widths ``w0..w3`` (paper: 64-128-256-512); site, layers, scale::

    encoder.stem      Conv3d(1 -> w0, k3, s2) + LeakyReLU(0.2) + BatchNorm               S/2
    encoder.stage2.*  ConvEmbedding(w0 -> w1, k3, s2) + LN; 1 CvT block, 2 heads          S/4
    encoder.stage3.*  ConvEmbedding(w1 -> w2); 2 CvT blocks, 4 heads, dropout 0.2         S/8
    encoder.stage4.*  ConvEmbedding(w2 -> w3); 2 CvT blocks, 4 heads                      S/16
    bottleneck.conv   Conv3d(w3 -> w3, k3) + LeakyReLU + BatchNorm, identity residual     S/16
    decoder.stage3.*  TransposedConvEmbedding(w3 -> w2, k2, s2) + LN; 2 CvT blocks        S/8
    decoder.fuse3     concat(encoder S/8, decoder) -> Conv3d k3 + Dropout3d(0.2)          S/8
                      + LeakyReLU + BatchNorm, plus a 1x1 Conv3d residual
    decoder.stage2.*  TransposedConvEmbedding(w2 -> w1); 1 CvT block, 4 heads             S/4
    decoder.fuse2     as fuse3, no dropout                                                S/4
    decoder.up1       ConvTranspose3d(w1 -> w0, k2, s2)                                   S/2
    decoder.fuse1     concat(stem, decoder) -> Conv3d(2 w0 -> w0) + LeakyReLU             S/2
                      -> Conv3d(w0 -> w0/2) + LeakyReLU
    (out, no site)    ConvTranspose3d(w0/2 -> 1, k2, s2); output = this + input           S

``.embed`` sites are CNN sites, ``.blockK`` sites are ViT sites; a site's ``stage`` is the
resolution level ``log2(S / scale)``, the same number as in its name. The CvT blocks carry no
positional embedding, so any input whose sides are multiples of 16 works (sliding windows of the
crop size included). In training mode BatchNorm needs more than one value per channel, so a batch
of one needs the deepest grid to keep more than one voxel (true at the presets' crop sizes).

Discriminator (frozen during PEFT): the 2-channel concat of the short scan and a long scan (real
or generated) -> Conv3d 2->8 (s2), 8->16 (s1), 16->32 (s2, Dropout3d 0.2), each LeakyReLU +
BatchNorm, then two CvT stages 32->64->64 (1 block, 2 heads, dropout 0.3, stride 2 each) and a
1x1 Conv3d to one channel: ``B x 1 x S/16 x S/16 x S/16`` patch **logits**. No sigmoid: the loss
applies ``BCEWithLogitsLoss`` (the public code applied BCE-with-logits to a sigmoid output).

Where this differs from the public code, and why (each changes the parameter count a little; see
``tests/backbones/test_cvtgan.py`` for the figures):

- no unused layers: the public residual blocks held a 1x1 ``ConvTranspose3d`` they never called
  (426,880 parameters at paper widths), and the discriminator an unused ``Linear(128, 1)``;
- the bottleneck's residual is the identity (MONAI ``ResidualUnit``, as in ResNets: the channel
  count does not change), not a 1x1 conv from 512 to 512 channels (262,656 parameters);
- the discriminator ends in a 1x1 conv to one logit per patch (65 parameters) instead of a
  sigmoid over 64 channels;
- a LeakyReLU between the two convs of ``decoder.fuse1`` (two stacked linear convs collapse to
  one), and none on the final residual, which must be free to be negative;
- attention through ``torch.nn.functional.scaled_dot_product_attention`` (same maths; fused kernel).

Presets: ``paper`` (64^3 crops, batch 6, the widths above) and ``tiny`` (32^3 crops, batch 2,
generator widths 8-16-32-64, discriminator widths halved; its 2^3-voxel deepest CvT stages keep
keys and values at stride 1, since stride 2 would leave one key). Paper preset: generator
28,026,145 parameters; adding back the 426,880 unused and the 262,656
bottleneck-residual parameters gives 28,715,681, the public code's ~28.7 M. Discriminator 294,937
(public: ~0.3 M). ``loss = "gan"``: G = BCE_adv + 100 * L1;
D = 0.5 * (BCE(D(x, y), 1) + BCE(D(x, G(x)), 0)).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn

from autopeft.errors import ConfigError
from autopeft.backbones.base import Backbone, FinetuneSchedule, Preset, PretrainSchedule, Site, register_backbone
from autopeft.backbones.blocks._options import checked_options
from autopeft.backbones.blocks.cvt import ConvEmbedding, CvTStage, TransposedConvEmbedding

__all__ = ["CvTGenerator", "PatchDiscriminator", "CvTGAN", "PRESETS"]

_LEAKY = ("leakyrelu", {"negative_slope": 0.2})


def _check_lengths(expected: int, because: str, **sequences: Sequence) -> None:
    for name, values in sequences.items():
        if len(values) != expected:
            raise ValueError(f"`{name}` must have {expected} entries ({because}), but got {list(values)}.")


def _check_spatial(volume: torch.Tensor, channels: int, multiple: int, owner: str) -> None:
    if volume.ndim != 5 or volume.shape[1] != channels:
        raise ValueError(
            f"{owner} input must be B x {channels} x D x H x W, but got shape {tuple(volume.shape)}."
        )
    if any(size % multiple for size in volume.shape[2:]):
        raise ValueError(
            f"{owner} input sides must be multiples of {multiple}, but got {tuple(volume.shape[2:])}."
        )


class CvTGenerator(nn.Module):
    """3D CVT-GAN generator: ``B x 1 x D x H x W`` short scan -> long-scan estimate, same shape.

    Args:
        widths: stem width then one width per encoder CvT stage (at least 3 entries). The input
            sides must be multiples of ``2 ** len(widths)``. Defaults to (64, 128, 256, 512).
        encoder_depths: CvT blocks per encoder stage. Defaults to (1, 2, 2).
        encoder_heads: attention heads per encoder stage. Defaults to (2, 4, 4).
        encoder_dropout: dropout per encoder stage. Defaults to (0.0, 0.2, 0.0).
        decoder_depths: CvT blocks per decoder stage, coarsest first (``len(widths) - 2``
            entries). Defaults to (2, 1).
        decoder_heads: attention heads per decoder stage. Defaults to (4, 4).
        fusion_dropout: channel dropout in each skip-fusion block, coarsest first. Defaults to
            (0.2, 0.0).
        encoder_stride_kv: key/value stride per encoder stage (1 where the stage's grid is only
            2 voxels a side at the training crop). Defaults to (2, 2, 2).
        decoder_stride_kv: key/value stride per decoder stage. Defaults to (2, 2).
        mlp_ratio: MLP hidden width over token width. Defaults to 4.0.

    >>> net = CvTGenerator(widths=(8, 16, 32, 64), encoder_stride_kv=(2, 2, 1))
    >>> net(torch.rand(1, 1, 32, 32, 32)).shape
    torch.Size([1, 1, 32, 32, 32])
    """

    def __init__(
        self,
        *,
        widths: Sequence[int] = (64, 128, 256, 512),
        encoder_depths: Sequence[int] = (1, 2, 2),
        encoder_heads: Sequence[int] = (2, 4, 4),
        encoder_dropout: Sequence[float] = (0.0, 0.2, 0.0),
        decoder_depths: Sequence[int] = (2, 1),
        decoder_heads: Sequence[int] = (4, 4),
        fusion_dropout: Sequence[float] = (0.2, 0.0),
        encoder_stride_kv: Sequence[int] = (2, 2, 2),
        decoder_stride_kv: Sequence[int] = (2, 2),
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if len(widths) < 3 or any(w < 2 for w in widths):
            raise ValueError(f"`widths` must hold at least 3 integers >= 2, but got {list(widths)}.")
        levels = len(widths)
        _check_lengths(
            levels - 1,
            "one per encoder stage",
            encoder_depths=encoder_depths,
            encoder_heads=encoder_heads,
            encoder_dropout=encoder_dropout,
            encoder_stride_kv=encoder_stride_kv,
        )
        _check_lengths(
            levels - 2,
            "one per decoder CvT stage",
            decoder_depths=decoder_depths,
            decoder_heads=decoder_heads,
            fusion_dropout=fusion_dropout,
            decoder_stride_kv=decoder_stride_kv,
        )
        self.widths = tuple(widths)
        self.size_multiple = 2**levels

        self.stem = Convolution(3, 1, widths[0], strides=2, kernel_size=3, adn_ordering="AN", act=_LEAKY, norm="batch")
        self.encoder = nn.ModuleList(
            CvTStage(
                ConvEmbedding(widths[i], widths[i + 1]),
                widths[i + 1],
                encoder_depths[i],
                encoder_heads[i],
                mlp_ratio=mlp_ratio,
                dropout=encoder_dropout[i],
                stride_kv=encoder_stride_kv[i],
            )
            for i in range(levels - 1)
        )
        self.bottleneck = _fusion(widths[-1], widths[-1], dropout=0.0)
        # Decoder CvT stages and their skip fusions, coarsest first: widths[-1] -> ... -> widths[1].
        self.decoder = nn.ModuleList()
        self.skip_fusions = nn.ModuleList()
        for j, level in enumerate(range(levels - 2, 0, -1)):
            self.decoder.append(
                CvTStage(
                    TransposedConvEmbedding(widths[level + 1], widths[level]),
                    widths[level],
                    decoder_depths[j],
                    decoder_heads[j],
                    mlp_ratio=mlp_ratio,
                    stride_kv=decoder_stride_kv[j],
                )
            )
            self.skip_fusions.append(_fusion(2 * widths[level], widths[level], dropout=fusion_dropout[j]))
        self.up = nn.ConvTranspose3d(widths[1], widths[0], kernel_size=2, stride=2)
        self.head = nn.Sequential(
            Convolution(3, 2 * widths[0], widths[0], kernel_size=3, adn_ordering="A", act=_LEAKY, norm=None),
            Convolution(3, widths[0], widths[0] // 2, kernel_size=3, adn_ordering="A", act=_LEAKY, norm=None),
        )
        self.out = nn.ConvTranspose3d(widths[0] // 2, 1, kernel_size=2, stride=2)

    def forward(self, short_scan: torch.Tensor) -> torch.Tensor:
        """``B x 1 x D x H x W`` (sides multiples of ``size_multiple``) -> same shape."""
        _check_spatial(short_scan, 1, self.size_multiple, "CvTGenerator")
        features = [self.stem(short_scan)]
        for stage in self.encoder:
            features.append(stage(features[-1]))
        hidden = self.bottleneck(features[-1])
        for j, (stage, fusion) in enumerate(zip(self.decoder, self.skip_fusions)):
            hidden = stage(hidden)
            hidden = fusion(torch.cat([features[-2 - j], hidden], dim=1))
        hidden = self.up(hidden)
        hidden = self.head(torch.cat([features[0], hidden], dim=1))
        return self.out(hidden) + short_scan


def _fusion(in_channels: int, out_channels: int, dropout: float) -> ResidualUnit:
    # Conv3d k3 -> Dropout3d -> LeakyReLU -> BatchNorm, plus a residual that MONAI makes a 1x1 conv
    # when the channel count changes and the identity when it does not.
    return ResidualUnit(
        3,
        in_channels,
        out_channels,
        strides=1,
        kernel_size=3,
        subunits=1,
        adn_ordering="DAN",
        act=_LEAKY,
        norm="batch",
        dropout=dropout or None,
        dropout_dim=3,
    )


class PatchDiscriminator(nn.Module):
    """Conditional patch discriminator: ``B x 2 x D x H x W`` -> ``B x 1 x d x h x w`` logits.

    Channel 0 is the short scan, channel 1 the real or generated long scan. Returns raw logits
    (use ``BCEWithLogitsLoss``); ``d = D / size_multiple``.

    Args:
        conv_widths: output channels of the convolutional layers. Defaults to (8, 16, 32).
        conv_strides: their strides. Defaults to (2, 1, 2).
        conv_dropout: channel dropout after the last convolutional layer. Defaults to 0.2.
        cvt_widths: token width of each CvT stage (stride 2 each). Defaults to (64, 64).
        cvt_depths: CvT blocks per stage. Defaults to (1, 1).
        cvt_heads: attention heads per stage. Defaults to (2, 2).
        cvt_dropout: dropout inside the CvT stages. Defaults to 0.3.
        cvt_stride_kv: key/value stride per CvT stage. Defaults to (2, 2).
        mlp_ratio: MLP hidden width over token width. Defaults to 4.0.

    >>> PatchDiscriminator()(torch.rand(1, 2, 64, 64, 64)).shape
    torch.Size([1, 1, 4, 4, 4])
    """

    def __init__(
        self,
        *,
        conv_widths: Sequence[int] = (8, 16, 32),
        conv_strides: Sequence[int] = (2, 1, 2),
        conv_dropout: float = 0.2,
        cvt_widths: Sequence[int] = (64, 64),
        cvt_depths: Sequence[int] = (1, 1),
        cvt_heads: Sequence[int] = (2, 2),
        cvt_dropout: float = 0.3,
        cvt_stride_kv: Sequence[int] = (2, 2),
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if not conv_widths:
            raise ValueError(f"`conv_widths` must hold at least one width, but got {list(conv_widths)}.")
        _check_lengths(len(conv_widths), "one per conv layer", conv_strides=conv_strides)
        _check_lengths(
            len(cvt_widths),
            "one per CvT stage",
            cvt_depths=cvt_depths,
            cvt_heads=cvt_heads,
            cvt_stride_kv=cvt_stride_kv,
        )
        layers = []
        in_channels = 2
        for i, (width, stride) in enumerate(zip(conv_widths, conv_strides)):
            last = i == len(conv_widths) - 1
            layers.append(
                Convolution(
                    3,
                    in_channels,
                    width,
                    strides=stride,
                    kernel_size=3,
                    adn_ordering="AND" if last else "AN",
                    act=_LEAKY,
                    norm="batch",
                    dropout=conv_dropout if last and conv_dropout else None,
                    dropout_dim=3,
                )
            )
            in_channels = width
        self.convs = nn.Sequential(*layers)
        stages = []
        for width, depth, heads, stride_kv in zip(cvt_widths, cvt_depths, cvt_heads, cvt_stride_kv):
            stages.append(
                CvTStage(
                    ConvEmbedding(in_channels, width),
                    width,
                    depth,
                    heads,
                    mlp_ratio=mlp_ratio,
                    dropout=cvt_dropout,
                    stride_kv=stride_kv,
                )
            )
            in_channels = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Conv3d(in_channels, 1, kernel_size=1)
        stride = 1
        for s in conv_strides:
            stride *= s
        self.size_multiple = stride * 2 ** len(cvt_widths)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        """``B x 2 x D x H x W`` -> ``B x 1 x d x h x w`` patch logits."""
        _check_spatial(pair, 2, self.size_multiple, "PatchDiscriminator")
        return self.head(self.stages(self.convs(pair)))


_PAPER_GENERATOR = {
    "widths": (64, 128, 256, 512),
    "encoder_depths": (1, 2, 2),
    "encoder_heads": (2, 4, 4),
    "encoder_dropout": (0.0, 0.2, 0.0),
    "decoder_depths": (2, 1),
    "decoder_heads": (4, 4),
    "fusion_dropout": (0.2, 0.0),
}
_PAPER_DISCRIMINATOR = {
    "conv_widths": (8, 16, 32),
    "conv_strides": (2, 1, 2),
    "cvt_widths": (64, 64),
    "cvt_heads": (2, 2),
}

PRESETS: dict[str, Preset] = {
    # PETITE pre-trains for 1000 epochs (lr 1e-4) and fine-tunes 3D CVT-GAN for 150 epochs, lr 1e-3
    # (PEFT) and 1e-4 (Full-FT).
    "paper": Preset(
        "paper", (64, 64, 64), 6, {"generator": _PAPER_GENERATOR, "discriminator": _PAPER_DISCRIMINATOR},
        FinetuneSchedule(epochs=150, lr_peft=1e-3, lr_full=1e-4), PretrainSchedule.paper(),
    ),
    # Same topology, widths / 8 (generator) and / 2 (discriminator): a few crops per second on 2 CPU
    # cores. At 32^3 the deepest CvT stages see a 2^3 grid, where stride-2 keys would collapse to
    # one token (and their BatchNorm to one value per sample), so those stages keep keys at stride 1.
    "tiny": Preset(
        "tiny",
        (32, 32, 32),
        2,
        {
            "generator": {**_PAPER_GENERATOR, "widths": (8, 16, 32, 64), "encoder_stride_kv": (2, 2, 1)},
            "discriminator": {
                **_PAPER_DISCRIMINATOR,
                "conv_widths": (4, 8, 16),
                "cvt_widths": (32, 32),
                "cvt_stride_kv": (2, 1),
            },
        },
        pretrain=PretrainSchedule(),  # CPU-scaled
    ),
}

_GENERATOR_OPTIONS = (
    "widths encoder_depths encoder_heads encoder_dropout decoder_depths decoder_heads fusion_dropout"
    " encoder_stride_kv decoder_stride_kv mlp_ratio"
).split()
_DISCRIMINATOR_OPTIONS = (
    "conv_widths conv_strides conv_dropout cvt_widths cvt_depths cvt_heads cvt_dropout cvt_stride_kv mlp_ratio"
).split()


@register_backbone("cvtgan", PRESETS)
class CvTGAN(Backbone):
    """3D CVT-GAN as a backbone: ``net`` is the generator, ``discriminator`` the patch critic.

    Trained adversarially (:meth:`generator_loss`, :meth:`discriminator_loss`): generator loss
    BCE-with-logits(D(x, G(x)), 1) + 100 * L1(G(x), y) (PETITE); discriminator loss
    0.5 * (BCE(D(x, y), 1) + BCE(D(x, G(x)), 0)). The discriminator is frozen during PEFT. Sites
    are listed in the module docstring.

    Args:
        preset: ``options`` holds ``generator`` and ``discriminator`` dicts of constructor
            arguments of :class:`CvTGenerator` and :class:`PatchDiscriminator`.
    """

    loss = "gan"
    l1_weight = 100.0  # of the L1 term in the generator loss (PETITE)

    def __init__(self, preset: Preset) -> None:
        super().__init__(preset)
        owner = f"cvtgan preset {preset.name!r}"
        options = checked_options(owner, preset.options, ("generator", "discriminator"))
        generator_options = checked_options(f"{owner} generator", options.get("generator", {}), _GENERATOR_OPTIONS)
        discriminator_options = checked_options(
            f"{owner} discriminator", options.get("discriminator", {}), _DISCRIMINATOR_OPTIONS
        )
        try:
            self.generator = CvTGenerator(**generator_options)
            self.discriminator = PatchDiscriminator(**discriminator_options)
        except ValueError as err:
            raise ConfigError(f"{owner}: {err}") from err
        multiple = max(self.generator.size_multiple, self.discriminator.size_multiple)
        if any(size % multiple for size in preset.crop_size):
            raise ConfigError(
                f"{owner}: `crop_size` sides must be multiples of {multiple}, but got {preset.crop_size}."
            )
        self.size_multiple = multiple

    @property
    def net(self) -> CvTGenerator:
        return self.generator

    def generator_loss(self, short: torch.Tensor, long: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        logits = self._critic().forward(torch.cat([short, fake], dim=1))
        adversarial = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
        return adversarial + self.l1_weight * F.l1_loss(fake, long)

    def discriminator_loss(self, short: torch.Tensor, long: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        critic = self._critic()
        real_logits = critic(torch.cat([short, long], dim=1))
        fake_logits = critic(torch.cat([short, fake], dim=1))
        return 0.5 * (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                      + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))

    def _critic(self) -> nn.Module:
        if self.discriminator is None:  # an exported bundle's network drops it
            raise ConfigError("This CVT-GAN has no discriminator (a bundle's network drops it), so it cannot be trained; "
                              "train the model the search or the cache holds.")
        return self.discriminator

    def sites(self) -> list[Site]:
        generator = self.generator
        levels = len(generator.widths)
        sites = [Site("encoder.stem", "encoder", "cnn", generator.stem, 1)]
        for i, stage in enumerate(generator.encoder):
            sites += _stage_sites("encoder", "encoder", i + 2, stage)
        sites.append(Site("bottleneck.conv", "bottleneck", "cnn", generator.bottleneck, levels))
        for j, (stage, fusion) in enumerate(zip(generator.decoder, generator.skip_fusions)):
            level = levels - 1 - j
            sites += _stage_sites("decoder", "decoder", level, stage)
            sites.append(Site(f"decoder.fuse{level}", "decoder", "cnn", fusion, level))
        sites.append(Site("decoder.up1", "decoder", "cnn", generator.up, 1))
        sites.append(Site("decoder.fuse1", "decoder", "cnn", generator.head, 1))
        return sites


def _stage_sites(prefix: str, role: str, level: int, stage: CvTStage) -> list[Site]:
    sites = [Site(f"{prefix}.stage{level}.embed", role, "cnn", stage.embed, level)]
    sites += [
        Site(f"{prefix}.stage{level}.block{k}", role, "vit", block, level) for k, block in enumerate(stage.blocks)
    ]
    return sites
