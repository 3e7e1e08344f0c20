"""Importance priors: which plans to try first, and how much to trust that as trials come in.

A prior is any object with ``counter`` (the search's :class:`~autopeft.search.budget.PlanCounter`)
and ``score(plan, count=None) -> float`` (higher: more promising). The signals that make them are
registered in :mod:`autopeft.search.signals` (``--priors``); this module holds the scorers, the
controls a benchmark compares them with, and the guide that injects them into the search.

Site-mass scorers (:class:`PlanPrior`, signals ``shpeft`` and ``sensitivity``). For every
(source, target, fold) of a search, the SH-PEFT hybrid importance of the pre-trained source weights
is computed once on one epoch of the target's fine-tuning batches (L1 loss, the paper's L2
variant) and cached (``$AUTOPEFT_CACHE/importance/``). Two maps are kept, at lambda = 0 (the task
term alone) and lambda = 1; since I = I_task + lambda * s * I_agnostic is linear in lambda, any
lambda is ``I_0 + lambda * (I_1 - I_0)`` (used by SH-PEFT plans).

Prior score of a plan (the formula). Importance maps of the pairs are each scaled to sum to 1
and averaged. Let ``w_s`` be the share of that importance (lambda = 1) that lives in site ``s``
(plus one share ``w_out`` for weights outside every site). A plan covers a part ``c_s`` of each
site, the larger of two readings:

- ``x_s = n_s / N_s``: the parameters it trains in ``s`` (PEFT additions and BitFit included) over
  the site's pre-trained parameters, capped at 1; the only reading for methods that add weights;
- ``m_s``: the share of the site's importance held by the pre-trained weights it trains: whole
  tensors (LayerNorm, BitFit, Full-FT) and the entries SH-PEFT selects (the top-k of the averaged
  maps at the plan's lambda). These methods pick weights by what matters, so their parameter
  count alone undersells them.

Then

    prior(plan) = sum_s w_s * log(1 + c_s / x0) / log(1 + 1 / x0),   x0 = 1e-2

It is 0 for No-FT and 1 for Full-FT; it rewards covering the sites where the importance is, with
diminishing returns. How well it ranks plans (Spearman against validation PSNR) is measured by
``bench/rediscovery.py`` and kept in ``bench/results/rediscovery.json``; the two readings of
``c_s`` and ``x0`` were chosen on one evaluation (UNETR tiny, scanners 1<->5), so judge them on
others, and on your own data, before trusting them. ``"shpeft"`` weighs sites and covered weights
by the SH-PEFT hybrid map (lambda = 1); ``"sensitivity"`` by the squared gradients alone (the
lambda = 0 map), the first-order sensitivity SPT (He et al., ICCV 2023) and GPS (Zhang et al.,
CVPR 2024) rank parameters with. The same gradient pass gives both.

Per-candidate scorers (:class:`CandidatePrior`, signals ``gradient`` and ``audit``): one score per
(site, method) candidate the space offers, standardised within each method across sites (z-scores:
they say where a method does best, not which method is best); a plan scores the sum over the
(site, method) entries it trains, plus BitFit's own score when its toggle is on. Unscored
candidates count 0, their method's mean.

Baselines (:class:`CountPrior`: log of the trainable count; :class:`EarlyPrior`: early sites
first) and controls (:class:`InvertedPrior`: minus a scorer; :class:`PermutedPrior`: a scorer's
per-site information shuffled with a seed) are what a signal must beat, and show whether it
carries information at all.

Fading injection (:class:`PriorGuide`, after piBO: Hvarfner et al., ICLR 2022): before each ask
the guide draws ``candidates`` plans from the study's own sampler on an in-memory copy of the
study (the draws leave no trace in it) and enqueues one of the feasible draws, picked at random
with probability proportional to ``exp((beta / n) * z)`` (:func:`fading_weights`), ``z`` the
draws' prior scores as normal scores of their ranks and ``n`` the trials finished so far
(:func:`finished_trials`). Early on the prior chooses; as evidence comes in the pick tends to a
uniform one among the sampler's draws, i.e. to the sampler's own proposal. The prior never
filters anything out.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import optuna
import torch
from scipy.stats import norm, rankdata

from autopeft.errors import ConfigError
from autopeft.finetuning import target_importance
from autopeft.peft import Plan, get_method
from autopeft.peft.apply import match_sites
from autopeft.peft.shpeft import top_k_masks
from autopeft.search.budget import Budget, PlanCount, PlanCounter
from autopeft.search.options import PRIOR_CANDIDATES

__all__ = ["Prior", "pair_importance", "PlanPrior", "CandidatePrior", "CountPrior", "EarlyPrior", "InvertedPrior",
           "PermutedPrior", "PriorGuide", "fading_weights", "finished_trials", "prior_score", "top_plans",
           "SATURATION", "SITE_MASS_SIGNALS", "NETWORK"]

SATURATION = 1e-2  # x0 of the formula above
OUTSIDE = "<outside sites>"
NETWORK = "<network>"  # the site of the plan-level BitFit toggle among a per-candidate scorer's candidates
BITFIT = "bitfit"  # the method the plan-level toggle applies (Plan.bitfit: every bias of the network)
SITE_MASS_SIGNALS = ("sensitivity", "shpeft")  # the signals PlanPrior scores with


class Prior(Protocol):
    """What the search reads of a prior: the warm start, the define-by-run step and the guide."""

    counter: PlanCounter

    def score(self, plan: Plan, count: PlanCount | None = None) -> float: ...


def pair_importance(setup, source: str, target: str, fold: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(I at lambda 0, I at lambda 1) of the pre-trained ``source`` model on ``target``'s
    fine-tuning batches: the maps SH-PEFT plans of this search train with
    (``autopeft.finetuning.target_importance``, cached on disk)."""
    return target_importance(setup.job(source, target, fold))


