"""Networks by reference (monai:NAME and module:Class): sites found on six MONAI networks at small
sizes, every method that fits a site applied, trained a step, counted, and merged where linear;
bad references, --net-args and shapes refused with the shapes named; discovery on the built-in
backbones agrees with their hand-named sites."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from autopeft.errors import ConfigError
from autopeft.peft import Plan, apply_plan, count_trainable, get_method, merge_plan, plan_state
from autopeft.search.auto_space import auto_space
from autopeft.search.budget import PlanCounter
from autopeft.search.space import load_space
from autopeft.backbones import build_backbone
from autopeft.backbones.discovery import apply_overrides, discover_sites
from autopeft.backbones.network import NETWORKS_ENV, network_ref, parse_net_args, register_network

# Small enough for a CPU: (net-args, crop).
NETWORKS = {
    "BasicUNet": ({"features": [4, 4, 8, 8, 16, 4]}, (32, 32, 32)),
    "UNet": ({"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}, (32, 32, 32)),
    "SegResNet": ({"init_filters": 8, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]}, (32, 32, 32)),
    "DynUNet": ({"kernel_size": [3, 3, 3], "strides": [1, 2, 2], "upsample_kernel_size": [2, 2], "filters": [4, 8, 16]},
                (32, 32, 32)),
    "UNETR": ({"feature_size": 4, "hidden_size": 32, "mlp_dim": 64, "num_heads": 2}, (32, 32, 32)),
    "SwinUNETR": ({"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1], "window_size": 4}, (64, 64, 64)),
}


def _build(name: str):
    args, crop = NETWORKS[name]
    backbone, preset = register_network(network_ref(f"monai:{name}", net_args=args, crop=crop))
    torch.manual_seed(0)
    return build_backbone(backbone, preset)


# The transformer networks' generated spaces take half a minute each on 2 CPU cores: slow suite.
_HEAVY = ("UNETR", "SwinUNETR")



pytestmark = pytest.mark.usefixtures("networks_env")

@pytest.fixture(scope="module", params=list(NETWORKS))
def network(request):
    return request.param, _build(request.param)


@pytest.fixture(scope="module", params=[pytest.param(n, marks=pytest.mark.slow) if n in _HEAVY else n for n in NETWORKS])
def network_heavy_slow(request):
    return request.param, _build(request.param)


def test_is_image_to_image_and_sites_cover_encoder_and_decoder(network):
    name, model = network
    model.check_image_to_image()
    sites = model.sites()
    roles = [s.role for s in sites]
    assert "encoder" in roles and "decoder" in roles, (name, roles)
    # Forward order: no encoder block after the first decoder block.
    assert max(i for i, r in enumerate(roles) if r == "encoder") < min(i for i, r in enumerate(roles) if r == "decoder")
    # Sites never nest, and every name is <role>.<module path>.
    modules = {n: m for n, m in model.net.named_modules()}
    paths = [s.name.split(".", 1)[1] for s in sites]
    assert all(modules[p] is s.module for p, s in zip(paths, sites))
    assert not any(a != b and b.startswith(a + ".") for a in paths for b in paths)
    assert all(s.stage >= 0 for s in sites)
    # Stages fall toward the bottleneck and rise again: the decoder's last block is at full resolution.
    assert [s for s in sites if s.role == "decoder"][-1].stage == 0


def test_kinds_follow_attention(network):
    name, model = network
    kinds = {s.kind for s in model.sites()}
    assert ("vit" in kinds) == (name in ("UNETR", "SwinUNETR"))


def _one_step(model, lr: float = 1e-2) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.SGD(params, lr=lr)
    x = torch.rand(1, 1, *model.preset.crop_size, generator=torch.Generator().manual_seed(1))
    model.train()
    loss = model.generator_loss(x, x * 1.5, model(x))
    loss.backward()
    optimiser.step()


@pytest.mark.slow  # a minute for the four CNNs on 2 CPU cores, minutes for the transformers
def test_every_method_that_fits_a_site_trains_a_step_is_counted_and_merges(network_heavy_slow):
    """Per method: on every site the generated per-block space offers it, at the space's first options."""
    name, model = network_heavy_slow
    data, _ = auto_space(model, "auto-blocks")
    counter = PlanCounter(model)
    by_method: dict[str, dict] = {}
    for group, spec in data["groups"].items():
        for method, options in spec["methods"].items():
            config = {k: (v[0] if isinstance(v, list) else v) for k, v in options.items()}
            by_method.setdefault(method, {})[spec["sites"]] = {"method": method, **config}
    assert {"lora", "ssf", "adapter"} <= set(by_method), (name, sorted(by_method))
    for method, sites in by_method.items():
        if get_method(method).trains_nothing:
            continue
        plan = Plan.from_dict({"backbone": model.name, "sites": sites})
        tuned = copy.deepcopy(model)
        importance = ({n: torch.rand_like(p) for n, p in tuned.named_parameters()} if plan.needs_importance else None)
        apply_plan(tuned, plan, importance=importance)
        trainable = {n: p.detach().clone() for n, p in tuned.named_parameters() if p.requires_grad}
        assert trainable, (name, method)
        counted = count_trainable(tuned)
        assert counted > 0
        assert counter.count(plan).trainable == counted, (name, method)
        _one_step(tuned)
        changed = [n for n, p in tuned.named_parameters() if n in trainable and not torch.equal(p.detach(), trainable[n])]
        assert changed, f"{name}/{method}: no trainable parameter moved in a step"
        if get_method(method).mergeable:
            x = torch.rand(1, 1, *model.preset.crop_size, generator=torch.Generator().manual_seed(2))
            with torch.no_grad():
                before = tuned.eval()(x)
                merge_plan(tuned)
                after = tuned.eval()(x)
            assert plan_state(tuned).merged
            assert (before - after).abs().max().item() <= 1e-5, (name, method)


