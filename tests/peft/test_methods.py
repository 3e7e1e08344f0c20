"""Method-specific behaviour beyond the matrix: SSF folds, adapter set-up, VPT chains, targets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autopeft.errors import PlanError
from autopeft.peft import Plan, apply_plan, count_trainable, registered_methods
from autopeft.peft._targets import find_targets
from autopeft.peft.adapter import BottleneckAdapter
from autopeft.peft.ssf import SSFLayer


def _norm_with_stats(layer: nn.Module) -> nn.Module:
    if isinstance(layer, nn.BatchNorm3d):
        with torch.no_grad():
            layer.running_mean.uniform_(-1, 1)
            layer.running_var.uniform_(0.5, 2)
    return layer.eval()


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (nn.Linear(6, 5), (2, 7, 6)),
        (nn.Linear(6, 5, bias=False), (2, 7, 6)),
        (nn.Conv3d(4, 6, 3, padding=1, groups=2), (2, 4, 5, 5, 5)),
        (nn.Conv3d(4, 4, 3, padding=1, groups=4, bias=False), (2, 4, 5, 5, 5)),
        (nn.ConvTranspose3d(4, 6, 2, stride=2, groups=2), (2, 4, 3, 3, 3)),
        (nn.LayerNorm(6), (2, 7, 6)),
        (nn.LayerNorm(6, elementwise_affine=False), (2, 7, 6)),
        (nn.BatchNorm3d(4), (2, 4, 3, 3, 3)),
        (nn.InstanceNorm3d(4), (2, 4, 3, 3, 3)),
        (nn.GroupNorm(2, 4), (2, 4, 3, 3, 3)),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else None,
)
def test_ssf_starts_as_identity_and_folds_exactly(layer: nn.Module, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    layer = _norm_with_stats(layer)
    x = torch.randn(shape)
    reference = layer(x)
    wrapped = SSFLayer(layer)
    torch.testing.assert_close(wrapped(x), reference, rtol=0, atol=0)
    with torch.no_grad():
        wrapped.ssf_scale.uniform_(0.5, 1.5)
        wrapped.ssf_shift.normal_(0, 0.3)
    expected = wrapped(x)
    merged = wrapped.merged()
    assert merged is layer
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)


def test_ssf_refuses_a_layer_it_could_not_fold_into() -> None:
    with pytest.raises(PlanError, match="SSF cannot wrap a ReLU; supported layers: Linear"):
        SSFLayer(nn.ReLU())


def test_adapter_starts_as_identity_with_a_random_down_projection() -> None:
    adapter = BottleneckAdapter(channels=16, reduction_factor=4, channels_last=True)
    assert adapter.down.out_features == 4
    assert adapter.down.weight.abs().sum() > 0  # random: it can learn once `up` moves
    assert adapter.up.weight.abs().sum() == 0 and adapter.up.bias.abs().sum() == 0
    assert sum(p.numel() for p in adapter.parameters()) == 2 * 16 * 4 + 4 + 16
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(adapter(x), x, rtol=0, atol=0)
    conv = BottleneckAdapter(channels=8, reduction_factor=8, channels_last=False)
    assert isinstance(conv.down, nn.Conv3d) and conv.down.kernel_size == (1, 1, 1) and conv.down.out_channels == 1


def test_targets_find_fused_and_separate_qkv(envs) -> None:
    unetr_block = envs("unetr").base.site("encoder.vit.0").module
    (fused,) = find_targets(unetr_block, ("q", "k"))
    assert fused.name == "attn.qkv" and fused.parts == ("q", "k")
    cvt_block = envs("cvtgan").base.site("encoder.stage2.block0").module
    assert [t.name for t in find_targets(cvt_block, ("q", "k"))] == ["attn.proj_q", "attn.proj_k"]
    assert [t.name for t in find_targets(cvt_block, ("mlp_out", "out_proj"))] == ["attn.out_proj", "mlp.linear2"]
    depthwise = [t.layer for t in find_targets(cvt_block, ("conv",))]
    assert len(depthwise) == 3 and all(conv.groups == conv.in_channels for conv in depthwise)


def test_vpt_unetr_strips_prompts_from_every_hidden_state(envs) -> None:
    env = envs("unetr")
    model = env.fresh()
    plan = Plan.from_dict({"backbone": "unetr", "sites": {"encoder.vit.*": {"method": "vpt", "tokens": 5, "skip_first": 1}}})
    apply_plan(model, plan)
    hidden = model.net.vit.blocks[0].norm1.normalized_shape[0]
    assert count_trainable(model) == 5 * hidden
    assert hasattr(model.net.vit.blocks[1], "peft_prompts") and not hasattr(model.net.vit.blocks[0], "peft_prompts")
    seen: list[int] = []
    model.net.vit.blocks[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        tokens, hidden_states = model.net.vit(env.x)
        _, plain_states = env.base.net.vit(env.x)
    # Block 1 sees the prompts in front of the image tokens; no hidden state keeps them.
    assert seen == [plain_states[0].shape[1] + 5]
    assert [h.shape for h in hidden_states] == [h.shape for h in plain_states]
    assert tokens.shape == plain_states[-1].shape
    torch.testing.assert_close(hidden_states[0], plain_states[0])  # block 0 is not prompted
    assert not torch.allclose(hidden_states[1], plain_states[1])


def test_vpt_cvtgan_one_prompt_matrix_per_stage(envs) -> None:
    model = envs("cvtgan").fresh()
    plan = Plan.from_dict(
        {"backbone": "cvtgan", "sites": {"encoder.*.block*": {"method": "vpt", "tokens": [0, 2, 3], "skip_first": 0}}}
    )
    apply_plan(model, plan)
    widths = model.net.widths
    assert count_trainable(model) == 2 * widths[2] + 3 * widths[3]
    assert not hasattr(model.net.encoder[0].blocks[0], "peft_prompts")
    out = model(envs("cvtgan").x)
    out.mean().backward()
    prompts = [p for n, p in model.named_parameters() if n.endswith("peft_prompts.prompts")]
    assert len(prompts) == 2 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in prompts)


def test_vpt_token_list_must_match_the_stages(envs) -> None:
    plan = Plan.from_dict({"backbone": "cvtgan", "sites": {"encoder.*.block*": {"method": "vpt", "tokens": [8, 32]}}})
    with pytest.raises(PlanError, match="lists 2 counts, but the matched sites form 3 stages .*encoder.stage2.block0"):
        apply_plan(envs("cvtgan").fresh(), plan)


def test_every_method_declares_kinds_and_a_checked_config() -> None:
    methods = registered_methods()
    assert list(methods) == ["none", "full", "bitfit", "layernorm", "lora", "adapter", "ssf", "vpt", "shpeft"]
    assert methods["vpt"].site_kinds == ("vit",)
    assert all(set(m.site_kinds) <= {"vit", "cnn"} for m in methods.values())


def test_registry_refuses_duplicates() -> None:
    from autopeft.peft.base import register_method
    from autopeft.peft.lora import Lora

    class Again(Lora):
        name = "lora"

    with pytest.raises(ValueError, match="already registered"):
        register_method(Again)


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"name": "lora2", "space_params": ("rank",)}, r"`space_params` of PEFT method 'lora2' must not repeat config fields, but got \['rank'\]"),
        ({"name": "lora3", "summary_fields": ("rnak",)}, r"`summary_fields` of PEFT method 'lora3' must be config fields \(rank, alpha, targets, dropout\)"),
    ],
)
def test_registry_refuses_capabilities_that_do_not_fit_the_config(attributes, message) -> None:
    from autopeft.peft.base import register_method
    from autopeft.peft.lora import Lora

    with pytest.raises(ValueError, match=message):
        register_method(type("Odd", (Lora,), attributes))
    assert attributes["name"] not in registered_methods()


def test_capabilities_of_the_built_in_methods() -> None:
    methods = registered_methods()
    assert [n for n, m in methods.items() if m.trains_nothing] == ["none"]
    assert [n for n, m in methods.items() if m.needs_importance] == ["shpeft"]
    assert {n: m.space_params for n, m in methods.items() if m.space_params} == {"vpt": ("first_stage",)}
    # VPT's first_stage: prompts from that stage on over several stages, or skip_first in one stage.
    stages = [type("S", (), {"name": f"b{i}", "role": "encoder", "kind": "vit", "stage": s}) for i, s in enumerate((2, 3, 3, 4))]
    assert methods["vpt"].from_space({"tokens": 8, "first_stage": 1}, stages) == {"tokens": [0, 8, 8], "skip_first": 0}
    assert methods["vpt"].from_space({"tokens": 8, "first_stage": 5}, stages) == {"tokens": [0, 0, 8], "skip_first": 0}
    assert methods["vpt"].from_space({"tokens": 8, "first_stage": 1}, stages[1:3]) == {"tokens": 8, "skip_first": 1}


def test_plan_summaries_show_the_fields_each_method_names() -> None:
    from autopeft.report import plan_summary

    plan = Plan.from_dict({"backbone": "unetr", "bitfit": True, "train": {"lr": 1e-3}, "sites": {
        "encoder.vit.*": {"method": "lora", "rank": 4, "alpha": 8, "targets": ["q", "k"], "dropout": 0.1},
        "encoder.cnn.*": {"method": "adapter", "reduction_factor": 4, "activation": "gelu"},
        "decoder.*": {"method": "shpeft", "count": 100}}})
    assert plan_summary(plan.to_dict()) == ("encoder.vit.*=lora(rank=4,targets=q+k) encoder.cnn.*=adapter(reduction_factor=4) "
                                            "decoder.*=shpeft(count=100) +bitfit lr=0.001")
