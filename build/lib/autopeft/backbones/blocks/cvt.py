"""Convolutional vision-transformer (CvT) parts in 3D, as used by 3D CVT-GAN.

CvT (Wu et al., ICCV 2021) replaces the linear token projections of self-attention with depthwise
convolutions, so that attention sees local structure without positional embeddings; 3D CVT-GAN
(Zeng et al., MICCAI 2022) carries this to volumes. The parts here are the layers the networks in
``autopeft.backbones.cvtgan`` are assembled from:

- :class:`ConvProjectionAttention`: multi-head attention with depthwise-conv projections
  (stride 1 for queries, stride 2 for keys and values) followed by ``Linear`` q/k/v projections.
- :class:`CvTBlock`: a pre-norm transformer block (attention + MLP, residuals around both).
- :class:`ConvEmbedding` / :class:`TransposedConvEmbedding`: strided (transposed) convolution
  followed by a LayerNorm over channels; they change resolution between stages.
- :class:`CvTStage`: one embedding followed by transformer blocks.

Attribute names follow MONAI's transformer parts (``norm1``/``attn``/``norm2``/``mlp``,
``mlp.linear1``/``mlp.linear2``, ``attn.out_proj``) so that PEFT methods find the same layers in
UNETR and in CVT-GAN.

Extra tokens (CvT's class-token convention): a block's token sequence may begin with tokens that
have no place in the volume (visual prompts). They skip the depthwise convolutions, take part in
attention and the MLP like any other token, and :class:`CvTStage` drops them when it folds the
tokens back into a volume. Nothing here adds such tokens; a PEFT method may.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import MLPBlock
from torch import nn

__all__ = [
    "ConvProjectionAttention",
    "CvTBlock",
    "ConvEmbedding",
    "TransposedConvEmbedding",
    "CvTStage",
]


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be in [0, 1), but got {value}.")


def _split_tokens(
    tokens: torch.Tensor, spatial_shape: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``B x (P + D*H*W) x C`` tokens into the P leading extra tokens and the volume.

    Returns:
        ``B x P x C`` extra tokens and the ``B x C x D x H x W`` volume of the rest.
    """
    num_voxels = math.prod(spatial_shape)
    batch, num_tokens, channels = tokens.shape
    if num_tokens < num_voxels:
        raise ValueError(
            f"`tokens` must hold at least D*H*W = {num_voxels} tokens for spatial shape "
            f"{tuple(spatial_shape)}, but got {num_tokens}."
        )
    extra = tokens[:, : num_tokens - num_voxels]
    volume = tokens[:, num_tokens - num_voxels :].transpose(1, 2).reshape(batch, channels, *spatial_shape)
    return extra, volume


