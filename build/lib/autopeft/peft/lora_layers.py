"""LoRA layers: ``y = base(x) + (alpha / rank) * B(A(x))``, with ``B`` zero at start (identity).

One base class, :class:`LoraLayer`, holds what every variant shares (rank, scaling, dropout, the
forward sum, merging); each variant only says how ``B(A(x))`` is computed and what weight change
``delta_weight`` it equals:

- :class:`LoraLinear`: ``A`` is ``rank x in``, ``B`` is ``out x rank``.
- :class:`LoraFusedQKV`: a fused ``qkv`` Linear (``hidden -> 3*hidden``, rows ordered q, k, v as in
  MONAI's ``SABlock``) with a separate ``A``/``B`` pair for each enabled third only. PETITE's
  ``q, k`` adapts two thirds of the output rows; the ``v`` rows get no factors at all, so nothing
  unused is created, trained or counted.
- :class:`LoraConv`: ``Conv1d/2d/3d`` including grouped and depthwise convolutions.
- :class:`LoraConvTranspose`: ``ConvTranspose1d/2d/3d``, grouped included.

Grouped convolutions (why not loralib's ``B @ A``): a grouped kernel is block-diagonal over groups,
so a dense ``B @ A`` (loralib issue #115) cannot be reshaped into one. Here ``A`` is a grouped
convolution with the base layer's kernel, stride, padding, dilation and groups, producing
``rank`` channels per group, and ``B`` is a grouped ``1x1x1`` convolution back to the output
channels. Each group's change is then ``B_g @ A_g`` (``out/g x rank`` times ``rank x in/g*k^3``),
itself a grouped kernel, so ``delta_weight`` is exact and merging reproduces the outputs to
round-off. A group's change cannot exceed rank ``min(out/g, in/g * kernel volume)``, so the rank
per group is capped there and no factor is created that could not add rank; ``alpha / rank``
keeps using the rank the plan asked for. For a depthwise conv (one channel per group) the cap is
1: each channel's ``k^3`` kernel gets a rank-1 change with ``k^3 + 1`` parameters, more than the
``k^3`` of the kernel itself, so LoRA saves nothing on depthwise layers (it is still exact).

Transposed convolutions: ``A`` is a transposed convolution with the base layer's geometry
(``in -> rank`` per group) and ``B`` the same grouped ``1x1x1`` convolution; pointwise channel
mixing commutes with the transposed convolution, so the change is again one transposed kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from autopeft.peft.base import MergeableLayer

__all__ = ["LoraLayer", "LoraLinear", "LoraFusedQKV", "LoraConv", "LoraConvTranspose"]

_CONV_BY_DIM: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_TRANSPOSE_BY_DIM: dict[int, type[nn.Module]] = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_QKV_PARTS = ("q", "k", "v")


def _init_down(weight: torch.Tensor) -> None:
    # Same init as nn.Linear/nn.Conv (and Hugging Face peft's lora_A): random, so B gets gradients.
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


class LoraLayer(MergeableLayer):
    """What every LoRA variant shares.

    Args:
        base_layer: the frozen pre-trained layer.
        rank: rank of the update (per group for grouped convolutions, before capping).
        alpha: scaling numerator; the update is multiplied by ``alpha / rank``.
        dropout: dropout on the LoRA branch's input. Defaults to 0.0.
    """

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"`rank` must be a positive integer, but got {rank}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), but got {dropout}.")
        self.base_layer = base_layer
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def lora_parameters(self) -> list[nn.Parameter]:
        """The trainable factors (everything except the base layer)."""
        return [p for name, p in self.named_parameters() if not name.startswith("base_layer.")]

    def _lora_branch(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``B(A(x))`` without scaling."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """The scaled change of ``base_layer.weight`` this layer adds, same shape as that weight."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.base_layer(x, *args, **kwargs) + self.scaling * self._lora_branch(self.lora_dropout(x), *args, **kwargs)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        weight = self.base_layer.weight
        weight.add_(self.delta_weight().to(weight.dtype))
        return self.base_layer

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