def test_both_generated_spaces_load_and_sample_plans_that_apply(network_heavy_slow):
    name, model = network_heavy_slow
    import optuna

    for style in ("auto-grouped", "auto-blocks"):
        space = load_space(style, model.sites(), model=model)
        size, _ = space.size()
        assert size > 1
        groups = {g.name for g in space.groups}
        if style == "auto-blocks":
            assert groups == {s.name for s in model.sites()}
        else:
            assert all(len(g.split(".")) == 3 and g.split(".")[1] in ("vit", "cnn") for g in groups)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        plan = space.suggest(study.ask())
        apply_plan(copy.deepcopy(model), plan, importance={n: torch.rand_like(p) for n, p in model.named_parameters()})
    # The backbone's own name gives auto-grouped where no space ships.
    assert load_space(model.name, model.sites(), model=model).source.startswith("auto-grouped")


def test_discovery_on_builtin_backbones_finds_their_roles_kinds_and_stages():
    for backbone in ("unetr", "cvtgan"):
        model = build_backbone(backbone, "tiny")
        hand = {id(s.module): s for s in model.sites()}
        found = discover_sites(model.net, model.preset.crop_size)
        modules = dict(model.net.named_modules())
        matched = [(f, hand[id(modules[f.path])]) for f in found if id(modules[f.path]) in hand]
        assert len(matched) == len(hand), f"{backbone}: discovery misses hand-named sites"
        for found_site, site in matched:
            assert (found_site.role, found_site.kind, found_site.stage) == (site.role, site.kind, site.stage), (
                backbone, found_site, site.name)


def test_overrides_rename_merge_and_exclude():
    model = _build("BasicUNet")
    found = model.found_sites()
    changed = apply_overrides(found, {"exclude": ["encoder.conv_0"], "rename": {"bottleneck.down_4": "bottom"},
                                      "roles": {"encoder.down_3": "bottleneck"}}, model.net, source="override.yaml")
    names = [s.name for s in changed]
    assert "encoder.conv_0" not in names and "bottom" in names
    assert next(s for s in changed if s.name == "encoder.down_3").role == "bottleneck"
    with pytest.raises(ConfigError, match=r"override.yaml: exclude names 'encoder.conv0'.*did you mean 'encoder.conv_0'"):
        apply_overrides(found, {"exclude": ["encoder.conv0"]}, model.net, source="override.yaml")
    with pytest.raises(ConfigError, match=r"unknown key 'renam'"):
        apply_overrides(found, {"renam": {}}, model.net, source="override.yaml")
    unet = _build("UNet")
    inner = [s.name for s in unet.found_sites() if ".submodule." in s.name]
    merged = apply_overrides(unet.found_sites(), {"merge": {"middle": inner}}, unet.net, source="o.yaml")
    middle = next(s for s in merged if s.name == "middle")
    assert middle.path == "model.1.submodule" and len(merged) == len(unet.found_sites()) - len(inner) + 1
    with pytest.raises(ConfigError, match=r"common parent"):
        apply_overrides(found, {"merge": {"x": ["encoder.conv_0", "decoder.upcat_1"]}}, model.net, source="o.yaml")


