"""LoRA layers: counts checked by hand, identity at start, exact merges (grouped and transposed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autopeft.errors import PlanError
from autopeft.peft.lora import LoraConfig, wrap_with_lora
from autopeft.peft.lora_layers import LoraConv, LoraConvTranspose, LoraFusedQKV, LoraLinear


def _randomise_up(layer: nn.Module) -> None:
    # B starts at zero; give it values so that merges are really tested.
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("lora_B"):
                p.normal_(0, 0.5)


def _count(layer: nn.Module) -> int:
    return sum(p.numel() for p in layer.lora_parameters())


def test_linear_counts_by_hand_and_starts_as_identity() -> None:
    base = nn.Linear(8, 12)
    layer = LoraLinear(base, rank=2, alpha=4)
    assert _count(layer) == 2 * (8 + 12)
    assert layer.scaling == 2.0
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)


def test_linear_merge_is_exact() -> None:
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(8, 12), rank=2, alpha=4)
    _randomise_up(layer)
    x = torch.randn(4, 8)
    expected = layer(x)
    merged = layer.merged()
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("parts", [("q", "k"), ("v",), ("q", "k", "v")])
def test_fused_qkv_adapts_only_the_chosen_thirds(parts: tuple[str, ...]) -> None:
    torch.manual_seed(0)
    hidden, rank = 6, 2
    base = nn.Linear(hidden, 3 * hidden, bias=False)
    layer = LoraFusedQKV(base, parts, rank=rank, alpha=2)
    # Unused thirds create and count nothing: r * (in + hidden) per enabled third.
    assert _count(layer) == len(parts) * rank * (hidden + hidden)
    assert set(layer.lora_A.keys()) == set(parts)
    _randomise_up(layer)
    x = torch.randn(2, 4, hidden)
    out, ref = layer(x), base(x)
    for index, part in enumerate(("q", "k", "v")):
        rows = slice(index * hidden, (index + 1) * hidden)
        if part in parts:
            assert not torch.allclose(out[..., rows], ref[..., rows])
        else:
            torch.testing.assert_close(out[..., rows], ref[..., rows], rtol=0, atol=0)
    delta = layer.delta_weight()
    torch.testing.assert_close(layer.merged()(x), out, rtol=1e-5, atol=1e-6)
    assert delta.shape == base.weight.shape


@pytest.mark.parametrize(
    ("in_channels", "out_channels", "groups", "kernel", "stride"),
    [(4, 6, 1, 3, 1), (8, 8, 8, 3, 1), (8, 12, 4, 3, 2), (6, 4, 2, (1, 3, 3), 1)],
    ids=["dense", "depthwise", "grouped-strided", "grouped-anisotropic"],
)
def test_conv3d_including_grouped_merges_exactly(in_channels, out_channels, groups, kernel, stride) -> None:
    torch.manual_seed(0)
    base = nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=1, groups=groups)
    layer = LoraConv(base, rank=2, alpha=2)
    x = torch.randn(2, in_channels, 6, 6, 6)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    _randomise_up(layer)
    expected = layer(x)
    assert not torch.allclose(expected, base(x))
    merged = layer.merged()
    assert type(merged) is nn.Conv3d and merged.groups == groups
    torch.testing.assert_close(merged(x), expected, rtol=1e-4, atol=1e-5)


def test_conv_counts_by_hand_and_caps_rank_per_group() -> None:
    dense = LoraConv(nn.Conv3d(4, 6, 3), rank=2, alpha=2)
    assert _count(dense) == 2 * 4 * 27 + 6 * 2  # A: r x C_in x k^3, B: C_out x r
    grouped = LoraConv(nn.Conv3d(8, 12, 3, groups=4), rank=2, alpha=2)
    assert _count(grouped) == 4 * 2 * (2 * 27) + 12 * 2  # per group: r x (in/g * k^3) and (out/g) x r
    depthwise = LoraConv(nn.Conv3d(8, 8, 3, groups=8), rank=4, alpha=4)
    # One output channel per group: a group's change has rank <= 1, so r is capped to 1.
    assert depthwise.group_rank == 1
    assert _count(depthwise) == 8 * 27 + 8
    assert depthwise.scaling == 1.0  # alpha / the rank the plan asked for


@pytest.mark.parametrize(
    ("in_channels", "out_channels", "groups", "kernel", "stride"),
    [(6, 4, 1, 2, 2), (8, 4, 2, 4, 4), (4, 4, 4, 3, 2)],
    ids=["dense", "grouped", "depthwise"],
)
def test_conv_transpose3d_merges_exactly(in_channels, out_channels, groups, kernel, stride) -> None:
    torch.manual_seed(0)
    base = nn.ConvTranspose3d(in_channels, out_channels, kernel, stride=stride, groups=groups)
    layer = LoraConvTranspose(base, rank=2, alpha=2)
    x = torch.randn(2, in_channels, 3, 3, 3)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    _randomise_up(layer)
    expected = layer(x)
    assert not torch.allclose(expected, base(x))
    merged = layer.merged()
    assert type(merged) is nn.ConvTranspose3d
    torch.testing.assert_close(merged(x), expected, rtol=1e-4, atol=1e-5)


def test_dispatch_by_layer_type_lists_what_is_supported() -> None:
    config = LoraConfig(rank=2)
    assert isinstance(wrap_with_lora(nn.Linear(3, 3), config), LoraLinear)
    assert isinstance(wrap_with_lora(nn.Conv3d(3, 3, 1), config), LoraConv)
    assert isinstance(wrap_with_lora(nn.ConvTranspose3d(3, 3, 2), config), LoraConvTranspose)
    with pytest.raises(PlanError, match="LoRA cannot wrap a LayerNorm; supported layers: Linear, .*Conv3d.*ConvTranspose3d"):
        wrap_with_lora(nn.LayerNorm(3), config)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "`rank` must be a positive integer"),
        ({"rank": 2.5}, "`rank` must be a positive integer"),
        ({"alpha": -1}, "`alpha` must be a positive number"),
        ({"targets": ["q", "query"]}, "`targets` must be a non-empty list among"),
        ({"targets": []}, "`targets` must be a non-empty list among"),
        ({"dropout": 1.0}, r"`dropout` must be in \[0, 1\)"),
    ],
)
def test_bad_config_values_name_the_field(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


def test_alpha_defaults_to_twice_the_rank() -> None:
    assert LoraConfig(rank=4).alpha == 8.0
    assert LoraConfig(rank=4, targets="q").targets == ("q",)
