"""Shared checks with known answers, run over every registered item.

The items are read from the registries when pytest collects this file, never listed by hand: every
PEFT method (:func:`autopeft.peft.registered_methods`), every backbone
(:func:`autopeft.backbones.registered_backbones`), every sampler the search offers
(:data:`autopeft.search.options.SAMPLERS`) and every prior signal
(:func:`autopeft.search.signals.registered_signals`). A method, backbone or signal registered
anywhere (a plug-in through ``$AUTOPEFT_PLUGINS`` included) is checked here without editing this
file. What one item does and no other is tested beside it: which layers each method changes
(tests/peft/test_method_matrix.py), each backbone's sizes (tests/backbones/), what each signal
measures (tests/search/test_priors.py, test_prior_signals.py).

Methods: on the toy backbone of tests/peft/_peft_toy.py (every awkward layer kind) and on every
backbone at its ``tiny`` preset, one site of each kind the method declares: the output is unchanged
at injection where it declares ``identity_at_init``; the trainable count is the one its counting
hook (:class:`autopeft.search.PlanCounter`) gives, per site too; after its parameters move (as if
trained), switching every site off gives the pre-trained output back where it declares
``switchable``, and merging keeps the output where it declares ``mergeable``; a kind it does not
declare is refused. Backbones: the shape, sites and one training step at the tiny preset; site
names alike at every preset. Samplers: the same seed proposes the same plans, all inside the
space. Signals: a finite score for every plan of a small space, the same when measured again.
"""

from __future__ import annotations

import copy
import math
import re
import shutil
import sys
from pathlib import Path

import optuna
import pytest
import torch
from monai.networks.blocks.selfattention import SABlock
from torch import nn

from _fakes import make_dataset
import autopeft.backbones.base as backbone_base
from autopeft.backbones import Backbone, build_backbone, registered_backbones
from autopeft.backbones.blocks.cvt import ConvProjectionAttention
from autopeft.data import Protocol
from autopeft.errors import ConfigError, PlanError
from autopeft.peft import Plan, apply_plan, count_trainable, merge_plan, registered_methods, trainable_fraction
from autopeft.peft.base import PeftLayer, PeftMethod
from autopeft.runner.trial import TrialSetup
from autopeft.search import PlanCounter
from autopeft.search.config import SearchConfig
from autopeft.search.options import SAMPLERS
from autopeft.search.sampler import make_sampler
from autopeft.search.signals import registered_signals
from autopeft.search.space import space_from_data

# The toy backbone is a helper of the PEFT tests; its folder is not on the path of this module.
sys.path.insert(0, str(Path(__file__).parent / "peft"))
from _peft_toy import make_toy  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)

METHODS = list(registered_methods())
BACKBONES = list(registered_backbones())
SIGNALS = list(registered_signals())
TOY = "toy"
PRESET = "tiny"  # every backbone offers it: the CPU preset the tests and `autopeft search` on a CPU use

# Hyperparameters for methods whose config has no default that fits one site on its own; every
# other method runs with its config's defaults. SH-PEFT must be given a size; VPT's default
# skip_first=1 would leave a one-block entry with nothing to train.
HYPERPARAMETERS: dict[str, dict] = {"shpeft": {"count": 64}, "vpt": {"tokens": 4, "skip_first": 0}}

ATTENTION_TYPES = (SABlock, ConvProjectionAttention, nn.MultiheadAttention)
CONV_TYPES = (nn.Conv3d, nn.ConvTranspose3d)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # many small forward passes (tests/conftest.py)


# Methods --------------------------------------------------------------------------------------------
class _Base:
    """One backbone for the method checks: the untouched model, its counter and a batch."""

    def __init__(self, name: str) -> None:
        torch.manual_seed(0)
        self.model = make_toy() if name == TOY else build_backbone(name, PRESET).eval()
        self.counter = PlanCounter(self.model)
        generator = torch.Generator().manual_seed(1)
        self.x = torch.rand(1, 1, *self.model.preset.crop_size, generator=generator)
        with torch.no_grad():
            self.out = self.model(self.x)
        self.importance = {n: torch.rand(p.shape, generator=generator) for n, p in self.model.named_parameters()}


