"""Plans: parsing, YAML round trips, named plans, and errors that list the valid choices."""

from __future__ import annotations

import pytest
import torch

from autopeft.errors import PlanError
from autopeft.peft import Plan, apply_plan, count_trainable, load_plan, named_plans, trainable_fraction
from autopeft.peft.apply import merge_plan, plan_state

PETITE_UNETR = """
backbone: unetr
bitfit: true
sites:
  encoder.vit.*:  {method: lora, rank: 4, alpha: 8, targets: [q, k]}
  decoder.*:      {method: ssf}
train: {lr: 1.0e-3, epochs: 200}
"""


def test_yaml_round_trip_keeps_the_plan() -> None:
    plan = Plan.from_yaml(PETITE_UNETR)
    assert plan.bitfit and plan.train == {"lr": 1e-3, "epochs": 200}
    assert plan.sites["encoder.vit.*"].config.targets == ("q", "k")
    assert Plan.from_yaml(plan.to_yaml()) == plan


def test_key_tells_plans_apart_as_to_dict_does() -> None:
    a = Plan.from_dict({"backbone": "unetr", "sites": {"encoder.*": {"method": "lora", "rank": 4}, "decoder.*": {"method": "ssf"}}})
    same = Plan.from_dict(a.to_dict())
    other_rank = Plan.from_dict({**a.to_dict(), "sites": {"encoder.*": {"method": "lora", "rank": 8}, "decoder.*": {"method": "ssf"}}})
    # Patterns match in order (the first wins), so the order is part of the plan.
    swapped = Plan.from_dict({**a.to_dict(), "sites": dict(reversed(list(a.to_dict()["sites"].items())))})
    assert a.key() == same.key()
    assert len({a.key(), other_rank.key(), swapped.key(), Plan.from_dict({**a.to_dict(), "train": {"lr": 0.01}}).key()}) == 4


def test_yaml_file_round_trip(tmp_path) -> None:
    plan = Plan.from_yaml(PETITE_UNETR)
    path = tmp_path / "plan.yaml"
    plan.to_yaml(path)
    assert Plan.from_yaml(path) == plan
    assert load_plan(path) == plan


def test_named_plans_cover_table_1_and_the_winners() -> None:
    names = set(named_plans())
    for backbone in ("unetr", "cvtgan"):
        for row in ("noft", "fullft", "layernorm", "bitfit", "lora", "adapters", "ssf", "vpt"):
            assert f"{backbone}-{row}" in names
    assert {"petite-unetr", "petite-cvtgan"} <= names
    winner = load_plan("petite-cvtgan")
    assert winner.bitfit and winner.backbone == "cvtgan"
    assert {spec.method for spec in winner.sites.values()} == {"vpt", "lora"}
    assert load_plan("unetr-lora").sites["encoder.vit.*"].config.rank == 4
    assert load_plan("cvtgan-lora").sites["*.block*"].config.alpha == 16


@pytest.mark.parametrize("name", sorted(named_plans()))
def test_every_named_plan_applies_to_its_tiny_backbone(name: str, envs) -> None:
    plan = load_plan(name)
    model = apply_plan(envs(plan.backbone).fresh(), plan)
    count = count_trainable(model)
    if name.endswith("noft"):
        assert count == 0
    elif name.endswith("fullft"):
        assert trainable_fraction(model) > 0.999
    else:
        assert 0 < trainable_fraction(model) < 0.05


def test_load_plan_lists_the_named_plans() -> None:
    with pytest.raises(PlanError, match=r"No plan named 'petite-unter' \(did you mean 'petite-unetr'\?\); named plans: .*cvtgan-adapters"):
        load_plan("petite-unter")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"backbone": "unetr", "sites": {"*": {"method": "loar"}}}, r"Unknown PEFT method 'loar' \(did you mean 'lora'\?\); methods: none, full, bitfit"),
        ({"backbone": "unetr", "sites": {"*": {"method": "lora", "rnak": 4}}}, r"unknown hyperparameter 'rnak' .*did you mean 'rank'.*valid ones: rank, alpha, targets, dropout"),
        ({"backbone": "unetr", "sites": {"*": {"method": "ssf", "rank": 4}}}, "unknown hyperparameter 'rank' for method 'ssf'; valid ones: targets"),
        ({"backbone": "unetr", "sites": {"*": {"method": "lora", "rank": -1}}}, r"sites\['\*'\] \(method 'lora'\): `rank` must be a positive integer"),
        ({"backbone": "unetr", "sites": {"*": {"rank": 4}}}, "must be a mapping with a `method` key"),
        ({"backbone": "unetr", "site": {}}, r"unknown field 'site' \(did you mean 'sites'\?\)"),
        ({"sites": {}}, "`backbone` must name a registered backbone"),
        ({"backbone": "unetr", "bitfit": "yes"}, "`bitfit` must be true or false"),
        ({"backbone": "unetr", "sites": {"*": {"method": "shpeft"}}}, "exactly one of `fraction` and `count`"),
        ({"backbone": "unetr", "sites": {"*": {"method": "vpt", "tokens": 0}}}, "at least one prompt"),
        ({"backbone": "unetr", "sites": {"*": {"method": "adapter", "reduction_factor": 0}}}, "`reduction_factor` must be a positive integer"),
    ],
)
def test_bad_plans_name_the_field_and_the_valid_choices(data, message) -> None:
    with pytest.raises(PlanError, match=message):
        Plan.from_dict(data)