def test_an_override_file_is_part_of_the_configuration():
    args, crop = NETWORKS["BasicUNet"]
    plain = register_network(network_ref("monai:BasicUNet", net_args=args, crop=crop))
    other = register_network(network_ref("monai:BasicUNet", net_args=args, crop=crop, sites_override={"exclude": ["encoder.conv_0"]}))
    assert plain[0] == other[0] and plain[1] != other[1]
    assert "encoder.conv_0" not in [s.name for s in build_backbone(*other).sites()]


@pytest.mark.parametrize(
    ("spec", "args", "crop", "message"),
    [
        ("monai:BasicUNet", {"featurs": [4, 4, 8, 8, 16, 4]}, (32, 32, 32), r"--net-args .* do not build monai:BasicUNet .*featurs.*its constructor: BasicUNet\("),
        ("monai:BasicUNett", {}, (32, 32, 32), r"has no network 'BasicUNett'.*did you mean 'BasicUNet'"),
        ("monai:BasicUNet", {"features": [4, 4, 8, 8, 16, 4], "out_channels": 2}, (32, 32, 32),
         r"maps 1 x 1 x 32 x 32 x 32 to 1 x 2 x 32 x 32 x 32; autopeft fine-tunes image-to-image networks only: 1 x 1 x 32 x 32 x 32"),
        ("monai:SwinUNETR", {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1], "window_size": 4},
         (48, 48, 48), r"fails on an input of shape 1 x 1 x 48 x 48 x 48"),
        ("autopeft_no_such_module:Net", {}, (32, 32, 32), r"module 'autopeft_no_such_module' cannot be imported"),
        ("collections:OrderedDict", {}, (32, 32, 32), r"collections has no torch.nn.Module class 'OrderedDict'"),
    ],
)
def test_bad_references_and_shapes_are_refused_with_a_clear_error(spec, args, crop, message):
    with pytest.raises(ConfigError, match=message):
        build_backbone(*register_network(network_ref(spec, net_args=args, crop=crop))).check_image_to_image()


def test_net_args_are_json_or_a_yaml_file_and_nothing_else(tmp_path):
    assert parse_net_args('{"features": [4, 4, 8, 8, 16, 4]}') == {"features": [4, 4, 8, 8, 16, 4]}
    path = tmp_path / "net.yaml"
    path.write_text("features: [4, 4, 8, 8, 16, 4]\n")
    assert parse_net_args(str(path)) == {"features": [4, 4, 8, 8, 16, 4]}
    with pytest.raises(ConfigError, match=r"--net-args '\{features: 1\}': not a JSON object nor a file"):
        parse_net_args("{features: 1}")
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"must be a mapping"):
        parse_net_args(str(path))
    path.write_text("!!python/object/apply:os.system ['echo unsafe']\n")
    with pytest.raises(ConfigError, match=r"not valid JSON or YAML"):
        parse_net_args(str(path))


def test_a_user_class_by_module_path(user_network):
    model = build_backbone(*register_network(network_ref(user_network, net_args={"width": 4})))
    model.check_image_to_image()
    assert [(s.name, s.role, s.stage) for s in model.sites()] == [("encoder.down", "encoder", 1), ("decoder.up", "decoder", 0)]


def test_other_processes_rebuild_the_network_from_the_environment():
    """What a Ray worker sees: $AUTOPEFT_NETWORKS, inherited, registers the same configuration."""
    backbone, preset = register_network(network_ref("monai:BasicUNet", net_args=NETWORKS["BasicUNet"][0]))
    code = ("import sys; from autopeft.backbones import build_backbone; m = build_backbone(sys.argv[1], sys.argv[2]); "
            "print(len(m.sites()), sum(p.numel() for p in m.parameters()))")
    out = subprocess.run([sys.executable, "-c", code, backbone, preset], capture_output=True, text=True, check=True,
                         env=dict(os.environ))
    model = build_backbone(backbone, preset)
    assert out.stdout.split() == [str(len(model.sites())), str(sum(p.numel() for p in model.parameters()))]
    assert json.loads(os.environ[NETWORKS_ENV])


