"""setup_from_config: the one TrialSetup a search's settings make (the engine's, the report's,
predict's and export's); scheduler_for: the rungs a search judges trials at."""

from __future__ import annotations

import pytest

from dataclasses import asdict, fields

from autopeft.data import Protocol
from autopeft.errors import ConfigError
from autopeft.search.config import SearchConfig
from autopeft.runner.trial import TrialSetup, setup_from_config


def _settings(**overrides) -> dict:
    config = SearchConfig(backbone="unetr", budget="1%", preset="tiny", scanners=["1", "2", "3"], epochs=3, folds=2,
                          seed=7, cpus_per_trial=2, device="cpu", protocol={"folds": 2}, **overrides)
    return asdict(config)


def test_every_ordered_pair_and_fold_of_the_settings():
    setup = setup_from_config(_settings(), manifest_path="m.csv", run_dir="runs/x")
    assert setup.pairs == (("1", "2"), ("1", "3"), ("2", "1"), ("2", "3"), ("3", "1"), ("3", "2"))
    assert setup.folds == (0, 1) and len(setup.units) == 12
    assert (setup.backbone, setup.preset, setup.manifest_path, setup.epochs, setup.seed) == ("unetr", "tiny", "m.csv", 3, 7)
    assert (setup.threads, setup.device, setup.run_dir, setup.protocol) == (2, "cpu", "runs/x", Protocol(folds=2))


def test_a_users_source_model_pairs_only_from_its_scanner_and_readers_choose_their_device():
    settings = _settings(weights="mine.pt", source=2)
    setup = setup_from_config(settings, manifest_path="m.csv", device="cuda", threads=1)
    assert setup.pairs == (("2", "1"), ("2", "3")) and setup.weights == "mine.pt"
    assert (setup.device, setup.threads) == ("cuda", 1)


def test_a_pairs_job_carries_every_shared_setting_and_travels_as_the_setup_does():
    import json
    import pickle

    from autopeft.finetuning import FinetuneJob, FinetuneSettings

    setup = setup_from_config(_settings(pretrain_epochs=2), manifest_path="m.csv")
    job = setup.job("1", 3, 1, train_seed=5)
    assert isinstance(job, FinetuneJob) and (job.source, job.target, job.fold, job.fine_tuning_seed) == ("1", "3", 1, 5)
    shared = [f.name for f in fields(FinetuneSettings)]
    assert {name: getattr(job, name) for name in shared} == {name: getattr(setup, name) for name in shared}
    assert job.protocol == Protocol(folds=2) and job.pretrain_epochs == 2 and job.seed == 7
    assert pickle.loads(pickle.dumps(setup)) == setup  # Ray ships it pickled
    assert json.loads(json.dumps(asdict(setup)))["protocol"] == asdict(Protocol(folds=2))


def test_mixed_precision_reaches_every_pairs_job_and_keys_its_source_models_apart(tmp_path):
    from _fakes import make_dataset

    setup = setup_from_config(_settings(amp=True), manifest_path=make_dataset(tmp_path, {"1": 2, "2": 2, "3": 2}))
    assert setup.amp and setup.job("1", "2", 1).amp
    full = setup_from_config(_settings(), manifest_path=setup.manifest_path)
    older = {key: value for key, value in _settings().items() if key != "amp"}  # a run.json from before the setting
    assert not full.amp and not setup_from_config(older, manifest_path="m.csv").amp
    full_keys = {unit: spec.key() for unit, spec in full.source_specs().items()}
    assert {unit: spec.key() for unit, spec in setup.source_specs().items()} == {
        unit: key + "-amp" for unit, key in full_keys.items()}
    assert all("amp" not in key for key in full_keys.values())


def test_a_runs_protocol_setting_names_only_the_fields_it_changes():
    """run.json stores the search's protocol as the fields given (``{"folds": 2}``), the rest at defaults."""
    assert Protocol.from_settings({"folds": 2}) == Protocol(folds=2)
    assert Protocol.from_settings(None) == Protocol.from_settings({}) == Protocol()
    with pytest.raises(ConfigError, match="finetune_tests.*finetune_test"):
        Protocol.from_settings({"finetune_tests": 3})


def test_settings_refuse_a_protocol_given_as_a_mapping():
    from autopeft.finetuning import FinetuneSettings

    with pytest.raises(TypeError, match="`protocol` must be a Protocol .*Protocol.from_settings.*but got dict"):
        FinetuneSettings(backbone="unetr", preset="tiny", manifest_path="m.csv", protocol={"folds": 2})
    with pytest.raises(TypeError, match="but got dict"):
        TrialSetup(backbone="unetr", preset="tiny", manifest_path="m.csv", pairs=(("1", "2"),), protocol={"folds": 2})


