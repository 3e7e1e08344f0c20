"""Prior signals, controls and the fading pick, with known answers (no Ray, no training)."""

from __future__ import annotations

import copy
import math

import numpy as np
import optuna
import pytest
import torch

from autopeft.errors import ConfigError
from autopeft.peft import Plan, get_method
from autopeft.search import Budget, PlanCounter, load_space
from autopeft.search.priors import (
    NETWORK, OUTSIDE, CandidatePrior, CountPrior, EarlyPrior, InvertedPrior, PermutedPrior, PlanPrior, PriorGuide,
    fading_weights, finished_trials,
)
from autopeft.backbones import build_backbone

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def cvtgan():
    template = build_backbone("cvtgan", "tiny")
    return template, load_space("cvtgan", template.sites()), PlanCounter(template)


def _plan(sites, bitfit=False) -> Plan:
    return Plan.from_dict({"backbone": "cvtgan", "bitfit": bitfit, "sites": sites})


# The fading weights -------------------------------------------------------------------------------
def test_fading_weights_known_answer():
    # z = Phi^-1([1/6, 1/2, 5/6]) = [-0.9674, 0, 0.9674]; beta / n = 1: exp(z) / sum exp(z).
    z = np.array([-0.967421566, 0.0, 0.967421566])
    expected = np.exp(z) / np.exp(z).sum()
    assert fading_weights([10.0, 20.0, 30.0], 1.0, 1) == pytest.approx(expected, rel=1e-6)
    assert fading_weights([10.0, 20.0, 30.0], 1.0, 1) == pytest.approx([0.09475, 0.24930, 0.65595], abs=1e-5)
    # Only ranks matter: any increasing transform of the scores gives the same weights.
    assert fading_weights([1.0, 2.0, 1e6], 3.0, 2) == pytest.approx(fading_weights([-5.0, 0.0, 0.1], 3.0, 2))


def test_fading_weights_limits():
    scores = [0.3, 2.0, -1.0, 0.5]
    assert fading_weights(scores, 0.0, 1) == pytest.approx([0.25] * 4)  # beta 0: the sampler alone
    assert fading_weights(scores, 1e4, 1)[1] == pytest.approx(1.0)  # large beta / n: the best draw
    assert fading_weights(scores, math.inf, 7).tolist() == [0.0, 1.0, 0.0, 0.0]
    spread = [np.abs(fading_weights(scores, 10.0, n) - 0.25).max() for n in (1, 2, 5, 20, 100, 10_000)]
    assert all(a > b for a, b in zip(spread, spread[1:])) and spread[-1] < 1e-3  # n grows: uniform
    assert fading_weights([1.0, 1.0, 1.0], 50.0, 1) == pytest.approx([1 / 3] * 3)  # ties weigh alike
    assert fading_weights([2.0, 5.0, 5.0], math.inf, 1).tolist() == [0.0, 0.5, 0.5]
    assert fading_weights(scores, 2.0, 0) == pytest.approx(fading_weights(scores, 2.0, 1))  # n at least 1
    for beta in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            fading_weights(scores, beta, 1)


def test_finished_trials_counts_complete_and_valued_pruned_only():
    study = optuna.create_study(direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=1.0, params={}, distributions={}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, params={}, distributions={}))  # over budget
    stopped = study.ask()
    stopped.report(0.5, step=1)
    study.tell(stopped, state=optuna.trial.TrialState.PRUNED)  # stopped by the scheduler: keeps its last value
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, params={}, distributions={}))
    study.ask()  # running
    assert finished_trials(study) == 2


class _Oracle:
    """A replay's own prior: any object with ``counter`` and ``score``."""

    def __init__(self, counter):
        self.counter = counter

    def score(self, plan, count=None):
        count = count if count is not None else self.counter.count(plan)
        return -abs(count.fraction - 0.01)


def _guided_run(cvtgan, beta: float, seed: int, steps: int = 5) -> tuple[list[dict], optuna.Study]:
    template, space, counter = cvtgan
    make = lambda s: optuna.samplers.RandomSampler(seed=s)  # noqa: E731
    study = optuna.create_study(direction="maximize", sampler=make(seed))
    guide = PriorGuide(space, _Oracle(counter), Budget.parse("5%"), make_sampler=make, beta=beta, candidates=8, seed=seed,
                       train={"epochs": 1})
    picks = []
    for step in range(steps):
        picks.append(guide(study))
        trial = study.ask()
        space.suggest(trial, train={"epochs": 1})
        study.tell(trial, float(step))
    return picks, study