class PlanPrior:
    """Scores plans of one search with the module docstring's formula.

    Args:
        template: a backbone of the search's architecture (``sites()``).
        counter: the search's :class:`~autopeft.search.budget.PlanCounter` on that backbone.
        maps: per (source, target, fold), the pair's importance at lambda 0 and at lambda 1 (as
            :func:`pair_importance` returns them).
        signal: which map weighs the sites, ``"shpeft"`` (lambda 1) or ``"sensitivity"``
            (lambda 0, squared gradients); module docstring.
    """

    def __init__(self, template, counter: PlanCounter,
                 maps: Sequence[tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]], *,
                 signal: str = "shpeft") -> None:
        if signal not in SITE_MASS_SIGNALS:
            raise ConfigError(f"The site-mass prior's `signal` must be one of {', '.join(SITE_MASS_SIGNALS)}, but got {signal!r}.")
        self.counter = counter
        self.signal = signal
        self._task: dict[str, torch.Tensor] = {}
        self._hybrid: dict[str, torch.Tensor] = {}
        sensitivity: dict[str, torch.Tensor] = {}
        for task, hybrid in maps:  # each pair's maps scaled to sum to 1, then averaged
            grand = sum(float(v.sum()) for v in hybrid.values()) or 1.0
            task_total = sum(float(v.sum()) for v in task.values()) or 1.0
            for name in hybrid:
                self._task[name] = self._task.get(name, 0) + task[name].float() / (grand * len(maps))
                self._hybrid[name] = self._hybrid.get(name, 0) + hybrid[name].float() / (grand * len(maps))
                if signal == "sensitivity":  # the squared gradients, each pair's scaled to sum to 1 on their own
                    sensitivity[name] = sensitivity.get(name, 0) + task[name].float() / (task_total * len(maps))
        name_of = {id(p): n for n, p in template.named_parameters()}
        self._site_params: dict[str, list[str]] = {}
        self._site_of: dict[str, str] = {}  # a tensor belongs to the first site holding it, as PlanCounter counts
        for site in template.sites():
            names = [name_of[id(p)] for p in site.module.parameters()]
            self._site_params[site.name] = [n for n in names if n in self._hybrid and n not in self._site_of]
            self._site_of.update((n, site.name) for n in self._site_params[site.name])
        self._signal = self._hybrid if signal == "shpeft" else sensitivity  # what weighs sites and covered weights
        self._mass = {n: float(v.sum()) for n, v in self._signal.items()}
        self._site_mass = {site: sum(self._mass[n] for n in names) for site, names in self._site_params.items()}
        grand = sum(self._mass.values())
        self.weights: dict[str, float] = {site: m / grand if grand > 0 else 0.0 for site, m in self._site_mass.items()}
        self.weights[OUTSIDE] = max(1.0 - sum(self.weights.values()), 0.0) if grand > 0 else 0.0
        self._sites = list(template.sites())
        self._sparse_cache: dict[tuple, dict[str, float]] = {}

    @classmethod
    def for_setup(cls, setup, template, counter: PlanCounter, *, signal: str = "shpeft") -> PlanPrior:
        """The prior of a search: importance of every (source, target, fold) of ``setup``
        (computed once and cached on disk by :func:`pair_importance`)."""
        return cls(template, counter, [pair_importance(setup, s, t, f) for s, t, f in setup.units], signal=signal)

    def _sparse_mass(self, sites: tuple[str, ...], budget: int, lam: float) -> dict[str, float]:
        """Importance mass per site of the ``budget`` entries one SH-PEFT plan entry selects on
        ``sites`` (ranked together, as :class:`autopeft.peft.shpeft.ShPeft` ranks them)."""
        key = (sites, budget, lam)
        if key not in self._sparse_cache:
            names = [n for site in sites for n in self._site_params[site]]
            scores = {n: self._task[n] + lam * (self._hybrid[n] - self._task[n]) for n in names}
            budget = min(budget, sum(v.numel() for v in scores.values()))
            mass: dict[str, float] = {}
            for name, mask in top_k_masks(scores, budget).items():
                site = self._site_of[name]
                mass[site] = mass.get(site, 0.0) + float(self._signal[name][mask].sum())
            self._sparse_cache[key] = mass
        return self._sparse_cache[key]

    def covered(self, plan: Plan, count: PlanCount) -> dict[str, float]:
        """``m_s`` of the formula: per site, the share of its importance that ``plan`` trains in
        pre-trained weights (whole tensors and SH-PEFT's entries)."""
        mass: dict[str, float] = {}
        for name in count.pretrained:
            site = self._site_of.get(name)
            if site is not None:
                mass[site] = mass.get(site, 0.0) + self._mass[name]
        lam = float(plan.train.get("shpeft_lambda", 1.0))
        # Sites matched as apply_plan matches them: each SH-PEFT entry has its own budget and ranking.
        for _pattern, spec, sites in match_sites(plan, self._sites):
            if get_method(spec.method).needs_importance:
                config = spec.to_dict()
                budget = config.get("count") or round(float(config["fraction"]) * self.counter.total)
                for site, value in self._sparse_mass(tuple(s.name for s in sites), int(budget), lam).items():
                    mass[site] = mass.get(site, 0.0) + value
        return {site: min(value / self._site_mass[site], 1.0) for site, value in mass.items() if self._site_mass.get(site)}

    def score(self, plan: Plan, count: PlanCount | None = None) -> float:
        """The prior of ``plan`` (``count``: its :meth:`PlanCounter.count`, computed if omitted)."""
        count = count if count is not None else self.counter.count(plan)
        return prior_score(count, self.weights, self.counter.site_sizes, self.counter.total,
                           covered=self.covered(plan, count))

    def permuted(self, rng: np.random.Generator) -> PlanPrior:
        """A copy whose site weights ``w_s`` are shuffled among the sites (the share outside every
        site stays): the permutation control. ``m_s`` still reads the site's own map."""
        sites = [site for site in self.weights if site != OUTSIDE]
        values = [self.weights[site] for site in sites]
        order = rng.permutation(len(sites))
        other = copy.copy(self)
        other.weights = {**{site: values[i] for site, i in zip(sites, order)}, OUTSIDE: self.weights[OUTSIDE]}
        return other


