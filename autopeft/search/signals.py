"""The prior's signals: one class per way of scoring plans, in a registry.

Like the method registry (:mod:`autopeft.peft.base`), a signal is a :class:`PriorSignal` subclass
registered with :func:`register_signal`; it declares what it needs and spends, and its
:meth:`PriorSignal.prepare` returns the search's prior (an object with ``counter``,
``score(plan, count=None) -> float`` and ``cost``: the pair-epochs spent making it, which a
benchmark charges to the variant using it). Nothing else names a signal: the search, the warm
start and :class:`~autopeft.search.priors.PriorGuide` only call ``score``.

Built-in signals (their names are :data:`autopeft.search.options.PRIOR_SIGNALS`):

- ``sensitivity``, ``shpeft``: importance mass per site (:class:`~autopeft.search.priors.PlanPrior`);
  one gradient pass over one epoch of each pair's target crops (cost: 1 pair-epoch per pair);
- ``gradient``: gradient energy of each (site, method) candidate at injection
  (:mod:`autopeft.search._probes`), one gradient pass per method and pair (cost: 1 pair-epoch
  each);
- ``audit``: each candidate's validation-PSNR drop when switched off after a brief fine-tuning
  of all of one method's candidates together: ``max(1, epochs // 4)`` epochs (about ASHA's first
  rung) at the middle of the space's learning rates (cost: that many pair-epochs per method and
  pair, its validation scoring not counted);
- ``count``, ``early``: the baselines (:class:`~autopeft.search.priors.CountPrior`,
  :class:`~autopeft.search.priors.EarlyPrior`), free.

A gradient pass over one epoch counts as one pair-epoch (a forward and a backward pass per crop,
as a training epoch, without the optimiser's step). ``gradient`` and ``audit`` scores are
computed per (source, target, fold), standardised within each method across its candidates
(z-scores, population SD), averaged over the pairs, and cached per (source, target, fold) in
``$AUTOPEFT_CACHE/priors/<signal>/`` (JSON: the raw scores, the notes on candidates left out, the
cost), keyed by the source model, the target's training subjects, the seed and the candidates.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from autopeft._io import atomic_write_json, cache_root, path_component, path_inside
from autopeft.data import eval_volumes, split_scanner
from autopeft.errors import ConfigError, did_you_mean
from autopeft.finetuning import finetune, importance_file, source_model, target_train_records
from autopeft.importance import importance_at, reconstruction_l1, training_crops
from autopeft.peft import count_trainable, get_method
from autopeft.search._probes import audit_drops, candidate_plans, gradient_energy, inject
from autopeft.search.priors import CandidatePrior, CountPrior, EarlyPrior, PlanPrior, Prior, pair_importance

__all__ = ["PriorSignal", "register_signal", "registered_signals", "get_signal", "prior_for", "standardise",
           "candidate_scores", "AUDIT_RUNG_DIVISOR"]

AUDIT_RUNG_DIVISOR = 4  # the audit trains max(1, epochs // 4) epochs: about ASHA's first rung (reduction factor 4)
_CACHE_VERSION = 1  # bump when what a cached file holds changes meaning


class PriorSignal:
    """One way of scoring plans.

    Class attributes:
        name: the name ``--priors`` and ``SearchConfig.prior_signal`` use.
        needs_data: whether it reads the source models and the targets' scans.
        needs_training: whether it fine-tunes models to score (``audit``).
        per_candidate: whether it scores each (site, method) candidate of the space.
    """

    name: ClassVar[str] = ""
    needs_data: ClassVar[bool] = True
    needs_training: ClassVar[bool] = False
    per_candidate: ClassVar[bool] = False

    def prepare(self, setup, template, counter, *, space) -> Prior:
        """The search's prior: ``setup`` a :class:`~autopeft.runner.trial.TrialSetup` (its units,
        jobs, epochs), ``template`` a backbone of its architecture, ``counter`` its
        :class:`~autopeft.search.budget.PlanCounter`, ``space`` its search space."""
        raise NotImplementedError


_REGISTRY: dict[str, PriorSignal] = {}


def register_signal(cls: type[PriorSignal]) -> type[PriorSignal]:
    """Class decorator that registers a signal under ``cls.name``; refuses duplicates."""
    if not cls.name or not cls.name.isidentifier():
        raise ValueError(f"`name` of a prior signal must be an identifier, but got {cls.name!r}.")
    if cls.name in _REGISTRY:
        raise ValueError(f"A prior signal named {cls.name!r} is already registered.")
    _REGISTRY[cls.name] = cls()
    return cls


def registered_signals() -> dict[str, PriorSignal]:
    """Name -> signal instance of every registered signal."""
    return dict(_REGISTRY)


def get_signal(name: str) -> PriorSignal:
    """The registered signal called ``name``; a ConfigError lists the valid names otherwise."""
    if name not in _REGISTRY:
        raise ConfigError(f"`prior_signal` must be one of {', '.join(_REGISTRY)}, but got {name!r}"
                          f"{did_you_mean(name, _REGISTRY)}.")
    return _REGISTRY[name]


def prior_for(name: str, setup, template, counter, space) -> Prior:
    """The prior signal ``name`` makes for a search (:meth:`PriorSignal.prepare`)."""
    return get_signal(name).prepare(setup, template, counter, space=space)


class _SiteMass(PriorSignal):
    def prepare(self, setup, template, counter, *, space) -> Prior:
        prior = PlanPrior.for_setup(setup, template, counter, signal=self.name)
        prior.cost = float(len(setup.units))  # one gradient pass over one epoch per pair
        return prior


@register_signal
class Sensitivity(_SiteMass):
    """Sites weighed by squared gradients of the source weights (SPT, GPS)."""

    name = "sensitivity"


@register_signal
class Shpeft(_SiteMass):
    """Sites weighed by SH-PEFT's hybrid importance (lambda = 1)."""

    name = "shpeft"