def test_prior_guide_fades_records_its_pick_and_replays_exactly(cvtgan):
    picks, study = _guided_run(cvtgan, beta=4.0, seed=3)
    again, _ = _guided_run(cvtgan, beta=4.0, seed=3)
    assert [p["params"] for p in picks] == [p["params"] for p in again]  # seeded: a replay picks the same
    for number, pick in enumerate(picks):
        assert pick is not None and pick["finished"] == max(number, 0) and pick["drawn"] == 8
        attrs = study.trials[number].user_attrs
        assert study.trials[number].params == pick["params"]
        assert attrs["prior_beta"] == 4.0 and attrs["prior_evidence"] == number and attrs["prior_guided"] == 8
        assert attrs["prior_feasible"] == pick["feasible"] and attrs["prior"] == pytest.approx(pick["prior"])
        assert 0 < attrs["prior_probability"] <= 1
    # The pick's probability is the fading weight of its draw: larger while n is small.
    first = fading_weights(list(range(picks[0]["feasible"])), 4.0, 0).max()
    assert picks[0]["probability"] <= first + 1e-12
    with pytest.raises(ConfigError, match="beta"):
        PriorGuide(cvtgan[1], _Oracle(cvtgan[2]), Budget.parse("5%"), make_sampler=lambda s: None, beta=-1.0)


def test_the_sampling_step_runs_without_ray_with_the_engines_pieces(cvtgan):
    from autopeft.search._plans import plan_definer
    from autopeft.search.sampler import make_sampler
    from autopeft.search.asking import ask_feasible
    from autopeft.search.config import SearchConfig
    from autopeft.search.portfolio import enqueue_portfolio, portfolio

    template, space, counter = cvtgan
    budget = Budget.parse("0.4%")
    config = SearchConfig(backbone="cvtgan", budget="0.4%", trials=8)
    study = optuna.create_study(direction="maximize", sampler=make_sampler(config, 0))
    entries = portfolio(space, counter, budget, train={"epochs": 1})
    enqueue_portfolio(study, entries)
    prior = InvertedPrior(CountPrior(counter))
    define = plan_definer(space, counter, budget, prior, train={"epochs": 1}, portfolio=entries)
    guide = PriorGuide(space, prior, budget, make_sampler=lambda s: make_sampler(config, s), beta=0.8, seed=0,
                       train={"epochs": 1})
    rejected = []
    for step in range(len(entries) + 3):
        trial, trial_config, _ = ask_feasible(study, define, tries=50, guide=guide, on_infeasible=rejected.append)
        assert trial is not None and trial_config["feasible"]
        study.tell(trial, float(step))
    over = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert len(over) == len(rejected) and all(t.user_attrs["state"] == "INFEASIBLE" and t.value is None for t in over)
    assert all(not r["feasible"] for r in rejected)
    assert sum("prior_beta" in t.user_attrs for t in study.trials) >= 1


# Baselines and controls --------------------------------------------------------------------------
def test_count_and_early_baselines_known_answers(cvtgan):
    template, _, counter = cvtgan
    names = [s.name for s in template.sites()]
    first, last = _plan({names[0]: {"method": "ssf"}}), _plan({names[-1]: {"method": "ssf"}})
    both = _plan({names[0]: {"method": "ssf"}, names[-1]: {"method": "ssf"}})
    early = EarlyPrior(template, counter)
    assert early.score(first) == pytest.approx(1.0)
    assert early.score(last) == pytest.approx(1.0 / len(names))
    assert early.score(both) == pytest.approx(1.0 + 1.0 / len(names))
    assert early.score(_plan({})) == 0.0
    count = CountPrior(counter)
    assert count.score(first) == pytest.approx(math.log1p(counter.count(first).trainable))
    assert count.score(_plan({})) == 0.0 and count.score(both) > count.score(first)


def test_candidate_prior_sums_the_trained_candidates_and_the_bitfit_toggle(cvtgan):
    template, _, counter = cvtgan
    scores = {("encoder.stage2.block0", "lora"): 1.5, ("encoder.stage2.block1", "lora"): -0.5,
              ("encoder.stem", "ssf"): 2.0, (NETWORK, "bitfit"): 0.25}
    prior = CandidatePrior(template, counter, scores)
    plan = _plan({"encoder.stage2.block*": {"method": "lora", "rank": 2}, "encoder.stem": {"method": "ssf"},
                  "decoder.up1": {"method": "ssf"}}, bitfit=True)
    blocks = [s.name for s in template.sites() if s.name.startswith("encoder.stage2.block")]
    assert prior.score(plan) == pytest.approx(sum(scores.get((b, "lora"), 0.0) for b in blocks) + 2.0 + 0.25)
    assert prior.score(_plan({"encoder.stem": {"method": "none"}})) == 0.0
    assert InvertedPrior(prior).score(plan) == pytest.approx(-prior.score(plan))


