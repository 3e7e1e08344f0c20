"""The Optuna sampler a search's settings name, and the seed the search draws with (no Ray: the
engine's and a benchmark replay's)."""

from __future__ import annotations

import optuna

from autopeft.search.config import SearchConfig

__all__ = ["make_sampler", "search_seed"]


def search_seed(config: SearchConfig) -> int:
    return config.seed if config.sampler_seed is None else config.sampler_seed


def make_sampler(config: SearchConfig, seed: int):
    """The Optuna sampler ``config.sampler`` names (``autopeft.search.options.SAMPLERS``)."""
    if config.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    startup = min(10, max(2, (config.trials or 16) // 4))
    if config.sampler == "gp":
        # Conditional parameters (a method's own) fall outside the GP's joint space: drawn at random.
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup, warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)