class _PerCandidate(PriorSignal):
    per_candidate = True

    def prepare(self, setup, template, counter, *, space) -> Prior:
        return candidate_scores(self.name, setup, template, counter, space)


@register_signal
class Gradient(_PerCandidate):
    """Gradient energy reaching each candidate module's own parameters at injection."""

    name = "gradient"


@register_signal
class Audit(_PerCandidate):
    """Validation-PSNR drop when each briefly trained candidate is switched off."""

    name = "audit"
    needs_training = True


@register_signal
class Count(PriorSignal):
    """Baseline: log of the plan's trainable parameter count."""

    name = "count"
    needs_data = False

    def prepare(self, setup, template, counter, *, space) -> Prior:
        return CountPrior(counter)


@register_signal
class Early(PriorSignal):
    """Baseline: early sites first (``EarlyPrior``)."""

    name = "early"
    needs_data = False

    def prepare(self, setup, template, counter, *, space) -> Prior:
        return EarlyPrior(template, counter)


def standardise(raw: Mapping[tuple[str, str], float]) -> tuple[dict[tuple[str, str], float], list[str]]:
    """z-scores of ``(site, method) -> score`` within each method (population SD); a method with one
    candidate, or all equal, gets 0 everywhere (nothing to rank it on), noted."""
    scores: dict[tuple[str, str], float] = {}
    notes: list[str] = []
    for method in sorted({m for _, m in raw}):
        keys = [k for k in raw if k[1] == method]
        values = [float(raw[k]) for k in keys]
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        if len(values) < 2 or sd == 0:
            notes.append(f"{method}: {len(values)} candidate(s) without spread, standardised to 0")
        scores.update((k, (v - mean) / sd if sd > 0 else 0.0) for k, v in zip(keys, values))
    return scores, notes


def candidate_scores(signal: str, setup, template, counter, space) -> CandidatePrior:
    """The per-candidate prior of ``signal`` (``gradient`` or ``audit``): each (source, target,
    fold) measured (or read from the cache), standardised within method, averaged over them."""
    probes = candidate_plans(space, counter, template)
    totals: dict[tuple[str, str], list[float]] = {}
    notes: list[str] = []
    cost = 0.0
    for source, target, fold in setup.units:
        payload = _unit_payload(signal, setup, space, probes, source, target, fold)
        raw = {(site, method): value for site, method, value in payload["scores"]}
        z, flat = standardise(raw)
        for key, value in z.items():
            totals.setdefault(key, []).append(value)
        notes += [f"{source}->{target} fold {fold}: {note}" for note in payload["notes"] + flat]
        cost += float(payload["cost"])
    scores = {key: sum(values) / len(values) for key, values in totals.items()}
    return CandidatePrior(template, counter, scores, cost=cost, notes=notes)