def test_backbones_and_space_commands_take_a_network(capsys):
    from autopeft.cli import main

    net_args = json.dumps(NETWORKS["BasicUNet"][0])
    assert main(["backbones", "--sites", "--backbone", "monai:BasicUNet", "--net-args", net_args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)[0]
    assert report["backbone"] == "monai:BasicUNet" and report["preset"].startswith("net-")
    assert [s["role"] for s in report["sites"]].count("bottleneck") == 1 and len(report["sites"]) == 9
    assert main(["space", "--backbone", "monai:BasicUNet", "--net-args", net_args, "--budget", "1%", "--sample", "2"]) == 0
    out = capsys.readouterr().out
    assert "network: monai:BasicUNet" in out and "crop 32x32x32, batch 2" in out  # the settings, printed
    assert "auto-grouped, generated from 9 sites" in out
    assert "auto-grouped:" in out and "auto-blocks:" in out and "2 sampled plans" in out
    # Network flags with a registered backbone, a preset with a network, a bad crop: each named.
    assert main(["space", "--backbone", "unetr", "--net-args", net_args]) == 2
    assert "--net-args: for a network given by reference" in capsys.readouterr().err
    assert main(["space", "--backbone", "monai:BasicUNet", "--net-args", net_args, "--preset", "paper"]) == 2
    assert "--preset paper: a network by reference has no presets" in capsys.readouterr().err
    assert main(["backbones", "--backbone", "monai:BasicUNet", "--net-args", net_args, "--crop", "32,32"]) == 2
    assert "--crop must be D,H,W" in capsys.readouterr().err
    assert main(["backbones", "--backbone", "monai:BasicUNet", "--net-args", "{features: [1]}"]) == 2
    assert "not a JSON object nor a file" in capsys.readouterr().err


def test_commands_that_train_refuse_other_channel_counts_before_any_work(capsys, tmp_path):
    """The data gives one channel per scan: a 2-channel network is inspected, never trained."""
    from autopeft.cli import main

    net_args = json.dumps({"features": [4, 4, 8, 8, 16, 4], "in_channels": 2})
    assert main(["space", "--backbone", "monai:BasicUNet", "--net-args", net_args, "--in-channels", "2",
                 "--budget", "1%"]) == 0
    assert "2 -> 1 channels" in capsys.readouterr().out
    for command in (["search", "--out", str(tmp_path / "run"), "--trials", "1", "--budget", "1%"],
                    ["pretrain", "--source", "1", "--out", str(tmp_path / "pre")],
                    ["finetune", "--source", "1", "--target", "5", "--save", str(tmp_path / "ft")],
                    ["importance", "--source", "1", "--target", "5", "--out", str(tmp_path / "imp")]):
        assert main([*command, "--backbone", "monai:BasicUNet", "--net-args", net_args, "--in-channels", "2"]) == 2, command
        err = capsys.readouterr().err
        assert "the network takes 2 input and gives 1 output channel(s)" in err and "this command needs 1 and 1" in err, command
    assert not any(tmp_path.iterdir())  # refused before any work


def test_a_bundles_metadata_and_training_config_give_crop_channels_and_batch(tmp_path):
    configs = tmp_path / "bundle" / "configs"
    configs.mkdir(parents=True)
    network_def = {"_target_": "BasicUNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 1, "features": [4, 4, 8, 8, 16, 4]}
    (configs / "inference.json").write_text(json.dumps({"network_def": network_def}))
    fmt = {"num_channels": 1, "spatial_shape": [32, 32, 48]}
    (configs / "metadata.json").write_text(json.dumps({"network_data_format": {"inputs": {"image": fmt}, "outputs": {"pred": fmt}}}))
    (configs / "train.json").write_text(json.dumps({"batch": 3, "train": {"dataloader": {"batch_size": "@batch"}}}))
    ref = network_ref(f"bundle:{tmp_path / 'bundle'}")
    assert (ref.crop, ref.in_channels, ref.out_channels, ref.batch_size) == ((32, 32, 48), 1, 1, 3)
    assert network_ref(f"bundle:{tmp_path / 'bundle'}", batch_size=1, crop=(32, 32, 32)).batch_size == 1  # flags win
    # An expression is never evaluated: the default batch instead.
    (configs / "train.json").write_text(json.dumps({"train": {"dataloader": {"batch_size": "$__import__('os').getpid()"}}}))
    assert network_ref(f"bundle:{tmp_path / 'bundle'}").batch_size == 2