class CandidatePrior:
    """Scores plans by standardised per-(site, method) candidate scores (signals ``gradient`` and
    ``audit``; module docstring).

    Args:
        template: a backbone of the search's architecture (``sites()``).
        counter: the search's :class:`~autopeft.search.budget.PlanCounter` on that backbone.
        scores: ``(site, method) -> score``, standardised within each method; the BitFit
            toggle's under ``(NETWORK, BITFIT)``.
        cost: pair-epochs spent computing the scores (a benchmark charges them). Defaults to 0.
        notes: why candidates were left out, for the record. Defaults to none.
    """

    def __init__(self, template, counter: PlanCounter, scores: Mapping[tuple[str, str], float], *,
                 cost: float = 0.0, notes: Sequence[str] = ()) -> None:
        self.counter = counter
        self.scores = dict(scores)
        self.cost = float(cost)
        self.notes = tuple(notes)
        self._sites = list(template.sites())

    def entries(self, plan: Plan) -> list[tuple[str, str]]:
        """The (site, method) candidates ``plan`` trains, as ``apply_plan`` matches them."""
        found = [(site.name, spec.method) for _pattern, spec, sites in match_sites(plan, self._sites)
                 if not get_method(spec.method).trains_nothing for site in sites]
        return found + ([(NETWORK, BITFIT)] if plan.bitfit else [])

    def score(self, plan: Plan, count: PlanCount | None = None) -> float:
        """The sum of the scores of the candidates ``plan`` trains (``count`` is not needed)."""
        return float(sum(self.scores.get(entry, 0.0) for entry in self.entries(plan)))

    def permuted(self, rng: np.random.Generator) -> CandidatePrior:
        """A copy whose scores are shuffled among the candidates of each method (each method keeps
        its standardised values; which site holds which is lost): the permutation control."""
        shuffled: dict[tuple[str, str], float] = {}
        for method in sorted({m for _, m in self.scores}):
            keys = sorted(k for k in self.scores if k[1] == method)
            values = [self.scores[k] for k in keys]
            shuffled.update((k, values[i]) for k, i in zip(keys, rng.permutation(len(keys))))
        other = copy.copy(self)
        other.scores = shuffled
        return other