def _unit_payload(signal: str, setup, space, probes, source: str, target: str, fold: int) -> dict[str, Any]:
    """One (source, target, fold)'s raw scores, notes and cost, cached."""
    job = setup.job(source, target, fold)
    model, meta = source_model(job)
    train = target_train_records(job)
    settings = _settings(signal, setup, space)
    digest = hashlib.sha256(json.dumps({"version": _CACHE_VERSION, "settings": settings,
                                        "probes": [[p.method, p.plan.to_yaml(), list(p.sites)] for p in probes]},
                                       sort_keys=True).encode()).hexdigest()[:12]
    root = cache_root() / "priors"
    stem = Path(importance_file(job, meta, train=train)).stem
    path = path_inside(root, root / path_component(signal) / f"{stem}-{digest}.json", what="the prior's cache file")
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    measure = _gradient_unit if signal == "gradient" else _audit_unit
    scores, notes, cost = measure(setup, job, model, train, probes, settings)
    payload = {"signal": signal, "source": source, "target": target, "fold": fold, "settings": settings,
               "scores": [[site, method, value] for (site, method), value in sorted(scores.items())],
               "notes": notes, "cost": cost}
    atomic_write_json(path, payload, inside=root)
    return payload


def _settings(signal: str, setup, space) -> dict[str, Any]:
    if signal == "gradient":
        return {}
    rates = space.lr_values(3)
    return {"epochs": max(1, int(setup.epochs) // AUDIT_RUNG_DIVISOR), "lr": float(rates[len(rates) // 2])}


def _importance(setup, job, probe):
    """The importance maps a probe's SH-PEFT plan selects with (lambda 1), else None."""
    if not probe.plan.needs_importance:
        return None

    task, hybrid = pair_importance(setup, job.source, job.target, job.fold)
    return importance_at(task, hybrid, 1.0)


def _gradient_unit(setup, job, pretrained, train, probes, settings) -> tuple[dict, list[str], float]:
    device = torch.device(job.device)
    batches = list(training_crops(pretrained, train, seed=job.fine_tuning_seed, device=device))
    scores: dict[tuple[str, str], float] = {}
    notes: list[str] = []
    for probe in probes:
        model = copy.deepcopy(pretrained).to(device)
        candidates = inject(model, probe, _importance(setup, job, probe))
        energies, why = gradient_energy(model, candidates, batches, reconstruction_l1)
        scores.update(((site, probe.method), value) for site, value in energies.items())
        notes += [f"{probe.method} at {note}" for note in why]
    return scores, notes, float(len(probes))


def _audit_unit(setup, job, pretrained, train, probes, settings) -> tuple[dict, list[str], float]:
    volumes = eval_volumes(split_scanner(job.manifest_path, job.target, purpose="finetune", protocol=job.protocol,
                                         fold=job.fold, seed=job.seed)["val"])
    scores: dict[tuple[str, str], float] = {}
    notes: list[str] = []
    cost = 0.0
    for probe in probes:
        if not get_method(probe.method).switchable:
            notes.append(f"{probe.method}: cannot be switched off (switchable is False); its candidates are unscored")
            continue
        model = copy.deepcopy(pretrained)
        held: dict[str, Any] = {}

        def prepare(net, probe=probe, held=held) -> tuple[int, int]:
            total = sum(p.numel() for p in net.net.parameters())
            held["candidates"] = inject(net, probe, _importance(setup, job, probe))
            held["initial"] = {site: [p.detach().clone() for p in params] for site, params in held["candidates"].items()}
            return count_trainable(net), total

        finetune(model, job.target, manifest=job.manifest_path, method=f"audit-{probe.method}", prepare=prepare,
                 epochs=settings["epochs"], lr=settings["lr"], protocol=job.protocol, fold=job.fold,
                 seed=job.fine_tuning_seed, split_seed=job.seed, device=job.device, progress=False,
                 crops_per_volume=pretrained.preset.finetune.crops_per_volume, splits=("val",))
        cost += settings["epochs"]
        drops, why = audit_drops(model, probe.method, held["candidates"], held["initial"], volumes, device=job.device)
        scores.update(((site, probe.method), value) for site, value in drops.items())
        notes += why
    return scores, notes, cost

