"""3D CVT-GAN: the CvT parts, the generator, the logit-valued patch discriminator, sites and sizes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from autopeft.errors import ConfigError
from autopeft.backbones import Preset, build_backbone
from autopeft.backbones.blocks.cvt import ConvEmbedding, ConvProjectionAttention, CvTBlock, CvTStage
from autopeft.backbones.cvtgan import PRESETS, CvTGenerator, PatchDiscriminator


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_backbone("cvtgan", "tiny")


def test_attention_equals_softmax_attention_over_strided_conv_projections():
    torch.manual_seed(0)
    attn = ConvProjectionAttention(dim=8, num_heads=2).eval()
    tokens = torch.randn(2, 4 * 4 * 4, 8)
    volume = tokens.transpose(1, 2).reshape(2, 8, 4, 4, 4)

    def project(conv, norm, linear):
        return linear(norm(conv(volume)).flatten(2).transpose(1, 2))

    q = project(attn.conv_q, attn.norm_q, attn.proj_q)
    k = project(attn.conv_k, attn.norm_k, attn.proj_k)
    v = project(attn.conv_v, attn.norm_v, attn.proj_v)
    assert q.shape[1] == 64 and k.shape[1] == v.shape[1] == 8  # keys/values at stride 2
    heads = lambda t: t.view(2, t.shape[1], 2, 4).transpose(1, 2)  # noqa: E731
    weights = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) * 8**-0.5, dim=-1)
    expected = attn.out_proj((weights @ heads(v)).transpose(1, 2).reshape(2, 64, 8))
    with torch.no_grad():
        assert torch.allclose(attn(tokens, (4, 4, 4)), expected, atol=1e-5)


def test_attention_projections_are_depthwise_without_bias_and_linear_qkv():
    attn = ConvProjectionAttention(dim=16, num_heads=4)
    for conv in (attn.conv_q, attn.conv_k, attn.conv_v):
        assert conv.groups == 16 and conv.bias is None and conv.kernel_size == (3, 3, 3)
    assert attn.conv_q.stride == (1, 1, 1) and attn.conv_k.stride == attn.conv_v.stride == (2, 2, 2)
    assert all(isinstance(m, nn.Linear) for m in (attn.proj_q, attn.proj_k, attn.proj_v, attn.out_proj))
    with pytest.raises(ValueError, match="`num_heads` must be a positive divisor of `dim` = 16"):
        ConvProjectionAttention(dim=16, num_heads=3)


def test_leading_extra_tokens_take_part_in_attention_and_keep_their_place():
    torch.manual_seed(0)
    block = CvTBlock(8, 2).eval()
    tokens, prompts = torch.randn(2, 64, 8), torch.randn(2, 3, 8)
    with torch.no_grad():
        plain = block(tokens, (4, 4, 4))
        prompted = block(torch.cat([prompts, tokens], dim=1), (4, 4, 4))
    assert prompted.shape == (2, 67, 8)
    assert not torch.allclose(prompted[:, 3:], plain)  # the volume tokens attended to the prompts


def test_stage_drops_tokens_a_wrapped_block_prepends():
    torch.manual_seed(0)
    stage = CvTStage(ConvEmbedding(4, 8), 8, depth=2, num_heads=2).eval()
    volume, prompts = torch.randn(2, 4, 8, 8, 8), torch.randn(1, 3, 8)
    with torch.no_grad():
        plain = stage(volume)
        handle = stage.blocks[0].register_forward_pre_hook(
            lambda _m, args: (torch.cat([prompts.expand(args[0].shape[0], -1, -1), args[0]], 1), args[1])
        )
        prompted = stage(volume)
        handle.remove()
    assert plain.shape == prompted.shape == (2, 8, 4, 4, 4)
    assert not torch.allclose(plain, prompted)


def test_generator_keeps_the_shape_of_any_multiple_of_16(tiny):
    with torch.no_grad():
        for shape in [(32, 32, 32), (48, 32, 16)]:
            assert tiny.net.eval()(torch.rand(1, 1, *shape)).shape == (1, 1, *shape)
    with pytest.raises(ValueError, match="multiples of 16"):
        tiny.net(torch.rand(1, 1, 40, 32, 32))


def test_generator_output_is_decoder_plus_input():
    torch.manual_seed(0)
    generator = CvTGenerator(widths=(8, 16, 32, 64)).eval()
    nn.init.zeros_(generator.out.weight)
    nn.init.zeros_(generator.out.bias)
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(generator(x), x)


def test_a_batch_of_one_trains_at_the_tiny_crop(tiny):
    # The 2^3 deepest stage keeps keys at stride 1, so no BatchNorm sees a single value.
    tiny.train()
    fake = tiny(torch.rand(1, 1, 32, 32, 32))
    logits = tiny.discriminator(torch.cat([torch.rand(1, 1, 32, 32, 32), fake], dim=1))
    logits.mean().backward()
    assert torch.isfinite(logits).all()
    tiny.zero_grad()


def test_discriminator_returns_patch_logits_without_a_sigmoid(tiny):
    discriminator = tiny.discriminator.eval()
    assert not any(isinstance(m, nn.Sigmoid) for m in discriminator.modules())
    pair = torch.rand(2, 2, 32, 32, 32)
    with torch.no_grad():
        logits = discriminator(pair)
        assert logits.shape == (2, 1, 2, 2, 2)
        bias = discriminator.head.bias.clone()
        discriminator.head.bias.fill_(5.0)
        high = discriminator(pair)
        discriminator.head.bias.fill_(-5.0)
        low = discriminator(pair)
        discriminator.head.bias.copy_(bias)
    assert (high > 1).any() and (low < 0).any()  # unbounded: values outside [0, 1]
    with pytest.raises(ValueError, match="B x 2 x D x H x W"):
        discriminator(torch.rand(2, 1, 32, 32, 32))


def test_adversarial_losses_reach_the_intended_network(tiny):
    tiny.train()
    torch.manual_seed(0)
    short, long = torch.rand(2, 1, 32, 32, 32), torch.rand(2, 1, 32, 32, 32)
    fake = tiny(short)
    real_logits = tiny.discriminator(torch.cat([short, long], 1))
    fake_logits = tiny.discriminator(torch.cat([short, fake.detach()], 1))
    d_loss = 0.5 * (
        F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
        + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    )
    d_loss.backward()
    assert all(p.grad is None for p in tiny.net.parameters())
    assert all(p.grad is not None for p in tiny.discriminator.parameters())
    tiny.zero_grad(set_to_none=True)
    adversarial = tiny.discriminator(torch.cat([short, fake], 1))
    g_loss = F.binary_cross_entropy_with_logits(adversarial, torch.ones_like(adversarial)) + 100 * F.l1_loss(fake, long)
    g_loss.backward()
    assert all(p.grad is not None for p in tiny.net.parameters())
    tiny.zero_grad(set_to_none=True)
    assert tiny.loss == "gan"


def test_site_names_follow_the_resolution_levels(tiny):
    expected = (
        ["encoder.stem", "encoder.stage2.embed", "encoder.stage2.block0"]
        + ["encoder.stage3.embed", "encoder.stage3.block0", "encoder.stage3.block1"]
        + ["encoder.stage4.embed", "encoder.stage4.block0", "encoder.stage4.block1", "bottleneck.conv"]
        + ["decoder.stage3.embed", "decoder.stage3.block0", "decoder.stage3.block1", "decoder.fuse3"]
        + ["decoder.stage2.embed", "decoder.stage2.block0", "decoder.fuse2", "decoder.up1", "decoder.fuse1"]
    )
    sites = tiny.sites()
    assert [s.name for s in sites] == expected
    for site in sites:
        if ".stage" in site.name or ".fuse" in site.name:
            assert str(site.stage) in site.name.split(".")[1]
    assert tiny.site("decoder.stage3.block1").module is tiny.net.decoder[0].blocks[1]
    # Every generator parameter except the 1-channel output conv lies in a site.
    in_sites = sum(p.numel() for s in sites for p in s.module.parameters())
    total = sum(p.numel() for p in tiny.net.parameters())
    assert total - in_sites == sum(p.numel() for p in tiny.net.out.parameters())


def test_paper_sizes_match_the_public_code_once_its_unused_layers_are_added_back():
    with torch.device("meta"):
        model = build_backbone("cvtgan", "paper")
    w0, w1, w2, w3 = model.net.widths
    assert model.net.widths == (64, 128, 256, 512)
    generator = sum(p.numel() for p in model.net.parameters())
    # The public residual blocks (w3->w3, 2w2->w2, 2w1->w1) each held an unused 1x1 ConvTranspose3d;
    # its bottleneck residual was a 1x1 conv w3->w3 where ours is the identity.
    unused = (w3 * w3 + w3) + (2 * w2 * w2 + w2) + (2 * w1 * w1 + w1)
    bottleneck_projection = w3 * w3 + w3
    assert generator == 28_026_145
    assert generator + unused + bottleneck_projection == 28_715_681  # the public code's 28.7 M
    discriminator = sum(p.numel() for p in model.discriminator.parameters())
    # Public: no 1x1 logit head (64 + 1) but an unused Linear(128, 1) (129).
    assert discriminator == 294_937 and discriminator - 65 + 129 == 295_001  # the public 0.295 M


def test_tiny_preset_keeps_the_paper_topology():
    paper, tiny = PRESETS["paper"].options, PRESETS["tiny"].options
    for key in ("encoder_depths", "encoder_heads", "decoder_depths", "decoder_heads"):
        assert tiny["generator"][key] == paper["generator"][key]
    assert len(tiny["generator"]["widths"]) == len(paper["generator"]["widths"])
    assert PRESETS["tiny"].crop_size == (32, 32, 32) and PRESETS["tiny"].batch_size == 2


def test_bad_presets_are_config_errors_that_say_what_to_fix():
    with pytest.raises(ConfigError, match="did you mean 'widths'"):
        build_backbone("cvtgan", Preset("typo", (32, 32, 32), 1, {"generator": {"widht": (8, 16, 32, 64)}}))
    with pytest.raises(ConfigError, match="multiples of 16"):
        build_backbone("cvtgan", Preset("odd", (40, 40, 40), 1, PRESETS["tiny"].options))
    with pytest.raises(ConfigError, match="`encoder_heads` must have 3 entries"):
        build_backbone(
            "cvtgan",
            Preset("short", (32, 32, 32), 1, {"generator": {"widths": (8, 16, 32, 64), "encoder_heads": (2, 4)}}),
        )
    with pytest.raises(ValueError, match="`cvt_depths` must have 2 entries"):
        PatchDiscriminator(cvt_depths=(1,))