class CountPrior:
    """Baseline: ``log(1 + trainable parameters)`` of a plan (bigger plans first).

    Args:
        counter: the search's :class:`~autopeft.search.budget.PlanCounter`.
    """

    cost = 0.0

    def __init__(self, counter: PlanCounter) -> None:
        self.counter = counter

    def score(self, plan: Plan, count: PlanCount | None = None) -> float:
        count = count if count is not None else self.counter.count(plan)
        return math.log1p(count.trainable)


class EarlyPrior:
    """Baseline "early layers first": ``sum over trained sites of (1 - position / number of sites)``.

    ``position`` is the site's index in the backbone's forward order (``sites()``, 0 for the first
    site), so the first site weighs 1 and the last ``1 / number of sites``; a site is trained when
    the plan trains any parameter in it (:attr:`PlanCount.per_site`, the BitFit toggle's biases
    included). A plan that trains more, and earlier, sites scores higher.

    Args:
        template: a backbone of the search's architecture.
        counter: the search's :class:`~autopeft.search.budget.PlanCounter` on it.
    """

    cost = 0.0

    def __init__(self, template, counter: PlanCounter) -> None:
        self.counter = counter
        names = [site.name for site in template.sites()]
        self.weights = {name: 1.0 - position / len(names) for position, name in enumerate(names)}

    def score(self, plan: Plan, count: PlanCount | None = None) -> float:
        count = count if count is not None else self.counter.count(plan)
        return float(sum(self.weights.get(site, 0.0) for site, n in count.per_site.items() if n > 0))

    def permuted(self, rng: np.random.Generator) -> EarlyPrior:
        """A copy whose site weights are shuffled among the sites: the permutation control."""
        names = list(self.weights)
        values = [self.weights[n] for n in names]
        other = copy.copy(self)
        other.weights = {name: values[i] for name, i in zip(names, rng.permutation(len(names)))}
        return other


class InvertedPrior:
    """Control: minus ``prior``'s score (a signal that ranks plans should do worse inverted).

    Args:
        prior: any prior (``counter``, ``score``).
    """

    def __init__(self, prior: Prior) -> None:
        self.prior = prior
        self.counter = prior.counter
        self.cost = float(getattr(prior, "cost", 0.0))

    def score(self, plan: Plan, count: PlanCount | None = None) -> float:
        return -self.prior.score(plan, count)


class PermutedPrior:
    """Control: ``prior`` with its per-site (or per-candidate) values shuffled with ``seed``
    (its ``permuted(rng)``: :meth:`PlanPrior.permuted`, :meth:`CandidatePrior.permuted`,
    :meth:`EarlyPrior.permuted`).

    Args:
        prior: a prior that has per-site or per-candidate values.
        seed: seeds the shuffle.
    """

    def __init__(self, prior: Prior, seed: int) -> None:
        permute = getattr(prior, "permuted", None)
        if permute is None:
            raise ConfigError(f"`prior` ({type(prior).__name__}) has no per-site or per-candidate values to permute; "
                              "permute a PlanPrior, CandidatePrior or EarlyPrior.")
        self.prior = permute(np.random.default_rng(seed))
        self.counter = prior.counter
        self.cost = float(getattr(prior, "cost", 0.0))
        self.seed = seed

    def score(self, plan: Plan, count: PlanCount | None = None) -> float:
        return self.prior.score(plan, count)


