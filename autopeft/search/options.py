"""The search's named choices, without heavy imports (the CLI's ``--help`` reads them)."""

__all__ = ["DEFAULT_FIDELITY", "DEFAULT_PRIOR_SIGNAL", "FIDELITIES", "PRIOR_CANDIDATES", "PRIOR_SIGNALS", "SAMPLERS"]

# Optuna samplers a search can use, compared on equal cost by bench/rediscovery.py.
SAMPLERS = ("tpe", "gp", "random")
# What weighs the sites in the prior (autopeft.search.priors).
PRIOR_SIGNALS = ("sensitivity", "shpeft")
# Squared gradients ranked the trained plans better than SH-PEFT's hybrid map (Spearman against the
# validation gain) on the scenario the prior was tuned on and on the first held-out one; chosen
# then, on validation scores. Later held-out runs agree in 3 of 4 (scenario, space) runs: see
# bench/results/rediscovery-*.json.
DEFAULT_PRIOR_SIGNAL = "sensitivity"
# Sampler draws per proposal from which the prior picks; fixed before any benchmark, not tuned.
PRIOR_CANDIDATES = 4
# What ASHA counts a trial's progress in: pairs done, or pair-epochs (scoring mid-pair at its rungs).
FIDELITIES = ("pairs", "epochs")
# The rule, fixed before the runs: epochs replaces pairs if its regret area, paired by sampler seed,
# is lower on average on both held-out scenarios of bench/rediscovery.py. It was, for half the
# fine-tuning pair-epochs: see bench/results/rediscovery-fidelity-*.json.
DEFAULT_FIDELITY = "epochs"
