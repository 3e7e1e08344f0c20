"""The space, the budget and the prior, driven directly with Optuna trials (no Ray, no training)."""

from __future__ import annotations

import copy
import math

import optuna
import pytest
import torch

from autopeft.errors import ConfigError
from autopeft.peft import apply_plan, count_trainable, load_plan
from autopeft.search import Budget, PlanCounter, load_space
from autopeft.search.priors import OUTSIDE, prior_score
from autopeft.backbones import build_backbone

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def cvtgan():
    template = build_backbone("cvtgan", "tiny")
    return template, load_space("cvtgan", template.sites()), PlanCounter(template)


@pytest.mark.parametrize(
    ("text", "fraction", "count"),
    [("1%", 0.01, None), ("0.005", 0.005, None), ("250k", None, 250_000), ("1.5M", None, 1_500_000), ("12000", None, 12000)],
)
def test_budget_parses_percent_fraction_and_count(text, fraction, count):
    budget = Budget.parse(text)
    assert budget.fraction == fraction and budget.count == count


@pytest.mark.parametrize("text", ["", "1%%", "-3", "0", "150%", "2.5", "abc"])
def test_budget_rejects_bad_text(text):
    with pytest.raises(ConfigError):
        Budget.parse(text)


def test_budget_limit_is_inclusive():
    budget = Budget.parse("1%")
    assert budget.allows(10, 1000) and not budget.allows(11, 1000)


def test_sampling_honours_conditionals_and_counts_exactly(cvtgan):
    template, space, counter = cvtgan
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    budget = Budget.parse("2%")
    methods_seen: set[str] = set()
    feasible = 0
    for index in range(25):
        trial = study.ask()
        plan = space.suggest(trial, train={"epochs": 3})
        for group in space.groups:
            chosen = trial.params[f"{group.name}.method"]
            methods_seen.add(chosen)
            # A hyperparameter exists only under the method that was chosen for its group.
            for name in trial.params:
                if name.startswith(f"{group.name}.") and name != f"{group.name}.method":
                    assert name.startswith(f"{group.name}.{chosen}.")
            entries = [plan.sites[p] for p in group.patterns if p in plan.sites]
            assert (not entries) == (chosen == "none")
            assert all(e.method == chosen for e in entries)
        assert ("shpeft_lambda" in trial.params) == any(s.method == "shpeft" for s in plan.sites.values())
        assert plan.train["epochs"] == 3 and space.lr.low <= plan.train["lr"] <= space.lr.high
        assert space.plan_from_params(trial.params, train={"epochs": 3}) == plan
        count = counter.count(plan)
        feasible += budget.allows(count.trainable, count.total)
        if index < 6:  # the fast counter must agree with applying the plan for real
            model = copy.deepcopy(template)
            uses_shpeft = any(s.method == "shpeft" for s in plan.sites.values())
            importance = {n: torch.zeros_like(p) for n, p in model.named_parameters()} if uses_shpeft else None
            apply_plan(model, plan, importance=importance)
            assert count_trainable(model) == count.trainable
        study.tell(trial, 0.0)
    assert len(methods_seen) >= 4 and 0 < feasible < 25


def test_vpt_first_stage_becomes_tokens_per_stage(cvtgan):
    _, space, _ = cvtgan
    params = space.params_for({"encoder.vit": ("vpt", {"tokens": 8, "first_stage": 1})})
    plan = space.plan_from_params(params)
    spec = plan.sites["encoder.*.block*"]
    assert spec.config.tokens == (0, 8, 8) and spec.config.skip_first == 0


def test_space_size_and_counts_of_known_plans(cvtgan):
    _, space, counter = cvtgan
    size, note = space.size()
    assert size == float("inf") and "continuous learning rate" in note
    noft = counter.count(load_plan("cvtgan-noft"))
    full = counter.count(load_plan("cvtgan-fullft"))
    assert noft.trainable == 0 and full.fraction == pytest.approx(1.0)


def test_space_errors_name_the_fault(tmp_path):
    sites = build_backbone("unetr", "tiny").sites()
    cases = {
        "unknown method": ("groups: {g: {sites: 'decoder.*', methods: {lorra: {}}}}", "lorra"),
        "no site": ("groups: {g: {sites: 'nowhere.*', methods: {ssf: {}}}}", "matches no site"),
        "wrong kind": ("groups: {g: {sites: 'decoder.*', methods: {vpt: {tokens: [4]}}}}", "fits"),
        "bad value": ("groups: {g: {sites: 'decoder.*', methods: {lora: {rank: [0, 2]}}}}", "rank"),
        "overlap": ("groups: {a: {sites: 'decoder.*', methods: {ssf: {}}}, b: {sites: 'decoder.cnn.2', methods: {ssf: {}}}}", "overlap"),
    }
    for label, (body, expected) in cases.items():
        path = tmp_path / f"{label.replace(' ', '_')}.yaml"
        path.write_text("backbone: unetr\n" + body + "\n")
        with pytest.raises(ConfigError, match=expected):
            load_space(path, sites)


