"""The gradient and audit signals measured on a micro setting (fake scans, tiny CVT-GAN, 1-epoch
source models), and a short search steered by one, fading."""

from __future__ import annotations

import json

import optuna
import pytest

from _fakes import make_dataset
from autopeft.data import Protocol
from autopeft.runs import study_storage_url
from autopeft.search import PlanCounter, load_space
from autopeft.search.priors import NETWORK
from autopeft.runner.trial import TrialSetup
from autopeft.backbones import build_backbone

pytestmark = pytest.mark.slow  # trains source models and fine-tunes candidates

PROTOCOL = {"pretrain_train": 2, "pretrain_val": 1, "finetune_train": 1, "finetune_val": 1, "finetune_test": 1, "folds": 1}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("prior-data"), {"1": 3, "2": 3}, shape=(20, 18, 16), long_factor=1.5)


@pytest.fixture(scope="module")
def search(data):
    template = build_backbone("cvtgan", "tiny")
    setup = TrialSetup(backbone="cvtgan", preset="tiny", manifest_path=str(data), pairs=(("1", "2"),), epochs=4,
                       protocol=Protocol(**PROTOCOL), pretrain_epochs=1)
    return setup, template, load_space("cvtgan", template.sites()), PlanCounter(template)


def _offered(space, template) -> set[tuple[str, str]]:
    from autopeft.peft import get_method

    pairs = {(site.name, option.method) for group in space.groups for option in group.options
             if not get_method(option.method).trains_nothing for site in group.sites}
    return pairs | {(site.name, "bitfit") for site in template.sites()} | {(NETWORK, "bitfit")}


@pytest.mark.parametrize("signal", ["gradient", "audit"])
def test_per_candidate_signals_are_standardised_within_method_cost_what_they_say_and_are_cached(search, signal, monkeypatch):
    from autopeft._io import cache_root
    from autopeft.search import signals
    from autopeft.search._probes import candidate_plans
    from autopeft.search.signals import prior_for

    setup, template, space, counter = search
    folder = cache_root() / "priors" / signal
    before = set(folder.glob("*.json"))  # the session's cache is shared: other tests' entries may be there
    prior = prior_for(signal, setup, template, counter, space)
    assert prior.scores and set(prior.scores) <= _offered(space, template)
    methods = {m for _, m in prior.scores}
    assert methods >= {"lora", "adapter", "ssf", "layernorm", "bitfit"}
    for method in methods:  # z-scores within each method
        values = [v for (_, m), v in prior.scores.items() if m == method]
        assert abs(sum(values) / len(values)) < 1e-9
        assert len(values) < 2 or max(values) > min(values)
    probes = candidate_plans(space, counter, template)
    if signal == "gradient":
        assert prior.cost == len(probes) and ("encoder.stage2.block0", "vpt") in prior.scores
    else:  # VPT cannot be switched off: left out, and said so; one rung of 4 epochs = 1 per method
        assert prior.cost == len(probes) - 1 and not any(m == "vpt" for _, m in prior.scores)
        assert any("vpt" in note and "switched off" in note for note in prior.notes)
    files = sorted(set(folder.glob("*.json")) - before)
    assert len(files) == 1 and json.loads(files[0].read_text())["cost"] == prior.cost

    # A second call reads the cache: nothing is measured again.
    def measured(*args, **kwargs):
        raise AssertionError("measured again instead of read from the cache")

    monkeypatch.setattr(signals, "_gradient_unit", measured)
    monkeypatch.setattr(signals, "_audit_unit", measured)
    again = prior_for(signal, setup, template, counter, space)
    assert again.scores == prior.scores and again.cost == prior.cost


def test_a_short_search_steered_by_the_gradient_prior_records_its_fading_picks(ray_session, data, tmp_path):
    from autopeft.report import SearchOutputs
    from autopeft.runner import run_search
    from autopeft.search.config import SearchConfig

    config = SearchConfig(backbone="cvtgan", budget="5%", preset="tiny", scanners=["1", "2"], trials=3, epochs=1,
                          data=str(data), out=str(tmp_path / "run"), pretrain_epochs=1, protocol=PROTOCOL,
                          cpus_per_trial=1, concurrency=1, device="cpu", references=False, portfolio=False,
                          progress=False, confirm=0, priors=True, prior_signal="gradient", prior_beta=2.0, warm_start=1,
                          prior_candidates=4)
    run_dir = run_search(config, outputs=SearchOutputs())
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["config"]["prior_beta"] == 2.0 and meta["config"]["prior_signal"] == "gradient"
    study = optuna.load_study(study_name=meta["study_name"], storage=study_storage_url(run_dir))
    assert study.trials[0].user_attrs.get("warm_start")
    guided = [t for t in study.trials if "prior_beta" in t.user_attrs]
    assert guided and all(t.user_attrs["prior_beta"] == 2.0 and t.user_attrs["prior_guided"] == 4 for t in guided)
    assert all(t.user_attrs["prior_evidence"] <= t.number for t in guided)
