"""Checks every built-in backbone must pass (tiny presets), the registry, and `autopeft backbones`."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch
from monai.networks.blocks.selfattention import SABlock
from torch import nn

import autopeft.backbones.base as base
from autopeft.cli import backbones as backbones_cli
from autopeft.errors import ConfigError
from autopeft.backbones import Backbone, Preset, Site, build_backbone, register_backbone, registered_backbones
from autopeft.backbones.blocks.cvt import ConvProjectionAttention

BUILTIN = ("unetr", "cvtgan")
ATTENTION_TYPES = (SABlock, ConvProjectionAttention, nn.MultiheadAttention)
CONV_TYPES = (nn.Conv3d, nn.ConvTranspose3d)


@pytest.fixture(scope="module", params=BUILTIN)
def tiny(request) -> Backbone:
    torch.manual_seed(0)
    return build_backbone(request.param, "tiny")


def test_builtin_backbones_are_registered_with_both_presets():
    registry = registered_backbones()
    for name in BUILTIN:
        assert set(registry[name]) == {"tiny", "paper"}
        assert registry[name]["tiny"].crop_size == (32, 32, 32)
        assert registry[name]["paper"].crop_size == (64, 64, 64)
        assert registry[name]["paper"].batch_size == 6


@pytest.fixture(scope="module")
def tiny_forward(tiny) -> tuple[torch.Tensor, torch.Tensor, dict[str, tuple[int, ...]]]:
    """One eval-mode forward at the crop size: input, output, and each site's output shape."""
    outputs: dict[str, tuple[int, ...]] = {}
    handles = [
        s.module.register_forward_hook(lambda _m, _i, out, name=s.name: outputs.__setitem__(name, tuple(out.shape)))
        for s in tiny.sites()
    ]
    x = torch.rand(1, 1, *tiny.preset.crop_size)
    try:
        with torch.no_grad():
            y = tiny.eval()(x)
    finally:
        for handle in handles:
            handle.remove()
    return x, y, outputs


def test_output_shape_equals_input_shape_at_crop_size(tiny_forward):
    x, y, _ = tiny_forward
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


def test_sites_have_unique_names_and_valid_roles_and_kinds(tiny):
    sites = tiny.sites()
    names = [s.name for s in sites]
    assert len(names) == len(set(names))
    assert all(isinstance(s, Site) and s.role in base.ROLES and s.kind in base.KINDS for s in sites)
    assert {s.kind for s in sites} == {"vit", "cnn"}
    # Encoder first, in forward order: roles never go back from decoder to encoder.
    order = [base.ROLES.index(s.role) for s in sites]
    assert order == sorted(order)


def test_site_modules_are_disjoint_submodules_of_net(tiny):
    net_modules = {id(m) for m in tiny.net.modules()}
    seen_modules: set[int] = set()
    seen_parameters: set[int] = set()
    for site in tiny.sites():
        assert id(site.module) in net_modules, f"{site.name} is not a submodule of net"
        modules = {id(m) for m in site.module.modules()}
        assert not modules & seen_modules, f"{site.name} overlaps another site"
        seen_modules |= modules
        parameters = {id(p) for p in site.module.parameters()}
        assert parameters, f"{site.name} has no parameters"
        assert not parameters & seen_parameters, f"{site.name} shares parameters with another site"
        seen_parameters |= parameters
    net_parameters = {id(p) for p in tiny.net.parameters()}
    assert seen_parameters <= net_parameters


def test_site_kind_matches_module_content(tiny):
    for site in tiny.sites():
        modules = list(site.module.modules())
        has_attention = any(isinstance(m, ATTENTION_TYPES) for m in modules)
        has_conv = any(isinstance(m, CONV_TYPES) for m in modules)
        if site.kind == "vit":
            assert has_attention, f"{site.name} is vit but holds no attention"
        else:
            assert not has_attention and has_conv, f"{site.name} is cnn but holds attention or no conv"