def test_prior_is_zero_for_noft_one_for_fullft_and_grows_with_capacity(cvtgan):
    template, space, counter = cvtgan
    sizes = counter.site_sizes
    weights = {name: 1.0 / (len(sizes) + 1) for name in sizes} | {OUTSIDE: 1.0 / (len(sizes) + 1)}
    score = lambda plan: prior_score(counter.count(plan), weights, sizes, counter.total)  # noqa: E731
    assert score(load_plan("cvtgan-noft")) == 0.0
    assert score(load_plan("cvtgan-fullft")) == pytest.approx(1.0)
    small = space.plan_from_params(space.params_for({"decoder.vit.stage3": ("lora", {"rank": 1, "targets": ["q", "k"]})}))
    large = space.plan_from_params(space.params_for({"decoder.vit.stage3": ("lora", {"rank": 16, "targets": ["q", "k"]})}))
    assert 0 < score(small) < score(large) < 1


def _random_maps(template, seed: int):
    generator = torch.Generator().manual_seed(seed)
    task = {n: torch.rand(p.shape, generator=generator) for n, p in template.named_parameters()}
    hybrid = {n: v + torch.rand(v.shape, generator=generator) for n, v in task.items()}
    return task, hybrid


def test_plan_prior_counts_the_importance_shpeft_and_norms_train(cvtgan):
    from autopeft.peft import Plan
    from autopeft.peft.shpeft import SparseDelta
    from autopeft.search.priors import PlanPrior

    template, _, counter = cvtgan
    maps = [_random_maps(template, 0), _random_maps(template, 1)]
    prior = PlanPrior(template, counter, maps)
    assert prior.score(load_plan("cvtgan-noft")) == 0.0
    assert prior.score(load_plan("cvtgan-fullft")) == pytest.approx(1.0)
    assert sum(prior.weights.values()) == pytest.approx(1.0)

    # SH-PEFT: the prior's m_s is the importance (averaged hybrid maps) of exactly the entries the
    # method selects when applied at the plan's lambda, and it outscores the bare parameter share.
    # Two entries with the same settings: each has its own budget and ranking, as apply_plan runs them.
    lam = 0.5
    shpeft = {"method": "shpeft", "fraction": 0.002}
    plan = Plan.from_dict({"backbone": "cvtgan", "sites": {"decoder.stage3.block*": shpeft, "decoder.stage2.block*": shpeft},
                           "train": {"shpeft_lambda": lam}})
    grand = [sum(float(v.sum()) for v in h.values()) for _, h in maps]
    task = {n: sum(m[0][n] / g for m, g in zip(maps, grand)) / 2 for n in maps[0][0]}
    hybrid = {n: sum(m[1][n] / g for m, g in zip(maps, grand)) / 2 for n in maps[0][1]}
    model = apply_plan(copy.deepcopy(template), plan, importance={n: task[n] + lam * (hybrid[n] - task[n]) for n in task})
    names = {id(p): n for n, p in template.named_parameters()}
    site_of = {}
    for site in template.sites():
        for p in site.module.parameters():
            site_of.setdefault(names[id(p)], site.name)
    selected: dict[str, float] = {}
    for module_name, module in model.named_modules():
        for attr, parametrizations in getattr(module, "parametrizations", {}).items():
            for layer in parametrizations:
                if isinstance(layer, SparseDelta):
                    name = f"{module_name}.{attr}"
                    selected[site_of[name]] = selected.get(site_of[name], 0.0) + float(hybrid[name].reshape(-1)[layer.index].sum())
    count = counter.count(plan)
    covered = prior.covered(plan, count)
    assert set(covered) == set(selected)
    for site, value in selected.items():
        site_mass = sum(float(hybrid[n].sum()) for n, s in site_of.items() if s == site)
        assert covered[site] == pytest.approx(value / site_mass, rel=1e-4)
    assert prior.score(plan, count) > prior_score(count, prior.weights, counter.site_sizes, counter.total)

    # LayerNorm trains whole norm tensors: m_s is their share of the site's importance.
    plan = Plan.from_dict({"backbone": "cvtgan", "sites": {"decoder.stage3.block0": {"method": "layernorm"}}})
    count = counter.count(plan)
    norms = [n for n in count.pretrained if site_of.get(n) == "decoder.stage3.block0"]
    assert norms and all("norm" in n for n in norms)
    site_mass = sum(float(hybrid[n].sum()) for n, s in site_of.items() if s == "decoder.stage3.block0")
    assert prior.covered(plan, count)["decoder.stage3.block0"] == pytest.approx(sum(float(hybrid[n].sum()) for n in norms) / site_mass, rel=1e-4)


