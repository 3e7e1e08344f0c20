"""setup_from_config: the one TrialSetup a search's settings make (the engine's, the report's,
predict's and export's)."""

from __future__ import annotations

from dataclasses import asdict

from autopeft.search.engine import SearchConfig
from autopeft.search.trial import setup_from_config


def _settings(**overrides) -> dict:
    config = SearchConfig(backbone="unetr", budget="1%", preset="tiny", scanners=["1", "2", "3"], epochs=3, folds=2,
                          seed=7, cpus_per_trial=2, device="cpu", protocol={"folds": 2}, **overrides)
    return asdict(config)


def test_every_ordered_pair_and_fold_of_the_settings():
    setup = setup_from_config(_settings(), manifest_path="m.csv", run_dir="runs/x")
    assert setup.pairs == (("1", "2"), ("1", "3"), ("2", "1"), ("2", "3"), ("3", "1"), ("3", "2"))
    assert setup.folds == (0, 1) and len(setup.units) == 12
    assert (setup.backbone, setup.preset, setup.manifest_path, setup.epochs, setup.seed) == ("unetr", "tiny", "m.csv", 3, 7)
    assert (setup.threads, setup.device, setup.run_dir, setup.protocol) == (2, "cpu", "runs/x", {"folds": 2})


def test_a_users_source_model_pairs_only_from_its_scanner_and_readers_choose_their_device():
    settings = _settings(weights="mine.pt", source=2)
    setup = setup_from_config(settings, manifest_path="m.csv", device="cuda", threads=1)
    assert setup.pairs == (("2", "1"), ("2", "3")) and setup.weights == "mine.pt"
    assert (setup.device, setup.threads) == ("cuda", 1)
