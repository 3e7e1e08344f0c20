"""The registry, the built-in backbones' presets and sizes, and `autopeft backbones`. The checks every
registered backbone must pass (shape, sites, one training step) are in tests/test_conformance.py."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch import nn

import autopeft.backbones.base as base
from autopeft.cli import backbones as backbones_cli
from autopeft.errors import ConfigError
from autopeft.backbones import Backbone, Preset, Site, build_backbone, register_backbone, registered_backbones

BUILTIN = ("unetr", "cvtgan")


def test_builtin_backbones_are_registered_with_both_presets():
    registry = registered_backbones()
    for name in BUILTIN:
        assert set(registry[name]) == {"tiny", "paper"}
        assert registry[name]["tiny"].crop_size == (32, 32, 32)
        assert registry[name]["paper"].crop_size == (64, 64, 64)
        assert registry[name]["paper"].batch_size == 6


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
