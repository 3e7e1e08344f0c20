"""SH-PEFT importance priors: which plans to try first.

For every (source, target, fold) of a search, the SH-PEFT hybrid importance of the pre-trained
source weights is computed once on one epoch of the target's fine-tuning batches (L1 loss, the
paper's L2 variant) and cached (``$AUTOPEFT_CACHE/importance/``). Two maps are kept, at lambda = 0
(the task term alone) and lambda = 1; since I = I_task + lambda * s * I_agnostic is linear in
lambda, any lambda is ``I_0 + lambda * (I_1 - I_0)`` (used by SH-PEFT plans).

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
others, and on your own data, before trusting them.

Signals (``signal``): ``"shpeft"`` weighs sites and covered weights by the SH-PEFT hybrid map
(lambda = 1) as above; ``"sensitivity"`` by the squared gradients alone (the lambda = 0 map), the
first-order sensitivity SPT (He et al., ICCV 2023) and GPS (Zhang et al., CVPR 2024) rank
parameters with. The same gradient pass gives both; SH-PEFT plans still select their entries with
their own lambda.

Steering (:class:`PriorGuide`): after the warm start, each proposal is the feasible plan with the
best prior among ``candidates`` draws of the study's own sampler (on a copy of the study, so the
draws leave no trace in it): the sampler says where to look, the prior which of its proposals to
train.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from autopeft.errors import ConfigError
from autopeft.importance import top_k_masks
from autopeft.peft import Plan, get_method
from autopeft.peft.apply import _match_sites
from autopeft.search.budget import Budget, PlanCount, PlanCounter
from autopeft.search.options import PRIOR_CANDIDATES, PRIOR_SIGNALS

__all__ = ["pair_importance", "PlanPrior", "PriorGuide", "prior_score", "top_plans", "SATURATION"]

SATURATION = 1e-2  # x0 of the formula above
OUTSIDE = "<outside sites>"


def pair_importance(setup, source: str, target: str, fold: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(I at lambda 0, I at lambda 1) of the pre-trained ``source`` model on ``target``'s
    fine-tuning batches: the maps SH-PEFT plans of this search train with
    (``autopeft.finetuning.target_importance``, cached on disk)."""
    from autopeft.finetuning import target_importance

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
        if signal not in PRIOR_SIGNALS:
            raise ConfigError(f"The prior's `signal` must be one of {', '.join(PRIOR_SIGNALS)}, but got {signal!r}.")
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
        for _pattern, spec, sites in _match_sites(plan, self._sites):
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


def prior_score(count: PlanCount, weights: Mapping[str, float], site_sizes: Mapping[str, int], total: int,
                *, covered: Mapping[str, float] | None = None) -> float:
    """The module docstring's formula for one counted plan; ``covered`` gives ``m_s`` per site
    (missing sites: 0)."""
    covered = covered or {}
    norm = math.log1p(1.0 / SATURATION)
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
            score += weight * math.log1p(part / SATURATION) / norm
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
    import optuna

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
        key = plan.to_yaml()
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


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation (scipy), NaN for fewer than 3 points."""
    from scipy.stats import spearmanr

    if len(xs) < 3:
        return float("nan")
    return float(spearmanr(xs, ys).statistic)


class PriorGuide:
    """Steers every proposal after the warm start with the prior (module docstring).

    Called by the searcher before each ``study.ask()``: draws ``candidates`` plans with a fresh
    sampler (``make_sampler(seed)``) on an in-memory copy of the study's finished, pruned and
    running trials, and enqueues the feasible draw with the best prior in the study, so that the
    next trial trains it. Nothing happens while enqueued trials (the warm start, requeued
    trials) are waiting, or when no draw is within the budget.

    Args:
        space: the search space (``suggest``, ``plan_from_params``).
        prior: the search's :class:`PlanPrior`.
        budget: the search's budget.
        make_sampler: ``seed -> optuna sampler`` of the same kind as the study's.
        candidates: draws per proposal. Defaults to :data:`PRIOR_CANDIDATES`.
        seed: seeds the draws (with the number of trials so far).
        train: the ``train`` section every plan gets (as the search's own plans).
    """

    def __init__(self, space, prior: PlanPrior, budget: Budget, *, make_sampler: Callable[[int], Any],
                 candidates: int = PRIOR_CANDIDATES, seed: int = 0, train: Mapping[str, Any] | None = None) -> None:
        if candidates < 1:
            raise ConfigError(f"`candidates` must be at least 1, but got {candidates}.")
        self._space, self._prior, self._budget = space, prior, budget
        self._make_sampler, self._candidates, self._seed, self._train = make_sampler, candidates, seed, train

    def __call__(self, study) -> dict[str, Any] | None:
        """Enqueue the next plan in ``study``; returns its ``{"params", "prior", "drawn"}`` or
        ``None`` when it left the study as it was."""
        import optuna

        TrialState = optuna.trial.TrialState
        if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return None
        history = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
        shadow = optuna.create_study(directions=study.directions,
                                     sampler=self._make_sampler(self._seed * 100_003 + len(study.trials)))
        shadow.add_trials(history)
        best: tuple[float, dict[str, Any]] | None = None
        for _ in range(self._candidates):
            trial = shadow.ask()
            plan = self._space.suggest(trial, train=self._train)
            params = dict(trial.params)
            # Told as failed: the next draw must not take it for a running trial (constant liar).
            shadow.tell(trial, state=TrialState.FAIL)
            count = self._prior.counter.count(plan)
            if not self._budget.allows(count.trainable, count.total):
                continue
            score = self._prior.score(plan, count)
            if best is None or score > best[0]:
                best = (score, params)
        if best is None:
            return None
        study.enqueue_trial(best[1], user_attrs={"prior_guided": self._candidates})
        return {"params": best[1], "prior": best[0], "drawn": self._candidates}