def test_site_stage_is_the_resolution_level_of_its_output(tiny, tiny_forward):
    crop = tiny.preset.crop_size
    _, _, outputs = tiny_forward
    for site in tiny.sites():
        grid = tuple(side // 2**site.stage for side in crop)
        shape = outputs[site.name]
        if site.kind == "vit":  # B x tokens x C
            assert shape[1] == grid[0] * grid[1] * grid[2], site.name
        else:  # B x C x D x H x W
            assert shape[2:] == grid, site.name


def test_site_lookup_by_name(tiny):
    first = tiny.sites()[0]
    assert tiny.site(first.name).module is first.module
    with pytest.raises(ConfigError, match="No site named 'nowhere.7'"):
        tiny.site("nowhere.7")
    with pytest.raises(ConfigError, match=re.escape(f"(did you mean {first.name!r}?)")):
        tiny.site(first.name.replace("encoder", "encodre"))


@pytest.mark.parametrize("name", BUILTIN)
def test_one_adamw_step_lowers_l1_loss_on_a_fixed_batch(name):
    torch.manual_seed(0)
    model = build_backbone(name, "tiny").train()
    x = torch.rand(1, 1, *model.preset.crop_size)
    target = 0.5 * x + 0.1
    optimizer = torch.optim.AdamW(model.net.parameters(), lr=1e-3)
    # Same seed before each forward: identical dropout masks, so only the weights differ.
    torch.manual_seed(1)
    before = nn.functional.l1_loss(model(x), target)
    before.backward()
    optimizer.step()
    torch.manual_seed(1)
    with torch.no_grad():
        after = nn.functional.l1_loss(model(x), target)
    assert after < before


def test_paper_presets_build_on_meta_with_the_reference_sizes():
    with torch.device("meta"):
        unetr = build_backbone("unetr", "paper")
        cvtgan = build_backbone("cvtgan", "paper")
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    # Exact: a layer more or less changes these (the public code's sizes: test_unetr.py, test_cvtgan.py).
    assert count(unetr.net) == 101_688_481
    assert count(cvtgan.net) == 28_026_145
    assert count(cvtgan.discriminator) == 294_937


class _ToyNet(Backbone):
    """A plug-in backbone: one conv encoder block, one attention block, one conv decoder block."""

    def __init__(self, preset: Preset) -> None:
        super().__init__(preset)
        width = preset.options["width"]
        self.body = nn.ModuleDict(
            {
                "down": nn.Conv3d(1, width, 3, padding=1),
                "attn": nn.MultiheadAttention(width, 1, batch_first=True),
                "up": nn.Conv3d(width, 1, 3, padding=1),
            }
        )

    @property
    def net(self) -> nn.Module:
        return self.body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body["down"](x)
        tokens = h.flatten(2).transpose(1, 2)
        tokens = self.body["attn"](tokens, tokens, tokens)[0]
        return self.body["up"](tokens.transpose(1, 2).reshape(h.shape)) + x

    def sites(self) -> list[Site]:
        return [
            Site("encoder.conv", "encoder", "cnn", self.body["down"], 0),
            Site("bottleneck.attn", "bottleneck", "vit", self.body["attn"], 0),
            Site("decoder.conv", "decoder", "cnn", self.body["up"], 0),
        ]


@pytest.fixture
def private_registry(monkeypatch):
    registered_backbones()  # load the built-ins first, so the copy holds them
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))


def test_third_party_backbone_registers_and_builds_without_touching_autopeft(private_registry):
    register_backbone("toynet", {"tiny": Preset("tiny", (8, 8, 8), 2, {"width": 4})})(_ToyNet)
    assert "toynet" in registered_backbones()
    model = build_backbone("toynet", "tiny")
    assert model.name == "toynet"
    assert [s.name for s in model.sites()] == ["encoder.conv", "bottleneck.attn", "decoder.conv"]
    assert model(torch.rand(1, 1, 8, 8, 8)).shape == (1, 1, 8, 8, 8)
    report = backbones_cli.describe(backbone="toynet")
    assert report[0]["net_parameters"] == sum(p.numel() for p in model.net.parameters())


