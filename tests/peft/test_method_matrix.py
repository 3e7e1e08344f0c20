"""One matrix of cases, method x site kind x backbone, run through the same checks.

Every case: the output shape is unchanged; exactly the intended layers change and exactly the
intended parameters train, all inside the matched sites, the discriminator stays frozen, and only
trainable parameters get gradients; after AdamW steps the saved and reloaded model gives the tuned
model's outputs. What every registered method promises (the identity at injection, its count,
switching off, merging, the site kinds it refuses) is checked in tests/test_conformance.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from _peft_toy import l1_loss
from torch import nn

from autopeft.errors import PlanError
from autopeft.peft import Plan, apply_plan, count_trainable, load_trained, save_trained, trainable_fraction
from autopeft.peft.base import MergeableLayer
from autopeft.peft.lora_layers import LoraFusedQKV

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)

# Which parameters a method trains, from (parameter name, owning module, site kind).
Expect = Callable[[str, nn.Module, str], bool]
EXPECTED: dict[str, Expect] = {
    "none": lambda name, owner, kind: False,
    "full": lambda name, owner, kind: True,
    "bitfit": lambda name, owner, kind: name.endswith(".bias"),
    "layernorm": lambda name, owner, kind: isinstance(owner, nn.LayerNorm if kind == "vit" else _NORMS),
    "lora": lambda name, owner, kind: ".lora_" in name,
    "adapter": lambda name, owner, kind: ".peft_adapter." in name,
    "ssf": lambda name, owner, kind: ".ssf_" in name,
    "vpt": lambda name, owner, kind: name.endswith("peft_prompts.prompts"),
    "shpeft": lambda name, owner, kind: ".parametrizations." in name and name.endswith(".values"),
}

# The layers each plan entry changes, per matched site, written out from the networks: a method on
# the wrong layer fails here even when it trains parameters of the right kind. Names are relative
# to the site's module ("" is a site that is one layer); "qkv[q+k]" names the thirds of a fused qkv
# Linear that LoRA adapts; "<prompted>" a block VPT puts prompts in front of. Sites that match no
# pattern of a case must be left alone.
_UNETR_CONVS = {"transp_conv.conv", "conv_block.conv1.conv", "conv_block.conv2.conv", "conv_block.conv3.conv"}
_UNETR_NORMS = {"conv_block.norm1", "conv_block.norm2", "conv_block.norm3"}
_VIT_SSF = {"norm1", "attn.out_proj", "norm2", "mlp.linear2"}  # norms, output projection, last MLP Linear
TARGETED: dict[str, dict[str, set[str]]] = {
    "toy-vit-lora": {"enc.vit.*": {"attn.qkv[q+k]"}},
    "toy-vit-lora-qkv+out_proj+mlp": {"enc.vit.*": {"attn.qkv[q+k+v]", "attn.out_proj", "mlp.linear1", "mlp.linear2"}},
    "toy-vit-lora-v": {"enc.vit.*": {"attn.qkv[v]"}},
    "toy-vit-adapter": {"enc.vit.*": {"mlp"}},
    "toy-vit-ssf": {"enc.vit.*": _VIT_SSF},
    "toy-vit-vpt": {"enc.vit.1": {"<prompted>"}},  # skip_first: 1
    "toy-cnn-lora": {"dec.cnn.0": {"conv", "depthwise", "up"}, "dec.cnn.1": {""}},
    "toy-cnn-adapter": {"dec.cnn.*": {""}},
    "toy-cnn-ssf": {"dec.cnn.0": {"conv", "norm", "depthwise", "bn", "up"}, "dec.cnn.1": {""}},
    "unetr-vit-lora": {"encoder.vit.*": {"attn.qkv[q+k]"}},
    "unetr-vit-lora-qkv+out_proj+mlp": {"encoder.vit.*": {"attn.qkv[q+k+v]", "attn.out_proj", "mlp.linear1", "mlp.linear2"}},
    "unetr-vit-lora-v": {"encoder.vit.*": {"attn.qkv[v]"}},
    "unetr-vit-adapter": {"encoder.vit.*": {"mlp"}},
    "unetr-vit-ssf": {"encoder.vit.*": _VIT_SSF},
    "unetr-vit-vpt": {"encoder.vit.[!0]*": {"<prompted>"}},
    "unetr-cnn-lora": {"decoder.*": _UNETR_CONVS},
    "unetr-cnn-adapter": {"decoder.*": {""}},
    "unetr-cnn-ssf": {"decoder.*": _UNETR_CONVS | _UNETR_NORMS},
    "cvtgan-vit-lora": {"*.block*": {"attn.proj_q", "attn.proj_k"}},
    "cvtgan-vit-lora-qkv+out_proj+mlp": {"*.block*": {"attn.proj_q", "attn.proj_k", "attn.proj_v", "attn.out_proj",
                                                      "mlp.linear1", "mlp.linear2"}},
    "cvtgan-vit-lora-conv": {"*.block*": {"attn.conv_q", "attn.conv_k", "attn.conv_v"}},  # the depthwise projections
    "cvtgan-vit-adapter": {"*.block*": {"mlp"}},
    # CvT blocks: besides the LayerNorms, the BatchNorms after the depthwise q/k/v convolutions.
    "cvtgan-vit-ssf": {"*.block*": _VIT_SSF | {"attn.norm_q", "attn.norm_k", "attn.norm_v"}},
    "cvtgan-vit-vpt": {"encoder.stage[34].block*": {"<prompted>"}, "decoder.*": {"<prompted>"}},
    "cvtgan-cnn-lora": {"decoder.fuse[32]": {"conv.unit0.conv", "residual"}, "decoder.up1": {""},
                        "decoder.fuse1": {"0.conv", "1.conv"}},
    "cvtgan-cnn-adapter": {"decoder.[fu]*": {""}},
    "cvtgan-cnn-ssf": {"decoder.fuse[32]": {"conv.unit0.conv", "conv.unit0.adn.N", "residual"}, "decoder.up1": {""},
                       "decoder.fuse1": {"0.conv", "1.conv"}},
}

# Site patterns selecting one kind of site in each backbone.
PATTERNS = {
    ("toy", "vit"): "enc.vit.*",
    ("toy", "cnn"): "dec.cnn.*",
    ("unetr", "vit"): "encoder.vit.*",
    ("unetr", "cnn"): "decoder.*",
    ("cvtgan", "vit"): "*.block*",
    ("cvtgan", "cnn"): "decoder.[fu]*",  # fuse3, fuse2, up1 (a bare ConvTranspose3d), fuse1
}


@dataclass(frozen=True)
class Case:
    backbone: str
    kind: str
    method: str
    options: dict = field(default_factory=dict)
    error: str | None = None  # a PlanError expected, matching this text

    @property
    def id(self) -> str:
        extra = "+".join(self.options.get("targets", []))
        return f"{self.backbone}-{self.kind}-{self.method}" + (f"-{extra}" if extra else "")


_BUDGET = {"toy": 50, "unetr": 400, "cvtgan": 200}


def _cases() -> list[Case]:
    cases = []
    for backbone in ("toy", "unetr", "cvtgan"):
        for kind in ("vit", "cnn"):
            for method in ("none", "full", "bitfit", "layernorm", "lora", "adapter", "ssf", "shpeft"):
                options = {"count": _BUDGET[backbone]} if method == "shpeft" else {}
                options = {"reduction_factor": 4, "activation": "gelu"} if method == "adapter" else options
                error = None
                if backbone == "unetr" and kind == "cnn" and method in ("bitfit", "layernorm"):
                    error = "finds nothing to train"  # MONAI's decoder: bias-free convs, non-affine norms
                cases.append(Case(backbone, kind, method, options, error))
        cases.append(Case(backbone, "vit", "vpt", {"tokens": 3, "skip_first": 1}))
        cases.append(Case(backbone, "vit", "lora", {"targets": ["qkv", "out_proj", "mlp"], "rank": 2}))
        cases.append(Case(backbone, "vit", "lora", {"targets": ["conv"] if backbone == "cvtgan" else ["v"], "rank": 2}))
    return cases


CASES = _cases()


def _site_prefixes(model: nn.Module, sites: list) -> dict[str, str]:
    """Qualified module name prefix -> site kind, for the given sites (after injection)."""
    module_names = {id(m): n for n, m in model.named_modules()}
    return {module_names[id(s.module)] + ".": s.kind for s in sites}


def _expected_names(model: nn.Module, case: Case, pattern: str) -> set[str]:
    import fnmatch

    sites = [s for s in model.sites() if fnmatch.fnmatchcase(s.name, pattern)]
    prefixes = _site_prefixes(model, sites)
    expected = set()
    for name, _ in model.named_parameters():
        kind = next((k for prefix, k in prefixes.items() if name.startswith(prefix)), None)
        if kind is None:
            continue
        if "norm_cross_attn" in name:
            continue  # built by MONAI's TransformerBlock but never used without cross-attention
        owner = model.get_submodule(name.rpartition(".")[0])
        if EXPECTED[case.method](name, owner, kind):
            expected.add(name)
    return expected


def _targeted(model: nn.Module, site, method: str) -> set[str]:
    """The layers ``method`` changed inside ``site`` (after injection), named as in :data:`TARGETED`."""
    prefix = next(n for n, m in model.named_modules() if m is site.module)
    found = {"<prompted>"} if method == "vpt" and site.module._forward_pre_hooks else set()
    for name, module in model.named_modules():
        if name != prefix and not name.startswith(prefix + "."):
            continue
        rel = name[len(prefix) + 1:]
        if method in ("lora", "ssf") and isinstance(module, MergeableLayer):
            found.add(rel + (f"[{'+'.join(module.parts)}]" if isinstance(module, LoraFusedQKV) else ""))
        if method == "adapter" and "peft_adapter" in module._modules:
            found.add(rel)
    return found


def test_every_layer_targeting_case_has_its_layers_written_out():
    assert {c.id for c in CASES if c.method in ("lora", "adapter", "ssf", "vpt") and not c.error} == set(TARGETED)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_method_on_site_kind(case: Case, envs, tmp_path) -> None:
    env = envs(case.backbone)
    pattern = PATTERNS[(case.backbone, case.kind)]
    plan = Plan.from_dict({"backbone": case.backbone, "sites": {pattern: {"method": case.method, **case.options}}})
    model = env.fresh()
    if case.error:
        with pytest.raises(PlanError, match=case.error):
            apply_plan(model, plan, importance=env.scores)
        return
    apply_plan(model, plan, importance=env.scores)

    # Exactly the intended layers change, and exactly the intended parameters train; they all lie
    # inside the matched sites.
    if case.id in TARGETED:
        import fnmatch

        for site in model.sites():
            wanted = next((layers for p, layers in TARGETED[case.id].items() if fnmatch.fnmatchcase(site.name, p)), set())
            assert _targeted(model, site, case.method) == (wanted if fnmatch.fnmatchcase(site.name, pattern) else set()), site.name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == _expected_names(model, case, pattern)
    assert (len(trainable) > 0) == (case.method != "none")
    assert count_trainable(model) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    if model.discriminator is not None:
        assert not any(p.requires_grad for p in model.discriminator.parameters())
    if case.method == "shpeft":
        assert count_trainable(model) == _BUDGET[case.backbone]
    base_total = sum(p.numel() for p in env.base.net.parameters())
    assert trainable_fraction(model) == pytest.approx(count_trainable(model) / base_total)

    # Shape unchanged.
    model.eval()
    with torch.no_grad():
        out = model(env.x)
    assert out.shape == env.x.shape

    # Gradients reach exactly the trainable parameters; after one step both LoRA factors and both
    # adapter projections learn (B / up start at zero).
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1) if params else None
    steps = 2 if case.method in ("lora", "adapter") else 1
    for step in range(steps if params else 0):
        optimizer.zero_grad(set_to_none=True)
        l1_loss(model, (env.x, env.target)).backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == p.requires_grad, name
            if step == 1 and (".lora_" in name or ".peft_adapter." in name):
                assert p.grad.abs().sum() > 0, f"{name} gets no gradient"
        optimizer.step()
    model.eval()
    with torch.no_grad():
        tuned = model(env.x)
    if case.method != "none":
        assert not torch.allclose(tuned, out)

    # Save / load onto a fresh copy of the pre-trained model gives the same outputs.
    save_trained(model, plan, tmp_path)
    loaded = load_trained(env.base, tmp_path)
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(env.x), tuned, rtol=0, atol=1e-6)