def test_permuted_controls_shuffle_within_method_and_are_seeded(cvtgan):
    template, _, counter = cvtgan
    sites = [s.name for s in template.sites()]
    scores = {**{(s, "ssf"): float(i) for i, s in enumerate(sites)}, **{(s, "lora"): -float(i) for i, s in enumerate(sites[:5])}}
    prior = CandidatePrior(template, counter, scores)
    one, same, other = PermutedPrior(prior, 1), PermutedPrior(prior, 1), PermutedPrior(prior, 2)
    assert one.prior.scores == same.prior.scores and one.prior.scores != prior.scores
    assert one.prior.scores != other.prior.scores
    for method in ("ssf", "lora"):  # each method keeps its values, placed elsewhere
        assert sorted(v for (_, m), v in one.prior.scores.items() if m == method) == \
            sorted(v for (_, m), v in scores.items() if m == method)
    assert prior.scores == scores  # the original is left as it was

    early = PermutedPrior(EarlyPrior(template, counter), 0)
    assert sorted(early.prior.weights.values()) == sorted(EarlyPrior(template, counter).weights.values())
    maps = [({n: torch.rand(p.shape, generator=torch.Generator().manual_seed(0)) for n, p in template.named_parameters()},) * 2]
    mass = PlanPrior(template, counter, maps)
    shuffled = PermutedPrior(mass, 0).prior
    assert shuffled.weights[OUTSIDE] == mass.weights[OUTSIDE]
    assert sorted(shuffled.weights.values()) == pytest.approx(sorted(mass.weights.values()))
    assert shuffled.weights != mass.weights
    with pytest.raises(ConfigError, match="permute"):
        PermutedPrior(CountPrior(counter), 0)


# The registry and the methods' switch-off hook -----------------------------------------------------
def test_the_signal_registry_matches_the_options_and_names_the_fix():
    from autopeft.search.options import PRIOR_SIGNALS
    from autopeft.search.signals import get_signal, registered_signals, standardise

    signals = registered_signals()
    assert set(signals) == set(PRIOR_SIGNALS)
    assert signals["audit"].needs_training and signals["gradient"].per_candidate and not signals["count"].needs_data
    with pytest.raises(ConfigError, match="did you mean 'gradient'"):
        get_signal("gradients")
    scores, notes = standardise({("a", "lora"): 1.0, ("b", "lora"): 2.0, ("c", "lora"): 3.0, ("a", "ssf"): 5.0})
    assert [scores[(s, "lora")] for s in "abc"] == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5)])
    assert scores[("a", "ssf")] == 0.0 and any("ssf" in n for n in notes)


def test_count_and_early_signals_need_no_data(cvtgan):
    from autopeft.search.signals import prior_for

    template, space, counter = cvtgan
    plan = _plan({"encoder.stem": {"method": "ssf"}})
    assert prior_for("count", None, template, counter, space).score(plan) == CountPrior(counter).score(plan)
    assert prior_for("early", None, template, counter, space).score(plan) == EarlyPrior(template, counter).score(plan)


def test_every_method_of_the_space_is_probed_on_the_sites_it_scores(cvtgan):
    # That switching a candidate off gives the pre-trained output back is every method's contract,
    # checked in tests/test_conformance.py.
    from autopeft.search._probes import candidate_plans, inject

    template, space, counter = cvtgan
    probes = candidate_plans(space, counter, template)
    assert {p.method for p in probes} >= {"lora", "adapter", "ssf", "layernorm", "bitfit", "vpt", "shpeft"}
    for probe in probes:
        model = copy.deepcopy(template)
        importance = {n: torch.rand(p.shape) for n, p in model.named_parameters()} if probe.plan.needs_importance else None
        candidates = inject(model, probe, importance)
        assert candidates and set(candidates) <= set(probe.sites)
        assert all(p.requires_grad for params in candidates.values() for p in params)


def test_a_method_that_is_not_the_identity_at_injection_must_say_whether_it_switches_off():
    from dataclasses import dataclass

    from autopeft.peft import MethodConfig, PeftMethod, register_method

    assert not get_method("vpt").switchable and get_method("lora").switchable

    @dataclass(frozen=True)
    class _Config(MethodConfig):
        pass

    class _Shifted(PeftMethod):
        name = "test_shifted_not_identity"
        site_kinds = ("cnn",)
        config_class = _Config
        identity_at_init = False

    with pytest.raises(ValueError, match="switchable = False"):
        register_method(_Shifted)
