"""UNETR backbone: MONAI's network wrapped, not copied; its sites, presets and input checks."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNETR

from autopeft.errors import ConfigError
from autopeft.backbones import Preset, build_backbone
from autopeft.backbones.unetr import PRESETS


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_backbone("unetr", "tiny")


def test_net_is_monai_unetr_and_holds_every_parameter(tiny):
    assert isinstance(tiny.net, UNETR)
    assert tiny.net is tiny.unetr
    assert tiny.loss == "l1"
    assert tiny.discriminator is None
    assert {id(p) for p in tiny.parameters()} == {id(p) for p in tiny.net.parameters()}


def test_sites_map_onto_monai_modules_with_monai_numbering(tiny):
    unetr = tiny.net
    assert [tiny.site(f"encoder.vit.{i}").module for i in range(12)] == list(unetr.vit.blocks)
    for n in range(1, 5):
        assert tiny.site(f"encoder.cnn.{n}").module is getattr(unetr, f"encoder{n}")
    for n in range(2, 6):
        assert tiny.site(f"decoder.cnn.{n}").module is getattr(unetr, f"decoder{n}")
    assert len(tiny.sites()) == 12 + 4 + 4
    # The 1x1 output conv, the patch embedding and the final norm are deliberately no site.
    site_modules = {id(m) for s in tiny.sites() for m in s.module.modules()}
    for module in (unetr.out, unetr.vit.patch_embedding, unetr.vit.norm):
        assert id(module) not in site_modules


def test_vit_sites_sit_at_the_token_resolution_and_cnn_sites_at_their_own(tiny):
    stages = {s.name: s.stage for s in tiny.sites()}
    assert all(stages[f"encoder.vit.{i}"] == 4 for i in range(12))
    assert [stages[f"encoder.cnn.{n}"] for n in range(1, 5)] == [0, 1, 2, 3]
    assert [stages[f"decoder.cnn.{n}"] for n in range(5, 1, -1)] == [3, 2, 1, 0]


def test_presets_follow_petite_and_tiny_keeps_the_topology():
    paper, tiny = PRESETS["paper"].options, PRESETS["tiny"].options
    assert (paper["hidden_size"], paper["mlp_dim"], paper["num_heads"], paper["feature_size"]) == (768, 3072, 12, 32)
    assert paper["norm_name"] == "instance" and paper["res_block"] is True
    assert set(tiny) == set(paper)
    assert tiny["hidden_size"] < paper["hidden_size"] and tiny["hidden_size"] % tiny["num_heads"] == 0


def test_paper_parameter_count_is_monai_unetr_at_64_cubed():
    with torch.device("meta"):
        model = build_backbone("unetr", "paper")
        monai_unetr = UNETR(in_channels=1, out_channels=1, img_size=(64, 64, 64), **PRESETS["paper"].options)
    # UNETR (Hatamizadeh et al., WACV 2022) as MONAI builds it, at 64^3 with feature size 32.
    count = sum(p.numel() for p in model.net.parameters())
    assert count == sum(p.numel() for p in monai_unetr.parameters()) == 101_688_481


def test_input_of_another_size_is_refused_with_the_expected_shape(tiny):
    with pytest.raises(ValueError, match="B x 1 x 32 x 32 x 32"):
        tiny(torch.rand(1, 1, 48, 48, 48))
    with pytest.raises(ValueError, match="B x 1 x"):
        tiny(torch.rand(1, 2, 32, 32, 32))


def test_a_custom_preset_sets_the_crop_size():
    preset = Preset("custom", (48, 32, 16), 1, PRESETS["tiny"].options)
    model = build_backbone("unetr", preset).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 48, 32, 16)).shape == (1, 1, 48, 32, 16)


def test_bad_presets_are_config_errors_that_say_what_to_fix():
    with pytest.raises(ConfigError, match="multiples of 16"):
        build_backbone("unetr", Preset("odd", (40, 40, 40), 1, PRESETS["tiny"].options))
    with pytest.raises(ConfigError, match="did you mean 'feature_size'"):
        build_backbone("unetr", Preset("typo", (32, 32, 32), 1, {"feature_sise": 8}))
    with pytest.raises(ConfigError, match="hidden_size should be divisible by num_heads"):
        build_backbone("unetr", Preset("heads", (32, 32, 32), 1, {"hidden_size": 96, "num_heads": 5}))