def test_not_a_yaml_mapping_is_a_plan_error(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(PlanError, match="a plan must be a mapping"):
        Plan.from_yaml(path)
    with pytest.raises(PlanError, match="does not exist"):
        Plan.from_yaml(tmp_path / "missing.yaml")


def test_pattern_matching_no_site_lists_the_sites(envs) -> None:
    plan = Plan.from_dict({"backbone": "toy", "sites": {"encoder.*": {"method": "lora"}}})
    with pytest.raises(PlanError, match="'encoder.\\*' matches no site of backbone 'toy'; sites: enc.vit.0, enc.vit.1, dec.cnn.0, dec.cnn.1"):
        apply_plan(envs("toy").fresh(), plan)


def test_method_on_the_wrong_kind_lists_the_methods_that_fit(envs) -> None:
    plan = Plan.from_dict({"backbone": "toy", "sites": {"dec.*": {"method": "vpt"}}})
    with pytest.raises(PlanError, match="cannot sit on site 'dec.cnn.0' of kind 'cnn'; methods that fit 'cnn' sites: none, full, bitfit, layernorm, lora, adapter, ssf, shpeft"):
        apply_plan(envs("toy").fresh(), plan)


def test_site_matched_twice_with_different_methods_is_refused(envs) -> None:
    plan = Plan.from_dict({"backbone": "toy", "sites": {"enc.*": {"method": "lora"}, "enc.vit.1": {"method": "ssf"}}})
    with pytest.raises(PlanError, match="'enc.vit.1' is matched by 'enc.\\*' \\(lora\\) and by 'enc.vit.1' \\(ssf\\)"):
        apply_plan(envs("toy").fresh(), plan)
    same = Plan.from_dict({"backbone": "toy", "sites": {"enc.*": {"method": "ssf"}, "enc.vit.1": {"method": "ssf"}}})
    apply_plan(envs("toy").fresh(), same)  # the same settings twice are fine


def test_targets_that_match_nothing_list_what_the_site_offers(envs) -> None:
    plan = Plan.from_dict({"backbone": "toy", "sites": {"dec.cnn.1": {"method": "lora", "targets": ["q"]}}})
    with pytest.raises(PlanError, match="match no layer in site 'dec.cnn.1' \\(cnn\\); roles this site offers: conv"):
        apply_plan(envs("toy").fresh(), plan)


def test_wrong_backbone_and_second_application_are_refused(envs) -> None:
    with pytest.raises(PlanError, match="written for backbone 'unetr', but the model is 'toy'"):
        apply_plan(envs("toy").fresh(), Plan.from_dict({"backbone": "unetr"}))
    model = apply_plan(envs("toy").fresh(), Plan.from_dict({"backbone": "toy", "bitfit": True}))
    with pytest.raises(PlanError, match="already applied"):
        apply_plan(model, Plan.from_dict({"backbone": "toy"}))


def test_no_ft_trains_nothing_and_everything_is_frozen(envs) -> None:
    model = apply_plan(envs("toy").fresh(), {"backbone": "toy"})
    assert count_trainable(model) == 0 and not any(p.requires_grad for p in model.parameters())
    # A plan of methods that train nothing is No-FT too: nothing to fine-tune.
    frozen = Plan.from_dict({"backbone": "toy", "sites": {"*": {"method": "none"}}})
    assert not frozen.trains_anything and Plan.from_dict({"backbone": "toy", "bitfit": True, "sites": frozen.to_dict()["sites"]}).trains_anything
    assert count_trainable(apply_plan(envs("toy").fresh(), frozen)) == 0


def test_bitfit_toggle_combines_with_a_site_method_over_the_whole_net(envs) -> None:
    env = envs("toy")
    model = apply_plan(env.fresh(), {"backbone": "toy", "bitfit": True, "sites": {"enc.*": {"method": "lora", "rank": 2}}})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # Biases outside any site (embedding) train too; no discriminator parameter does.
    assert "toy.embed.bias" in trainable and "toy.head.bias" in trainable
    assert not any(n.startswith("discriminator") for n in trainable)
    assert any(".lora_A" in n for n in trainable)
    biases = sum(p.numel() for n, p in env.base.net.named_parameters() if n.endswith("bias") and "norm_cross_attn" not in n)
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert count_trainable(model) == biases + lora
    state = plan_state(model)
    assert state.site_methods == {"enc.vit.0": "lora", "enc.vit.1": "lora"}
    merge_plan(model)
    with torch.no_grad():
        torch.testing.assert_close(model(env.x), env.base_out, rtol=0, atol=1e-6)