class LoraLinear(LoraLayer):
    """LoRA on a ``Linear``: ``... x in -> ... x out``."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base_layer, rank, alpha, dropout)
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base_layer.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, rank, **factory))
        _init_down(self.lora_A)

    def _lora_branch(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)


class LoraFusedQKV(LoraLayer):
    """LoRA on chosen thirds of a fused ``qkv`` Linear (``... x hidden -> ... x 3*hidden``).

    Args:
        base_layer: the fused Linear; ``out_features`` must be divisible by 3.
        parts: the thirds to adapt, a non-empty subset of ``("q", "k", "v")``.
        rank, alpha, dropout: as in :class:`LoraLayer`.
    """

    def __init__(
        self, base_layer: nn.Linear, parts: tuple[str, ...], rank: int, alpha: float, dropout: float = 0.0
    ) -> None:
        super().__init__(base_layer, rank, alpha, dropout)
        if base_layer.out_features % 3:
            raise ValueError(f"A fused qkv Linear must have out_features divisible by 3, but got {base_layer.out_features}.")
        if not parts or any(p not in _QKV_PARTS for p in parts):
            raise ValueError(f"`parts` must be a non-empty subset of {_QKV_PARTS}, but got {parts}.")
        self.parts = tuple(p for p in _QKV_PARTS if p in parts)
        self.part_size = base_layer.out_features // 3
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.ParameterDict(
            {p: nn.Parameter(torch.empty(rank, base_layer.in_features, **factory)) for p in self.parts}
        )
        self.lora_B = nn.ParameterDict({p: nn.Parameter(torch.zeros(self.part_size, rank, **factory)) for p in self.parts})
        for weight in self.lora_A.values():
            _init_down(weight)

    def _lora_branch(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # One matmul for all enabled A's, then each B on its slice; disabled thirds are zeros.
        stacked_a = torch.cat([self.lora_A[p] for p in self.parts], dim=0)
        hidden = F.linear(x, stacked_a).split(self.rank, dim=-1)
        by_part = dict(zip(self.parts, hidden))
        zeros = None
        outputs = []
        for part in _QKV_PARTS:
            if part in by_part:
                outputs.append(F.linear(by_part[part], self.lora_B[part]))
            else:
                if zeros is None:
                    zeros = x.new_zeros(*x.shape[:-1], self.part_size)
                outputs.append(zeros)
        return torch.cat(outputs, dim=-1)

    def delta_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight
        delta = torch.zeros_like(weight)
        for index, part in enumerate(_QKV_PARTS):
            if part in self.parts:
                rows = slice(index * self.part_size, (index + 1) * self.part_size)
                delta[rows] = self.lora_B[part] @ self.lora_A[part]
        return self.scaling * delta

    def extra_repr(self) -> str:
        return f"parts={self.parts}, rank={self.rank}, alpha={self.alpha}"


def _conv_geometry(base_layer: nn.Module, rank: int) -> tuple[tuple[int, ...], int, int, dict]:
    """(kernel size, groups, rank per group, device and dtype) of a (transposed) convolution; the
    rank per group is capped by the group's output channels and its inputs x kernel volume."""
    kernel = tuple(base_layer.kernel_size)
    groups = base_layer.groups
    group_rank = min(rank, base_layer.out_channels // groups, base_layer.in_channels // groups * math.prod(kernel))
    return kernel, groups, group_rank, {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}


class LoraConv(LoraLayer):
    """LoRA on a ``Conv1d/2d/3d`` (grouped and depthwise included): ``B x C_in x ... -> B x C_out x ...``.

    ``lora_A``: grouped conv with the base geometry, ``C_in -> groups * r``; ``lora_B``: grouped
    pointwise conv ``groups * r -> C_out``; ``r`` is the rank capped per group (module docstring).
    """

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base_layer, rank, alpha, dropout)
        kernel, groups, self.group_rank, factory = _conv_geometry(base_layer, rank)
        conv = _CONV_BY_DIM[len(kernel)]
        self.lora_A = conv(
            base_layer.in_channels,
            groups * self.group_rank,
            kernel,
            stride=base_layer.stride,
            padding=base_layer.padding,
            dilation=base_layer.dilation,
            groups=groups,
            bias=False,
            padding_mode=base_layer.padding_mode,
            **factory,
        )
        self.lora_B = conv(groups * self.group_rank, base_layer.out_channels, 1, groups=groups, bias=False, **factory)
        _init_down(self.lora_A.weight)
        nn.init.zeros_(self.lora_B.weight)

    def _lora_branch(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.lora_B(self.lora_A(x))

    def delta_weight(self) -> torch.Tensor:
        base = self.base_layer
        groups, rank = base.groups, self.group_rank
        out_pg = base.out_channels // groups
        down = self.lora_A.weight.reshape(groups, rank, -1)  # g x r x (in/g * k...)
        up = self.lora_B.weight.reshape(groups, out_pg, rank)  # g x out/g x r
        return self.scaling * torch.bmm(up, down).reshape(base.weight.shape)

    def extra_repr(self) -> str:
        return f"rank={self.rank} (per group {self.group_rank}, groups={self.base_layer.groups}), alpha={self.alpha}"


class LoraConvTranspose(LoraLayer):
    """LoRA on a ``ConvTranspose1d/2d/3d`` (grouped included).

    ``lora_A``: transposed conv with the base geometry, ``C_in -> groups * r``; ``lora_B``: grouped
    pointwise conv ``groups * r -> C_out``. ``forward(x, output_size=None)`` as the base layer.
    """

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base_layer, rank, alpha, dropout)
        kernel, groups, self.group_rank, factory = _conv_geometry(base_layer, rank)
        self.lora_A = _CONV_TRANSPOSE_BY_DIM[len(kernel)](
            base_layer.in_channels,
            groups * self.group_rank,
            kernel,
            stride=base_layer.stride,
            padding=base_layer.padding,
            output_padding=base_layer.output_padding,
            groups=groups,
            bias=False,
            dilation=base_layer.dilation,
            **factory,
        )
        self.lora_B = _CONV_BY_DIM[len(kernel)](
            groups * self.group_rank, base_layer.out_channels, 1, groups=groups, bias=False, **factory
        )
        _init_down(self.lora_A.weight)
        nn.init.zeros_(self.lora_B.weight)

    def _lora_branch(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.lora_B(self.lora_A(x, *args, **kwargs))

    def delta_weight(self) -> torch.Tensor:
        base = self.base_layer
        groups, rank = base.groups, self.group_rank
        in_pg = base.in_channels // groups
        out_pg = base.out_channels // groups
        down = self.lora_A.weight.reshape(groups, in_pg, rank, -1)  # g x in/g x r x k
        up = self.lora_B.weight.reshape(groups, out_pg, rank)  # g x out/g x r
        delta = torch.einsum("girk,gor->giok", down, up)
        return self.scaling * delta.reshape(base.weight.shape)

    def extra_repr(self) -> str:
        return f"rank={self.rank} (per group {self.group_rank}, groups={self.base_layer.groups}), alpha={self.alpha}"