@pytest.fixture(scope="module")
def bases():
    cache: dict[str, _Base] = {}

    def get(name: str) -> _Base:
        if name not in cache:
            cache[name] = _Base(name)
        return cache[name]

    return get


def _entry(method: PeftMethod) -> dict:
    """A plan entry of ``method`` for one site: its defaults, or :data:`HYPERPARAMETERS`."""
    entry = {"method": method.name, **HYPERPARAMETERS.get(method.name, {})}
    try:
        method.config_class(**{k: v for k, v in entry.items() if k != "method"})
    except (TypeError, ValueError) as err:
        pytest.fail(f"PEFT method {method.name!r} has no default config ({err}): add hyperparameters that fit one site "
                    "to HYPERPARAMETERS in tests/test_conformance.py.")
    return entry


def _first_trainable_sites(base: _Base, method: PeftMethod, backbone: str) -> dict[str, str]:
    """Kind -> the first site (forward order) of that kind where ``method`` alone trains something,
    for every kind it declares (none where nothing of the kind trains: UNETR's decoder convs have no
    bias for BitFit, its norms no affine part for LayerNorm)."""
    found: dict[str, str] = {}
    for site in base.model.sites():
        if site.kind not in method.site_kinds or site.kind in found:
            continue
        try:
            base.counter.count(Plan.from_dict({"backbone": backbone, "sites": {site.name: _entry(method)}}))
        except PlanError as err:
            if "finds nothing to train" not in str(err):
                raise
            continue
        found[site.kind] = site.name
    return found