def prior_score(count: PlanCount, weights: Mapping[str, float], site_sizes: Mapping[str, int], total: int,
                *, covered: Mapping[str, float] | None = None) -> float:
    """The module docstring's formula for one counted plan; ``covered`` gives ``m_s`` per site
    (missing sites: 0)."""
    covered = covered or {}
    full_site = math.log1p(1.0 / SATURATION)  # a site trained whole scores its weight
    score = 0.0
    for site, weight in weights.items():
        if site == OUTSIDE:
            size = total - sum(site_sizes.values())
            trained = count.outside
        else:
            size = site_sizes.get(site, 0)
            trained = count.per_site.get(site, 0)
        part = max(min(trained / size, 1.0) if size > 0 else 0.0, covered.get(site, 0.0))
        if part > 0:
            score += weight * math.log1p(part / SATURATION) / full_site
    return score


def top_plans(
    space,
    prior: PlanPrior,
    budget: Budget,
    *,
    k: int,
    candidates: int = 256,
    seed: int = 0,
    lr: float | None = None,
    train: Mapping[str, Any] | None = None,
) -> list[tuple[float, dict[str, Any], Any]]:
    """The ``k`` best-scored feasible plans among ``candidates`` random draws from the space.

    At most one plan per assignment of methods to groups is kept (the best-scored), so that the
    warm start spreads over different Mix-PEFT combinations rather than over ranks of one.

    Returns:
        ``(prior, optuna params, plan)`` by decreasing prior; every plan uses the learning rate
        ``lr`` (default: the space's).
    """
    sampler = optuna.samplers.RandomSampler(seed=seed)
    study = optuna.create_study(sampler=sampler, direction="maximize")
    best: dict[tuple, tuple[float, dict[str, Any], Any]] = {}
    seen: set[str] = set()
    for _ in range(candidates):
        trial = study.ask()
        plan = space.suggest(trial, train=train)
        params = dict(trial.params)
        study.tell(trial, 0.0)
        if "lr" in params:
            params["lr"] = space.default_lr(lr)
        plan = space.plan_from_params(params, train=train)
        key = plan.key()
        if key in seen:
            continue
        seen.add(key)
        count = prior.counter.count(plan)
        if not budget.allows(count.trainable, count.total):
            continue
        score = prior.score(plan, count)
        signature = tuple(params.get(f"{g.name}.method", g.options[0].method) for g in space.groups) + (params.get("bitfit"),)
        if signature not in best or score > best[signature][0]:
            best[signature] = (score, params, plan)
    ranked = sorted(best.values(), key=lambda item: -item[0])
    return ranked[:k]


def fading_weights(scores: Sequence[float], beta: float, finished: int) -> np.ndarray:
    """The probability of picking each of ``scores``' draws: proportional to ``exp((beta / n) * z)``.

    ``z`` are the scores as normal scores of their ranks, ``Phi^-1((rank - 1/2) / m)`` for ``m``
    draws (ties share their mean rank), not z-scores of the raw values: signals differ in scale
    and tails (a log count, a sum of z-scores, a PSNR drop with one outlier), and only their order
    is what a prior claims; on ranks ``beta`` means the same for every signal, and one outlying
    score cannot take all the weight. ``n = max(finished, 1)``.

    Args:
        scores: the prior scores of the feasible draws.
        beta: fading strength, 0 or more; 0 is the uniform pick (the sampler alone), ``inf`` the
            best-scored draw always (ties shared).
        finished: trials finished so far (:func:`finished_trials`).

    Returns:
        Probabilities summing to 1, one per score.

    >>> fading_weights([1.0, 2.0, 3.0], 0.0, 5).round(3).tolist()
    [0.333, 0.333, 0.333]
    >>> fading_weights([1.0, 3.0, 2.0], math.inf, 5).tolist()
    [0.0, 1.0, 0.0]
    """
    if not len(scores):
        raise ValueError("`scores` must hold at least one score, but got none.")
    if math.isnan(beta) or beta < 0:
        raise ValueError(f"`beta` must be 0 or more, but got {beta}.")
    values = np.asarray(scores, dtype=float)
    if np.isnan(values).any():
        raise ValueError("`scores` must not contain NaN.")
    z = norm.ppf((rankdata(values) - 0.5) / len(values))
    if math.isinf(beta):
        best = z == z.max()
        return best / best.sum()
    logits = (beta / max(int(finished), 1)) * z
    weights = np.exp(logits - logits.max())
    return weights / weights.sum()


def finished_trials(study) -> int:
    """The evidence ``n`` of the fading: COMPLETE trials plus PRUNED ones with a value (stopped by
    the scheduler after reporting). Over-budget draws (PRUNED, no value), failures and running
    trials say nothing about how well a plan fine-tunes, so they do not fade the prior."""
    TrialState = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    return sum(t.state == TrialState.COMPLETE or t.values is not None for t in trials)


