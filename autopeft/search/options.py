"""The search's named choices, without heavy imports (the CLI's ``--help`` reads them)."""

__all__ = ["PRIOR_CANDIDATES", "PRIOR_SIGNALS", "SAMPLERS"]

# Optuna samplers a search can use, compared on equal cost by bench/rediscovery.py.
SAMPLERS = ("tpe", "gp", "random")
# What weighs the sites in the prior (autopeft.search.priors).
PRIOR_SIGNALS = ("shpeft", "sensitivity")
# Sampler draws per proposal from which the prior picks; fixed before any benchmark, not tuned.
PRIOR_CANDIDATES = 4