@pytest.mark.parametrize("backbone", ["unetr", "cvtgan"])
def test_per_block_spaces_give_every_block_its_own_choice_and_sample_within_the_budget(backbone):
    import optuna

    from autopeft.search.budget import Budget, PlanCounter
    from autopeft.search.space import load_space
    from autopeft.backbones import build_backbone

    model = build_backbone(backbone, "tiny")
    space = load_space(f"{backbone}-blocks", model.sites())
    blocks = [s.name for s in model.sites() if s.role in ("encoder", "decoder")]
    assert {g.name for g in space.groups} >= set(blocks)  # one method choice per encoder/decoder block
    assert all(len(g.patterns) == 1 for g in space.groups)
    counter, budget = PlanCounter(model), Budget.parse("1%")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    within = 0
    for _ in range(30):
        trial = study.ask()
        plan = space.suggest(trial, train={"epochs": 1})
        count = counter.count(plan)
        within += count.trainable <= budget.limit(count.total)
        study.tell(trial, 0.0)
    assert within > 0  # random draws do land within 1%; the engine redraws the others for free


def test_sensitivity_signal_weighs_sites_by_squared_gradients_alone(cvtgan):
    from autopeft.search.priors import PlanPrior

    template, _, counter = cvtgan
    maps = [_random_maps(template, 0)]
    task, hybrid = maps[0]
    shpeft, sensitivity = PlanPrior(template, counter, maps), PlanPrior(template, counter, maps, signal="sensitivity")
    task_total = sum(float(v.sum()) for v in task.values())
    site = next(s for s in template.sites() if s.name in sensitivity.weights)
    names = {id(p): n for n, p in template.named_parameters()}
    site_task = sum(float(task[names[id(p)]].sum()) for p in site.module.parameters())
    assert sensitivity.weights[site.name] == pytest.approx(site_task / task_total, rel=1e-4)
    assert sensitivity.weights != pytest.approx(shpeft.weights)
    assert sensitivity.score(load_plan("cvtgan-fullft")) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="signal"):
        PlanPrior(template, counter, maps, signal="gradients")


@pytest.mark.parametrize("sampler", ["tpe", "gp"])
def test_prior_guide_at_infinite_beta_enqueues_the_best_prior_of_its_draws_and_leaves_no_trace(cvtgan, sampler):
    from autopeft.search.priors import PlanPrior, PriorGuide

    template, space, counter = cvtgan
    prior = PlanPrior(template, counter, [_random_maps(template, 0)])
    budget = Budget.parse("5%")  # most random draws of this space fit it, so most proposals are guided
    make = (lambda seed: optuna.samplers.TPESampler(seed=seed, n_startup_trials=2, constant_liar=True)) if sampler == "tpe" \
        else (lambda seed: optuna.samplers.GPSampler(seed=seed, n_startup_trials=2, warn_independent_sampling=False))
    study = optuna.create_study(direction="maximize", sampler=make(0))
    guide = PriorGuide(space, prior, budget, make_sampler=make, beta=math.inf, candidates=6, seed=0, train={"epochs": 1})
    running = None
    for step in range(6):
        before = len(study.trials)
        chosen = guide(study)
        trial = study.ask()
        plan = space.suggest(trial, train={"epochs": 1})
        assert len(study.trials) == before + 1  # the draws happened on a copy of the study
        if chosen is not None:
            assert trial.params == chosen["params"] and trial.user_attrs["prior_guided"] == 6
            count = counter.count(plan)
            assert budget.allows(count.trainable, count.total)
            assert prior.score(plan, count) == pytest.approx(chosen["prior"])
            assert chosen["probability"] == 1.0 and chosen["beta"] == math.inf  # inf never fades: the best draw
        if step == 3:
            running = trial  # a running trial is copied too (TPE's constant liar)
        else:
            study.tell(trial, float(step))
    assert running is not None and sum(t.user_attrs.get("prior_guided") == 6 for t in study.trials) >= 4
    # While a trial waits in the queue (warm start, requeued trial), the guide stays out of the way.
    study.enqueue_trial(study.trials[0].params)
    assert guide(study) is None
