"""SH-PEFT importance priors: which plans to try first.

For every (source, target, fold) of a search, the SH-PEFT hybrid importance of the pre-trained
source weights is computed once on one epoch of the target's fine-tuning batches (L1 loss, the
paper's L2 variant) and cached (``$AUTOPEFT_CACHE/importance/``). Two maps are kept, at lambda = 0
(the task term alone) and lambda = 1; since I = I_task + lambda * s * I_agnostic is linear in
lambda, any lambda is ``I_0 + lambda * (I_1 - I_0)`` (used by SH-PEFT plans).

Prior score of a plan (the formula). Let ``w_s`` be the share of the total importance (lambda = 1)
that lives in site ``s`` (plus one share ``w_out`` for weights outside every site), averaged over
the pairs; let ``x_s = n_s / N_s``, the parameters the plan trains in ``s`` (PEFT additions and
BitFit included) over the site's pre-trained parameters, capped at 1. Then

    prior(plan) = sum_s w_s * log(1 + x_s / x0) / log(1 + 1 / x0),   x0 = 1e-3

It is 0 for No-FT and 1 for Full-FT; it rewards putting capacity where the importance is, with
diminishing returns (the first per-mille of a site counts most), so that under a budget it prefers
spreading small methods over important sites to piling parameters onto one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from autopeft.search.budget import Budget, PlanCount, PlanCounter

__all__ = ["pair_importance", "site_weights", "prior_score", "top_plans", "SATURATION"]

SATURATION = 1e-3  # x0 of the formula above
OUTSIDE = "<outside sites>"


def _importance_file(setup, source: str, target: str, fold: int, meta: Mapping[str, Any]) -> Path:
    from autopeft.pretraining import SourceSpec, cache_root

    spec = SourceSpec(**{k: meta[k] for k in SourceSpec.__dataclass_fields__})
    protocol = setup.make_protocol()
    return cache_root() / "importance" / f"{spec.key()}-tgt{target}-ft{protocol.finetune_train}-fold{fold}-seed{setup.seed}.safetensors"


def pair_importance(setup, source: str, target: str, fold: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(I at lambda 0, I at lambda 1) of the pre-trained ``source`` model on ``target``'s
    fine-tuning batches; cached on disk."""
    import torch.nn.functional as F
    from safetensors.torch import load_file, save_file

    from autopeft.data import read_manifest, split_scanner, train_loader
    from autopeft.importance import compute_importance
    from autopeft.search.trial import source_model

    model, meta = source_model(setup, source, fold)
    path = _importance_file(setup, source, target, fold, meta)
    if path.is_file():
        tensors = load_file(str(path))
        task = {k[len("task."):]: v for k, v in tensors.items() if k.startswith("task.")}
        hybrid = {k[len("hybrid."):]: v for k, v in tensors.items() if k.startswith("hybrid.")}
        return task, hybrid
    manifest = read_manifest(setup.manifest_path)
    splits = split_scanner(manifest, target, purpose="finetune", protocol=setup.make_protocol(), fold=fold, seed=setup.seed)
    loader = train_loader(splits["train"], crop_size=model.preset.crop_size, batch_size=model.preset.batch_size, seed=setup.seed)
    device = torch.device(setup.device)
    model.to(device).eval()
    batches = [{k: v.to(device) for k, v in b.items() if isinstance(v, torch.Tensor)} for b in loader]

    def loss_fn(m, batch) -> torch.Tensor:
        # L1 for every backbone: the importance of a weight for reconstructing the target scans
        # (the adversarial term would score the frozen discriminator's opinion instead).
        return F.l1_loss(m(batch["short"]), batch["long"])

    task = compute_importance(model, batches, loss_fn, variant="l2", lam=0.0)
    hybrid = compute_importance(model, batches, loss_fn, variant="l2", lam=1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({**{f"task.{k}": v.cpu().contiguous() for k, v in task.items()},
               **{f"hybrid.{k}": v.cpu().contiguous() for k, v in hybrid.items()}}, str(tmp))
    tmp.replace(path)
    return {k: v.cpu() for k, v in task.items()}, {k: v.cpu() for k, v in hybrid.items()}


def site_weights(setup, template) -> dict[str, float]:
    """Share of the hybrid importance (lambda 1) per site of ``template``, averaged over the
    search's pairs; ``<outside sites>`` holds the rest. Shares sum to 1."""
    from autopeft.importance import site_importance

    totals: dict[str, float] = {}
    for source, target, fold in setup.units:
        _, hybrid = pair_importance(setup, source, target, fold)
        per_site = site_importance(template, hybrid, reduce="sum")
        grand = sum(float(v.sum()) for v in hybrid.values())
        per_site[OUTSIDE] = max(grand - sum(per_site.values()), 0.0)
        for name, value in per_site.items():
            totals[name] = totals.get(name, 0.0) + (value / grand if grand > 0 else 0.0)
    n = max(len(setup.units), 1)
    return {name: value / n for name, value in totals.items()}


def prior_score(count: PlanCount, weights: Mapping[str, float], site_sizes: Mapping[str, int], total: int) -> float:
    """The module docstring's formula for one counted plan."""
    norm = math.log1p(1.0 / SATURATION)
    score = 0.0
    for site, weight in weights.items():
        if site == OUTSIDE:
            size = total - sum(site_sizes.values())
            trained = count.outside
        else:
            size = site_sizes.get(site, 0)
            trained = count.per_site.get(site, 0)
        if size > 0 and trained > 0:
            score += weight * math.log1p(min(trained / size, 1.0) / SATURATION) / norm
    return score


def top_plans(
    space,
    counter: PlanCounter,
    weights: Mapping[str, float],
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
        count = counter.count(plan)
        if not budget.allows(count.trainable, count.total):
            continue
        score = prior_score(count, weights, counter.site_sizes, counter.total)
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