@pytest.mark.parametrize("backbone", [TOY, *BACKBONES])
@pytest.mark.parametrize("name", METHODS)
def test_method_contract(name: str, backbone: str, bases) -> None:
    method = registered_methods()[name]
    base = bases(backbone)
    sites = _first_trainable_sites(base, method, backbone)
    if not sites:
        pytest.skip(f"{name} trains nothing on any site of {backbone}")
    plan = Plan.from_dict({"backbone": backbone, "sites": {site: _entry(method) for site in sites.values()}})
    model = copy.deepcopy(base.model)
    apply_plan(model, plan, importance=base.importance if plan.needs_importance else None)

    # The counting hook gives what the model trains, overall and per site.
    count = base.counter.count(plan)
    assert count_trainable(model) == count.trainable
    assert trainable_fraction(model) == pytest.approx(count.fraction)
    seen: set[int] = set()
    for site in model.sites():  # after injection: a site that is one layer may have been wrapped
        params = [p for p in site.module.parameters() if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        assert sum(p.numel() for p in params) == count.per_site[site.name], site.name
    assert (count.trainable == 0) == method.trains_nothing

    # The identity at injection, where declared.
    with torch.no_grad():
        at_init = model(base.x)
    assert at_init.shape == base.x.shape
    if method.identity_at_init:
        torch.testing.assert_close(at_init, base.out, rtol=0, atol=1e-6)
    else:
        assert not torch.allclose(at_init, base.out)
    if method.trains_nothing:
        return

    # Every trained parameter moves, as after training: the output moves too.
    per_site = {}
    seen = set()
    for site in model.sites():
        params = [p for p in site.module.parameters() if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        if params:
            per_site[site.name] = params
    initial = {site: [p.detach().clone() for p in params] for site, params in per_site.items()}
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for params in per_site.values():
            for p in params:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
        trained = model(base.x)
    assert (trained - at_init).abs().max() > 1e-4

    # Switched off site by site: the pre-trained output again.
    if method.switchable:
        moved = {site: [p.detach().clone() for p in params] for site, params in per_site.items()}
        for site, params in per_site.items():
            method.switch_off(params, initial[site])
        with torch.no_grad():
            torch.testing.assert_close(model(base.x), base.out, rtol=0, atol=1e-6)
            for site, params in per_site.items():
                for p, value in zip(params, moved[site]):
                    p.copy_(value)
    else:
        with pytest.raises(PlanError, match="cannot be switched off"):
            method.switch_off(next(iter(per_site.values())), next(iter(initial.values())))

    # Merged: the same output from plain layers; what cannot merge stays in place.
    merge_plan(model)
    with torch.no_grad():
        torch.testing.assert_close(model(base.x), trained, rtol=1e-4, atol=2e-5)
    leftovers = [type(m).__name__ for m in model.modules() if isinstance(m, PeftLayer)]
    if method.mergeable:
        assert leftovers == []
        assert not any(".parametrizations." in n for n, _ in model.named_parameters())
    else:
        assert leftovers


@pytest.mark.parametrize("backbone", [TOY, *BACKBONES])
@pytest.mark.parametrize("name", [m for m, method in registered_methods().items() if set(method.site_kinds) != {"vit", "cnn"}])
def test_method_refuses_the_site_kinds_it_does_not_declare(name: str, backbone: str, bases) -> None:
    method = registered_methods()[name]
    base = bases(backbone)
    for site in base.model.sites():
        if site.kind not in method.site_kinds:
            plan = Plan.from_dict({"backbone": backbone, "sites": {site.name: _entry(method)}})
            with pytest.raises(PlanError, match=f"cannot sit on site {re.escape(repr(site.name))}"):
                apply_plan(copy.deepcopy(base.model), plan, importance=base.importance)


# Backbones ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=BACKBONES)
def tiny(request) -> Backbone:
    torch.manual_seed(0)
    return build_backbone(request.param, PRESET)


@pytest.fixture(scope="module")
def tiny_forward(tiny) -> tuple[torch.Tensor, torch.Tensor, dict[str, tuple[int, ...]]]:
    """One eval-mode forward of a batch of 2 at the crop size: input, output, each site's output shape."""
    outputs: dict[str, tuple[int, ...]] = {}
    handles = [
        s.module.register_forward_hook(lambda _m, _i, out, name=s.name: outputs.__setitem__(name, tuple(out.shape)))
        for s in tiny.sites()
    ]
    x = torch.rand(2, 1, *tiny.preset.crop_size)
    try:
        with torch.no_grad():
            y = tiny.eval()(x)
    finally:
        for handle in handles:
            handle.remove()
    return x, y, outputs


def test_backbone_output_shape_equals_input_shape_at_crop_size(tiny_forward):
    x, y, _ = tiny_forward
    assert y.shape == x.shape  # B x 1 x D x H x W
    assert torch.isfinite(y).all()


def test_backbone_sites_have_unique_names_and_valid_roles_and_kinds(tiny):
    sites = tiny.sites()
    names = [s.name for s in sites]
    assert sites and len(names) == len(set(names))
    assert all(s.role in backbone_base.ROLES and s.kind in backbone_base.KINDS for s in sites)
    # Encoder first, in forward order: roles never go back from decoder to encoder.
    order = [backbone_base.ROLES.index(s.role) for s in sites]
    assert order == sorted(order)


def test_backbone_every_named_site_resolves_to_its_module(tiny):
    for site in tiny.sites():
        assert tiny.site(site.name).module is site.module
    first = tiny.sites()[0].name
    with pytest.raises(ConfigError, match="No site named 'nowhere.7'"):
        tiny.site("nowhere.7")
    with pytest.raises(ConfigError, match=re.escape(f"(did you mean {first!r}?)")):
        tiny.site(first + "x")


def test_backbone_site_modules_are_disjoint_submodules_of_net(tiny):
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
    assert seen_parameters <= {id(p) for p in tiny.net.parameters()}


def test_backbone_site_kind_matches_module_content(tiny):
    for site in tiny.sites():
        modules = list(site.module.modules())
        has_attention = any(isinstance(m, ATTENTION_TYPES) for m in modules)
        has_conv = any(isinstance(m, CONV_TYPES) for m in modules)
        if site.kind == "vit":
            assert has_attention, (f"{site.name} is vit but holds no attention of a known type: add its class to "
                                   "ATTENTION_TYPES in tests/test_conformance.py")
        else:
            assert not has_attention and has_conv, f"{site.name} is cnn but holds attention or no conv"


def test_backbone_site_stage_is_the_resolution_level_of_its_output(tiny, tiny_forward):
    crop = tiny.preset.crop_size
    _, _, outputs = tiny_forward
    for site in tiny.sites():
        grid = tuple(side // 2**site.stage for side in crop)
        shape = outputs[site.name]
        if site.kind == "vit":  # B x tokens x C
            assert shape[1] == grid[0] * grid[1] * grid[2], site.name
        else:  # B x C x D x H x W
            assert shape[2:] == grid, site.name


def test_backbone_one_adamw_step_lowers_l1_loss_on_a_fixed_batch(tiny):
    torch.manual_seed(0)
    model = copy.deepcopy(tiny).train()
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


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_presets_are_named_consistently_and_share_their_sites(name):
    presets = registered_backbones()[name]
    assert PRESET in presets, f"backbone {name!r} has no {PRESET!r} preset (presets: {', '.join(presets)})"
    layouts = {}
    for key, preset in presets.items():
        assert preset.name == key
        assert len(preset.crop_size) == 3 and all(side > 0 for side in preset.crop_size) and preset.batch_size >= 1
        with torch.device("meta"):  # the paper sizes without their memory
            model = build_backbone(name, key)
        assert model.name == name and model.preset == preset
        layouts[key] = [(s.name, s.role, s.kind, s.stage) for s in model.sites()]
    # A plan written on one preset names the same sites on every other.
    assert all(layout == layouts[PRESET] for layout in layouts.values())


# Samplers -------------------------------------------------------------------------------------------
SMALL_SPACE = {  # 3D CVT-GAN: a categorical per group, a method's own integer, a log-float learning rate
    "backbone": "cvtgan",
    "groups": {
        "encoder.vit": {"sites": "encoder.stage2.block*", "methods": {"none": {}, "lora": {"rank": [1, 2]}, "ssf": {}}},
        "decoder.cnn": {"sites": "decoder.fuse*", "methods": {"none": {}, "ssf": {}, "adapter": {"reduction_factor": [4, 8]}}},
    },
    "bitfit": [True, False],
    "lr": {"low": 1e-4, "high": 1e-2, "log": True},
}


@pytest.fixture(scope="module")
def cvtgan():
    template = build_backbone("cvtgan", PRESET)
    return template, PlanCounter(template)


def _proposals(space, sampler_name: str, seed: int, trials: int = 6) -> list[optuna.trial.FrozenTrial]:
    config = SearchConfig(backbone="cvtgan", budget="5%", trials=8, sampler=sampler_name)
    study = optuna.create_study(direction="maximize", sampler=make_sampler(config, seed))
    for _ in range(trials):
        trial = study.ask()
        plan = space.suggest(trial)
        # A value that depends on every choice, so that a model-based sampler has something to fit.
        study.tell(trial, len(plan.sites) + math.log10(plan.train["lr"]) + 0.5 * plan.bitfit)
    return study.trials


def _inside(value, distribution) -> bool:
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return value in distribution.choices
    return distribution.low <= value <= distribution.high


@pytest.mark.parametrize("sampler_name", SAMPLERS)
def test_sampler_is_seeded_and_proposes_inside_the_space(sampler_name, cvtgan):
    template, counter = cvtgan
    space = space_from_data(SMALL_SPACE, template.sites(), source="the conformance suite's small space")
    first = _proposals(space, sampler_name, seed=3)
    again = _proposals(space, sampler_name, seed=3)
    assert [t.params for t in first] == [t.params for t in again]
    for trial in first:
        assert trial.params and all(_inside(trial.params[k], trial.distributions[k]) for k in trial.params), trial.params
        counter.count(space.plan_from_params(trial.params))  # a plan that applies to the backbone
    # A sampler that ignores its seed would propose alike under another.
    other = _proposals(space, sampler_name, seed=4)
    assert [t.params for t in other] != [t.params for t in first]


# Prior signals --------------------------------------------------------------------------------------
SIGNAL_SPACE = {  # every method the signals treat apart: LoRA, an adapter, SSF, SH-PEFT, VPT, BitFit
    "backbone": "cvtgan",
    "groups": {
        "encoder.vit": {"sites": "encoder.stage3.block*",
                        "methods": {"none": {}, "lora": {"rank": [1]}, "shpeft": {"fraction": [0.002]}, "vpt": {"tokens": [4]}}},
        "decoder.cnn": {"sites": "decoder.fuse*", "methods": {"none": {}, "ssf": {}, "adapter": {"reduction_factor": [8]}}},
    },
    "bitfit": [True, False],
    "lr": 2e-3,
}
SIGNAL_PROTOCOL = Protocol(pretrain_train=2, pretrain_val=1, finetune_train=1, finetune_val=1, finetune_test=1, folds=1)


def _every_plan(space) -> list[Plan]:
    """Every plan of a space of discrete choices, through Optuna's brute-force enumeration."""
    study = optuna.create_study(sampler=optuna.samplers.BruteForceSampler(seed=0))
    plans: list[Plan] = []

    def collect(trial) -> float:
        plans.append(space.suggest(trial))
        return 0.0

    study.optimize(collect)  # the sampler stops the study once every combination is drawn
    return plans


@pytest.fixture(scope="module")
def signal_setting(tmp_path_factory):
    """A search's setting for the signals: the small space on tiny CVT-GAN, and (for the signals that
    read data) 1-epoch source models on fake scans of 2 scanners, in a cache of this module's own,
    so that measuring again measures and reads no other test's files."""
    template = build_backbone("cvtgan", PRESET)
    space = space_from_data(SIGNAL_SPACE, template.sites(), source="the conformance suite's signal space")
    cache = tmp_path_factory.mktemp("signal-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AUTOPEFT_CACHE", str(cache))
        data = make_dataset(tmp_path_factory.mktemp("signal-data"), {"1": 3, "2": 3}, shape=(20, 18, 16), long_factor=1.5)
        setup = TrialSetup(backbone="cvtgan", preset=PRESET, manifest_path=str(data), pairs=(("1", "2"),), epochs=4,
                           protocol=SIGNAL_PROTOCOL, pretrain_epochs=1)
        yield setup, template, space, _every_plan(space), cache


def _clear(cache: Path) -> list[Path]:
    """Remove the signals' cached scores and importance maps from ``cache``; the folders removed."""
    folders = [cache / name for name in ("priors", "importance") if (cache / name).is_dir()]
    for folder in folders:
        shutil.rmtree(folder)
    return folders


def _scores(signal: str, setting) -> list[float]:
    setup, template, space, plans, _ = setting
    counter = PlanCounter(template)
    prior = registered_signals()[signal].prepare(setup, template, counter, space=space)
    return [prior.score(plan) for plan in plans]


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # BruteForceSampler
@pytest.mark.parametrize("signal", [
    pytest.param(name, marks=pytest.mark.slow) if registered_signals()[name].needs_data else name for name in SIGNALS])
def test_prior_signal_scores_every_plan_finitely_and_the_same_when_measured_again(signal, signal_setting):
    plans, cache = signal_setting[3], signal_setting[4]
    assert len(plans) == 4 * 3 * 2  # encoder: none, lora, shpeft, vpt; decoder: none, ssf, adapter; bitfit on/off
    _clear(cache)  # what another signal cached
    scores = _scores(signal, signal_setting)
    assert all(math.isfinite(score) for score in scores), dict(zip((p.to_yaml() for p in plans), scores))
    assert len(set(scores)) > 1, f"{signal} scores every plan alike"
    # Measured again from scratch (the source models kept): its cached scores and maps removed.
    assert bool(_clear(cache)) == registered_signals()[signal].needs_data
    # Equal up to float round-off: torch's reductions may sum in another order on another run.
    assert _scores(signal, signal_setting) == pytest.approx(scores, rel=1e-6, abs=1e-9)