class ConvProjectionAttention(nn.Module):
    """Multi-head self-attention whose q/k/v come from depthwise 3D convolutions (CvT).

    Each of q, k and v is made by a depthwise ``Conv3d`` (kernel 3, no bias; stride 1 for q and
    ``stride_kv`` for k and v, which shrinks the keys 8-fold at stride 2) and a ``BatchNorm3d``,
    flattened to tokens, then projected by its own ``Linear``. The heads' outputs are joined and
    projected by ``out_proj``.

    Args:
        dim: token width, in and out.
        num_heads: number of attention heads; must divide ``dim``.
        kernel_size: depthwise kernel size (odd). Defaults to 3.
        stride_kv: stride of the key/value convolutions. Defaults to 2.
        qkv_bias: whether ``proj_q``/``proj_k``/``proj_v`` have a bias. Defaults to False.
        attention_dropout: dropout on the attention weights. Defaults to 0.0.
        dropout: dropout on the output projection. Defaults to 0.0.

    Shapes:
        ``forward(tokens, spatial_shape)``: tokens ``B x (P + D*H*W) x dim`` (P leading extra tokens,
        usually 0) -> ``B x (P + D*H*W) x dim``.

    >>> attn = ConvProjectionAttention(dim=16, num_heads=2)
    >>> attn(torch.randn(2, 4 * 4 * 4, 16), (4, 4, 4)).shape
    torch.Size([2, 64, 16])
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        kernel_size: int = 3,
        stride_kv: int = 2,
        qkv_bias: bool = False,
        attention_dropout: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"`dim` must be a positive integer, but got {dim}.")
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"`num_heads` must be a positive divisor of `dim` = {dim}, but got {num_heads}.")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"`kernel_size` must be a positive odd integer, but got {kernel_size}.")
        if stride_kv < 1:
            raise ValueError(f"`stride_kv` must be a positive integer, but got {stride_kv}.")
        _check_fraction("attention_dropout", attention_dropout)
        _check_fraction("dropout", dropout)
        self.num_heads = num_heads
        self.attention_dropout = attention_dropout
        # CvT and 3D CVT-GAN scale scores by dim**-0.5 (not head_dim**-0.5); kept for fidelity.
        self.scale = dim**-0.5
        padding = kernel_size // 2
        self.conv_q = nn.Conv3d(dim, dim, kernel_size, stride=1, padding=padding, groups=dim, bias=False)
        self.conv_k = nn.Conv3d(dim, dim, kernel_size, stride=stride_kv, padding=padding, groups=dim, bias=False)
        self.conv_v = nn.Conv3d(dim, dim, kernel_size, stride=stride_kv, padding=padding, groups=dim, bias=False)
        self.norm_q = nn.BatchNorm3d(dim)
        self.norm_k = nn.BatchNorm3d(dim)
        self.norm_v = nn.BatchNorm3d(dim)
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim)
        self.drop_output = nn.Dropout(dropout)

    def _heads(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, num_tokens, dim = tokens.shape
        return tokens.view(batch, num_tokens, self.num_heads, dim // self.num_heads).transpose(1, 2)

    @staticmethod
    def _conv_tokens(volume: torch.Tensor, conv: nn.Conv3d, norm: nn.BatchNorm3d, extra: torch.Tensor) -> torch.Tensor:
        projected = norm(conv(volume)).flatten(2).transpose(1, 2)
        return torch.cat([extra, projected], dim=1) if extra.shape[1] else projected

    def forward(self, tokens: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
        """Attend over ``tokens`` (``B x (P + D*H*W) x dim``) laid out on a ``spatial_shape`` grid."""
        extra, volume = _split_tokens(tokens, spatial_shape)
        query = self.proj_q(self._conv_tokens(volume, self.conv_q, self.norm_q, extra))
        key = self.proj_k(self._conv_tokens(volume, self.conv_k, self.norm_k, extra))
        value = self.proj_v(self._conv_tokens(volume, self.conv_v, self.norm_v, extra))
        # PyTorch's fused kernel (flash/memory-efficient where available) instead of an explicit
        # softmax(QK^T)V, which would hold the full B x heads x Nq x Nkv matrix for backward.
        attended = F.scaled_dot_product_attention(
            self._heads(query),
            self._heads(key),
            self._heads(value),
            dropout_p=self.attention_dropout if self.training else 0.0,
            scale=self.scale,
        )
        batch, _, num_tokens, _ = attended.shape
        attended = attended.transpose(1, 2).reshape(batch, num_tokens, -1)
        return self.drop_output(self.out_proj(attended))


class CvTBlock(nn.Module):
    """Pre-norm transformer block with convolutional-projection attention.

    ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``; the MLP is MONAI's ``MLPBlock`` (GELU,
    ``linear1``/``linear2``). No positional embedding: the depthwise convolutions carry position.

    Args:
        dim: token width.
        num_heads: attention heads; must divide ``dim``.
        mlp_ratio: hidden width of the MLP over ``dim``. Defaults to 4.0.
        dropout: dropout in the MLP and after the attention projection. Defaults to 0.0.
        attention_dropout: dropout on the attention weights. Defaults to 0.0.
        qkv_bias: bias in the q/k/v ``Linear`` layers. Defaults to False.
        stride_kv: stride of the key/value convolutions. Defaults to 2.

    Shapes:
        ``forward(tokens, spatial_shape)``: ``B x (P + D*H*W) x dim`` -> same.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        qkv_bias: bool = False,
        stride_kv: int = 2,
    ) -> None:
        super().__init__()
        if mlp_ratio <= 0:
            raise ValueError(f"`mlp_ratio` must be positive, but got {mlp_ratio}.")
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ConvProjectionAttention(
            dim,
            num_heads,
            stride_kv=stride_kv,
            qkv_bias=qkv_bias,
            attention_dropout=attention_dropout,
            dropout=dropout,
        )
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), dropout_rate=dropout, act="GELU")

    def forward(self, tokens: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
        tokens = tokens + self.attn(self.norm1(tokens), spatial_shape)
        return tokens + self.mlp(self.norm2(tokens))


class _NormedConv(nn.Module):
    """A (transposed) convolution followed by LayerNorm over channels, volume in and out."""

    conv: nn.Module

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(out_channels)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        """``B x C_in x D x H x W`` -> ``B x C_out x D' x H' x W'``."""
        # LayerNorm normalises the last dimension, so channels go last and come back.
        return self.norm(self.conv(volume).movedim(1, -1)).movedim(-1, 1)


class ConvEmbedding(_NormedConv):
    """Strided ``Conv3d`` + LayerNorm over channels: the entry of an encoder CvT stage.

    Args:
        in_channels: input channels.
        out_channels: output channels (the stage's token width).
        kernel_size: odd kernel size; padding keeps ``ceil(size / stride)``. Defaults to 3.
        stride: downsampling factor. Defaults to 2.

    >>> ConvEmbedding(8, 16)(torch.randn(1, 8, 8, 8, 8)).shape
    torch.Size([1, 16, 4, 4, 4])
    """

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int = 3, stride: int = 2) -> None:
        super().__init__(out_channels)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"`kernel_size` must be a positive odd integer, but got {kernel_size}.")
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2)