def test_scheduler_for_sets_the_rungs_and_the_mid_pair_scores():
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from autopeft.runner._tune import scheduler_for
    from autopeft.search.config import SearchConfig
    from autopeft.runner.trial import TrialSetup

    setup = TrialSetup(backbone="cvtgan", preset="tiny", manifest_path="m.csv", pairs=(("1", "2"), ("2", "1")), epochs=20)
    pairs = SearchConfig(backbone="cvtgan", budget="1%", fidelity="pairs")
    scheduler, time_attr, same = scheduler_for(pairs, setup)
    assert isinstance(scheduler, ASHAScheduler) and time_attr == "pairs_done" and same.score_at == ()
    epochs = SearchConfig(backbone="cvtgan", budget="1%", fidelity="epochs")
    scheduler, time_attr, scored = scheduler_for(epochs, setup)
    # 40 pair-epochs, first rung a quarter into the first pair: 5, 10, 20; the pair's end needs no extra score.
    assert isinstance(scheduler, ASHAScheduler) and time_attr == "epochs_done" and scored.score_at == (5, 10)
    single = TrialSetup(backbone="cvtgan", preset="tiny", manifest_path="m.csv", pairs=(("1", "2"),), epochs=20)
    assert isinstance(scheduler_for(pairs, single)[0], FIFOScheduler)  # one pair: nothing to judge on
    assert isinstance(scheduler_for(epochs, single)[0], ASHAScheduler)  # ... but its epochs are
    assert isinstance(scheduler_for(SearchConfig(backbone="cvtgan", budget="1%", fidelity="epochs", asha=False), setup)[0],
                      FIFOScheduler)


@pytest.mark.parametrize(("pairs", "epochs"), [(2, 20), (3, 4), (2, 1)])
def test_every_rung_of_rays_asha_falls_where_a_trial_reports_a_score(pairs, epochs):
    """The rungs are Ray's (its scheduler's own description), not a list copied here: each must be
    a time at which a trial reports, mid-pair (score_at) or at a pair's end."""
    import re

    from autopeft.runner._tune import scheduler_for
    from autopeft.runner.trial import TrialSetup
    from autopeft.search.config import SearchConfig

    units = tuple((str(i), str(i + 1)) for i in range(1, pairs + 1))
    setup = TrialSetup(backbone="cvtgan", preset="tiny", manifest_path="m.csv", pairs=units, epochs=epochs)
    scheduler, time_attr, scored = scheduler_for(SearchConfig(backbone="cvtgan", budget="1%", fidelity="epochs"), setup)
    assert time_attr == "epochs_done"
    rungs = {float(x) for x in re.findall(r"Iter ([0-9.]+)", scheduler.debug_string())}
    reported = set(scored.score_at) | {epochs * k for k in range(1, pairs + 1)}
    assert rungs and rungs <= {float(t) for t in reported}, (rungs, reported)


def _asha_survivors(setup, qualities, order_of) -> set[int]:
    """Trials Ray's own ASHA (as ``scheduler_for`` builds it) lets past the first rung, fed the
    gain each trial would report: its plan's quality plus the effect of the pair it is on."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from autopeft.runner._tune import scheduler_for
    from autopeft.search.config import SearchConfig

    scheduler, time_attr, setup = scheduler_for(SearchConfig(backbone="cvtgan", budget="1%", fidelity="epochs"), setup)
    scheduler.set_search_properties("gain", "max")
    pair_effect = {("1", "2", 0): 1.0, ("2", "1", 0): -1.0}  # an easy pair and a hard one
    trials = [Trial("autopeft_trial", config={"number": n}, trial_id=f"t{n}", stub=True) for n in range(len(qualities))]
    for trial in trials:
        scheduler.on_trial_add(None, trial)
    first_rung = min(setup.score_at)
    survivors = set()
    for number, (trial, quality) in enumerate(zip(trials, qualities)):
        unit = order_of(number)[(first_rung - 1) // setup.epochs]  # the pair in training at the first rung
        action = scheduler.on_trial_result(None, trial, {time_attr: first_rung, "gain": quality + pair_effect[unit]})
        if action == TrialScheduler.CONTINUE:
            survivors.add(number)
    return survivors


def test_survival_at_a_rung_does_not_depend_on_the_trial_numbers_parity():
    from autopeft.runner.trial import TrialSetup

    setup = TrialSetup(backbone="cvtgan", preset="tiny", manifest_path="m.csv", pairs=(("1", "2"), ("2", "1")), epochs=4)
    # Pairs of equal plans, numbered 2k and 2k + 1: a fair rung treats the two alike.
    qualities = [0.05 * ((3 * (n // 2)) % 8) for n in range(16)]
    # Every trial trains the pairs in the one order the trainable uses (setup.units).
    survivors = _asha_survivors(setup, qualities, lambda number: setup.units)
    assert {n // 2 for n in survivors if n % 2 == 0} == {n // 2 for n in survivors if n % 2 == 1}
    assert 0 < len(survivors) < 16
    # The check can fail: with the order rotated by the trial number (the old behaviour), odd trials
    # meet the hard pair at the first rung and fare worse than their even twins.
    rotated = _asha_survivors(setup, qualities, lambda number: setup.units[number % 2:] + setup.units[:number % 2])
    assert {n // 2 for n in rotated if n % 2 == 0} != {n // 2 for n in rotated if n % 2 == 1}