def test_a_plug_in_preset_pretrains_on_its_own_schedule_never_the_papers(private_registry, tmp_path):
    from _fakes import make_dataset
    from autopeft.data import read_manifest
    from autopeft.pretraining import source_spec
    from autopeft.train import Trainer, TrainSettings
    from autopeft.backbones import PretrainSchedule

    register_backbone("toynet", {
        "small": Preset("small", (8, 8, 8), 2, {"width": 4}),
        "big": Preset("big", (8, 8, 8), 2, {"width": 8}, pretrain=PretrainSchedule(epochs=7, lr=3e-4, crops_per_volume=2)),
    })(_ToyNet)
    manifest = read_manifest(make_dataset(tmp_path, {"1": 3}, shape=(12, 12, 12)))
    small = source_spec("toynet", "1", manifest=manifest, preset="small")
    assert (small.epochs, small.lr, small.crops) == (120, 2e-3, 4)  # PretrainSchedule(): CPU-scaled
    big = source_spec("toynet", "1", manifest=manifest, preset="big", epochs=3)
    assert (big.epochs, big.lr, big.crops) == (3, 3e-4, 2)
    # Its loss is the Backbone's default, L1; the Trainer needs nothing else.
    model = build_backbone("toynet", "small")
    x = torch.rand(2, 1, 8, 8, 8)
    assert torch.equal(model.generator_loss(x, x.flip(0), model(x)), nn.functional.l1_loss(model(x), x.flip(0)))
    Trainer(model, TrainSettings(epochs=1, lr=1e-3)).step({"short": x, "long": x.flip(0)})


def test_duplicate_registration_raises(private_registry):
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("unetr", {})(_ToyNet)


def test_preset_key_must_match_its_name(private_registry):
    with pytest.raises(ValueError, match="differs from its name"):
        register_backbone("toynet2", {"small": Preset("tiny", (8, 8, 8), 1)})(_ToyNet)


def test_unknown_backbone_or_preset_is_a_config_error_listing_valid_ones():
    with pytest.raises(ConfigError, match=r"registered: .*cvtgan.*unetr"):
        build_backbone("resnet", "tiny")
    with pytest.raises(ConfigError, match=r"presets: .*tiny"):
        build_backbone("unetr", "huge")


def _cli(capsys, **overrides) -> str:
    args = argparse.Namespace(**{"backbone": None, "preset": None, "sites": False, "json": False, **overrides})
    assert backbones_cli.run(args) == 0
    return capsys.readouterr().out


def test_cli_lists_every_backbone_and_preset_with_sizes(capsys):
    out = _cli(capsys)
    assert "101,688,481" in out  # unetr paper, counted on the meta device
    for name in BUILTIN:
        assert name in out
    assert "encoder.vit.0" not in out  # sites only on request


def test_cli_lists_sites_of_one_configuration(capsys):
    out = _cli(capsys, backbone="cvtgan", preset="tiny")
    assert "encoder.stage2.block0" in out and "decoder.fuse1" in out
    assert "unetr" not in out


def test_cli_json_counts_match_the_built_models(capsys):
    reports = json.loads(_cli(capsys, preset="tiny", json=True))
    assert {r["backbone"] for r in reports} == set(BUILTIN)
    for report in reports:
        model = build_backbone(report["backbone"], "tiny")
        assert report["net_parameters"] == sum(p.numel() for p in model.net.parameters())
        assert [s["name"] for s in report["sites"]] == [s.name for s in model.sites()]
        assert sum(s["parameters"] for s in report["sites"]) <= report["net_parameters"]


def test_cli_rejects_unknown_names(capsys):
    with pytest.raises(ConfigError, match="registered"):
        _cli(capsys, backbone="resnet")
    with pytest.raises(ConfigError, match="presets: paper, tiny"):
        _cli(capsys, preset="huge")
