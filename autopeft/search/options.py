"""The search's named choices, without heavy imports (the CLI's ``--help`` reads them)."""

__all__ = ["DEFAULT_FIDELITY", "DEFAULT_PRIOR_SIGNAL", "FIDELITIES", "PRIOR_BETA_PER_TRIAL", "PRIOR_CANDIDATES",
           "PRIOR_SIGNALS", "SAMPLERS", "default_prior_beta"]

# Optuna samplers a search can use, compared on equal cost by bench/rediscovery.py.
SAMPLERS = ("tpe", "gp", "random")
# What scores plans in the prior (autopeft.search.signals holds one class per name):
#   sensitivity, shpeft - importance mass per site (squared gradients; SH-PEFT's hybrid map);
#   gradient            - gradient energy reaching each candidate (site, method) module at injection;
#   audit               - validation-PSNR drop when each briefly trained candidate is switched off;
#   count, early        - baselines a prior must beat: log trainable count; early sites first.
PRIOR_SIGNALS = ("sensitivity", "shpeft", "gradient", "audit", "count", "early")
# Squared gradients ranked the trained plans better than SH-PEFT's hybrid map (Spearman against the
# validation gain) on the scenario the prior was tuned on and on the first held-out one; chosen
# then, on validation scores. Later held-out runs agree in 3 of 4 (scenario, space) runs: see
# bench/results/rediscovery-*.json. It is the signal of `--priors on`; priors themselves are off by
# default (SearchConfig.priors), as the lab's replays decided (docs/lab.md).
DEFAULT_PRIOR_SIGNAL = "sensitivity"
# Sampler draws per proposal among which the prior picks (priors.PriorGuide). Raised from 4 to 16
# when the pick became a fading weighting (issue 21), so that the weights have something to choose
# among; declared with the fading rule, before any lab run, not tuned.
PRIOR_CANDIDATES = 16
# The fading strength beta of PriorGuide: the pick among the draws is weighted by
# exp((beta / n) * z), n the trials finished so far. Default beta = trials / 10, the value piBO
# (Hvarfner et al., ICLR 2022) recommends (beta = N / 10 for N evaluations). Fixed before any lab
# run, not tuned: the lab's replays compare it with horizon / 3 and the horizon as declared in
# bench/scenarios.yaml.
PRIOR_BETA_PER_TRIAL = 0.1
# What ASHA counts a trial's progress in: pairs done, or pair-epochs (scoring mid-pair at its rungs).
FIDELITIES = ("pairs", "epochs")
# The rule, fixed before the runs: epochs replaces pairs if its regret area, paired by sampler seed,
# is lower on average on both held-out scenarios of bench/rediscovery.py. It was, for half the
# fine-tuning pair-epochs: see bench/results/rediscovery-fidelity-*.json.
DEFAULT_FIDELITY = "epochs"


def default_prior_beta(trials: int) -> float:
    """The declared fading strength for a search of ``trials`` trials: ``trials / 10`` (piBO's)."""
    return PRIOR_BETA_PER_TRIAL * float(trials)