class TransposedConvEmbedding(_NormedConv):
    """``ConvTranspose3d`` (kernel = stride) + LayerNorm over channels: the entry of a decoder stage.

    Args:
        in_channels: input channels.
        out_channels: output channels (the stage's token width).
        stride: upsampling factor, also the kernel size. Defaults to 2.

    >>> TransposedConvEmbedding(16, 8)(torch.randn(1, 16, 4, 4, 4)).shape
    torch.Size([1, 8, 8, 8, 8])
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 2) -> None:
        super().__init__(out_channels)
        self.conv = nn.ConvTranspose3d(in_channels, out_channels, kernel_size=stride, stride=stride)


class CvTStage(nn.Module):
    """An embedding that changes resolution, then ``depth`` CvT blocks at the new resolution.

    Args:
        embed: a :class:`ConvEmbedding` or :class:`TransposedConvEmbedding` (any module mapping
            ``B x C_in x D x H x W`` to ``B x dim x D' x H' x W'``).
        dim: token width; the embedding's output channels.
        depth: number of transformer blocks (>= 1).
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width over ``dim``. Defaults to 4.0.
        dropout: dropout on the embedded tokens and inside the blocks. Defaults to 0.0.
        stride_kv: stride of the key/value convolutions of the blocks. Use 1 for a stage whose
            grid is 2 voxels a side, where stride 2 would leave a single key (and a BatchNorm
            over one value per sample). Defaults to 2.

    Shapes:
        ``B x C_in x D x H x W`` -> ``B x dim x D' x H' x W'``. Tokens that a wrapped block puts in
        front of the sequence (prompts) are carried through the later blocks and dropped at the end.
    """

    def __init__(
        self,
        embed: nn.Module,
        dim: int,
        depth: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        stride_kv: int = 2,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"`depth` must be at least 1, but got {depth}.")
        _check_fraction("dropout", dropout)
        self.embed = embed
        self.drop_tokens = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            CvTBlock(dim, num_heads, mlp_ratio=mlp_ratio, dropout=dropout, stride_kv=stride_kv)
            for _ in range(depth)
        )
        self.apply(_init_transformer_weights)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        embedded = self.embed(volume)
        batch, channels, *spatial_shape = embedded.shape
        tokens = self.drop_tokens(embedded.flatten(2).transpose(1, 2))
        for block in self.blocks:
            tokens = block(tokens, spatial_shape)
        _, volume_out = _split_tokens(tokens, spatial_shape)
        return volume_out


def _init_transformer_weights(module: nn.Module) -> None:
    # Xavier-uniform linear layers with zero bias and unit norms, as 3D CVT-GAN initialises them.
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.BatchNorm3d)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