class PriorGuide:
    """Injects the prior into every proposal after the warm start, fading (module docstring).

    Called before each ``study.ask()`` (by the searcher, or a replay's own loop): draws
    ``candidates`` plans with a fresh sampler (``make_sampler(seed)``) on an in-memory copy of the
    study's finished, pruned and running trials, and enqueues one feasible draw, picked with
    :func:`fading_weights` by a numpy Generator seeded with ``(seed, number of trials)`` (a replay
    picks the same). The enqueued trial's user attributes record the pick: ``prior`` (its score),
    ``prior_beta``, ``prior_evidence`` (n), ``prior_guided`` (draws), ``prior_feasible`` (feasible
    draws) and ``prior_probability`` (its chance of being picked). Nothing happens while enqueued
    trials (the warm start, the portfolio, requeued trials) are waiting, or when no draw is within
    the budget.

    Args:
        space: the search space (``suggest``).
        prior: any prior (``counter``, ``score``).
        budget: the search's budget.
        make_sampler: ``seed -> optuna sampler`` of the same kind as the study's.
        beta: fading strength (:func:`fading_weights`): 0 leaves the pick to the sampler, ``inf``
            always takes the best prior of the draws. A search uses
            :func:`autopeft.search.options.default_prior_beta` unless told otherwise.
        candidates: draws per proposal. Defaults to :data:`PRIOR_CANDIDATES`.
        seed: seeds the draws and the pick (with the number of trials so far). Defaults to 0.
        train: the ``train`` section every plan gets (as the search's own plans).
    """

    def __init__(self, space, prior: Prior, budget: Budget, *, make_sampler: Callable[[int], Any], beta: float,
                 candidates: int = PRIOR_CANDIDATES, seed: int = 0, train: Mapping[str, Any] | None = None) -> None:
        if candidates < 1:
            raise ConfigError(f"`candidates` must be at least 1, but got {candidates}.")
        if math.isnan(beta) or beta < 0:
            raise ConfigError(f"`beta` (the prior's fading strength) must be 0 or more, but got {beta}.")
        self._space, self._prior, self._budget = space, prior, budget
        self._make_sampler, self._candidates, self._seed, self._train = make_sampler, candidates, seed, train
        self.beta = float(beta)

    def draws(self, study) -> list[tuple[float, dict[str, Any]]]:
        """``(prior, params)`` of the feasible plans among ``candidates`` draws of the sampler on
        a copy of ``study`` (the study itself is left as it was)."""
        TrialState = optuna.trial.TrialState
        history = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
        shadow = optuna.create_study(directions=study.directions,
                                     sampler=self._make_sampler(self._seed * 100_003 + len(study.get_trials(deepcopy=False))))
        shadow.add_trials(history)
        feasible: list[tuple[float, dict[str, Any]]] = []
        for _ in range(self._candidates):
            trial = shadow.ask()
            plan = self._space.suggest(trial, train=self._train)
            params = dict(trial.params)
            # Told as failed: the next draw must not take it for a running trial (constant liar).
            shadow.tell(trial, state=TrialState.FAIL)
            count = self._prior.counter.count(plan)
            if self._budget.allows(count.trainable, count.total):
                feasible.append((self._prior.score(plan, count), params))
        return feasible

    def __call__(self, study) -> dict[str, Any] | None:
        """Enqueue the next plan in ``study``; returns its ``{"params", "prior", "drawn", "feasible",
        "beta", "finished", "probability"}`` or ``None`` when it left the study as it was."""
        if study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
            return None
        feasible = self.draws(study)
        if not feasible:
            return None
        finished = finished_trials(study)
        weights = fading_weights([score for score, _ in feasible], self.beta, finished)
        pick = int(np.random.default_rng((self._seed, len(study.get_trials(deepcopy=False)))).choice(len(feasible), p=weights))
        score, params = feasible[pick]
        chosen = {"params": params, "prior": score, "drawn": self._candidates, "feasible": len(feasible),
                  "beta": self.beta, "finished": finished, "probability": float(weights[pick])}
        study.enqueue_trial(params, user_attrs={"prior_guided": self._candidates, "prior": score, "prior_beta": self.beta,
                                                "prior_evidence": finished, "prior_feasible": len(feasible),
                                                "prior_probability": float(weights[pick])})
        return chosen
