"""Per-candidate measurements behind the ``gradient`` and ``audit`` prior signals.

A candidate is one (site, method) the search space offers. Each method is measured on its own copy
of the pre-trained source model with the method injected, at a small size, on every site the space
offers it (:func:`candidate_plans`): the plan a space would draw with that method in every group
that offers it. Candidates of different methods are never stacked on one layer (LoRA inside an
SSF wrapper, LayerNorm and BitFit training the same biases would make one candidate's score
depend on which other method holds its tensors); sites within one method are disjoint.

- :func:`gradient_energy`: mean over a candidate's parameters of the squared gradient of the L1
  loss, summed over one epoch of the target's training crops, per batch, at injection (eval mode,
  as the importance maps). Parameters whose gradient is exactly zero at injection are left out of
  the mean: LoRA's ``A`` (its ``B`` starts at 0) and an adapter's down-projection (its
  up-projection starts at 0) receive none, so LoRA is scored by ``B`` and the adapter by its
  up-projection.
- :func:`audit_drops`: the method's model is fine-tuned briefly, then each candidate is switched
  off in turn (:meth:`autopeft.peft.base.PeftMethod.switch_off`: the site computes the pre-trained
  function again) and the drop of the mean validation PSNR is its score. Methods that cannot be
  switched off (``switchable`` False, VPT) are left unscored, with the reason noted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from autopeft.evaluation import evaluate
from autopeft.peft import Plan, apply_plan, get_method
from autopeft.search.priors import BITFIT, NETWORK

__all__ = ["MethodProbe", "candidate_plans", "inject", "gradient_energy", "audit_drops"]


@dataclass(frozen=True)
class MethodProbe:
    """One method's candidates: the plan injecting it, and the sites whose candidate is scored.

    Args:
        method: the method's registered name.
        plan: injects the method on every site the space offers it (``bitfit: true`` for BitFit).
        sites: site names whose candidate is scored (``NETWORK`` for the BitFit toggle).
    """

    method: str
    plan: Plan
    sites: tuple[str, ...]
    notes: tuple[str, ...] = field(default=())


def candidate_plans(space, counter, template) -> list[MethodProbe]:
    """Per method the space offers (none that trains nothing), the plan that injects it at its
    smallest size on every group offering it.

    The size is read from the space, not from method names: among a group's choices for the
    method, the one that trains something in the most of the group's sites, then the fewest
    parameters (:class:`~autopeft.search.budget.PlanCounter`): LoRA's lowest rank, the largest
    adapter reduction factor, SH-PEFT's smallest fraction, the fewest VPT tokens. BitFit is one
    method whether the space offers it per group or as its plan-level toggle: one plan with
    ``bitfit: true``, scored per site and, when the toggle exists, as a whole (``NETWORK``).
    """
    entries: dict[str, dict[str, Any]] = {}
    offered: dict[str, list[str]] = {}
    backbone = space.backbone
    for group in space.groups:
        for option in group.options:
            method = get_method(option.method)
            if method.trains_nothing:
                continue
            best_key, best_entry = None, None
            for name, values in space.group_choices(group):
                if name != option.method:
                    continue
                entry = space._site_entry(group, name, values)
                count = counter.count(Plan.from_dict({"backbone": backbone, "sites": {p: entry for p in group.patterns}}))
                trained = sum(count.per_site.get(site.name, 0) > 0 for site in group.sites)
                key = (-trained, count.trainable)
                if best_key is None or key < best_key:
                    best_key, best_entry = key, entry
            entries.setdefault(option.method, {}).update({p: best_entry for p in group.patterns})
            offered.setdefault(option.method, []).extend(site.name for site in group.sites)
    probes: list[MethodProbe] = []
    toggle = True in space.bitfit.discrete_values()
    for method, sites in entries.items():
        if method == BITFIT:
            continue
        plan = Plan.from_dict({"backbone": backbone, "sites": sites}, source="prior candidates")
        probes.append(MethodProbe(method, plan, tuple(offered[method])))
    if toggle or BITFIT in entries:
        # The toggle trains every site's biases: its per-site candidates are every site with biases,
        # against which the whole toggle is standardised.
        sites = tuple(s.name for s in template.sites()) if toggle else tuple(offered[BITFIT])
        plan = Plan.from_dict({"backbone": backbone, "bitfit": True, "sites": {}}, source="prior candidates")
        probes.append(MethodProbe(BITFIT, plan, sites + ((NETWORK,) if toggle else ())))
    return probes


def inject(model: nn.Module, probe: MethodProbe, importance: Mapping[str, torch.Tensor] | None = None
           ) -> dict[str, list[nn.Parameter]]:
    """Apply ``probe.plan`` to ``model`` (in place); its trained parameters per scored candidate.

    A parameter belongs to the first site holding it (as :class:`PlanCounter` counts); sites that
    end up with nothing to train (VPT's later blocks of a prompt chain, SH-PEFT sites with no
    selected entry) have no candidate.
    """
    apply_plan(model, probe.plan, importance=importance)
    found: dict[str, list[nn.Parameter]] = {}
    seen: set[int] = set()
    for site in model.sites():  # after injection: a site that is one layer may have been wrapped
        params = [p for p in site.module.parameters() if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        if params and site.name in probe.sites:
            found[site.name] = params
    if NETWORK in probe.sites:
        found[NETWORK] = [p for p in model.net.parameters() if p.requires_grad]
    return found


def gradient_energy(model: nn.Module, candidates: Mapping[str, Sequence[nn.Parameter]], batches: Sequence[Any],
                    loss_fn) -> tuple[dict[str, float], list[str]]:
    """Per candidate, the mean over its parameters (those that receive any gradient) of the squared
    gradient summed over ``batches`` and divided by their number; and notes on candidates left
    without a score. ``model`` is put in eval mode; no weight changes."""
    unique = list({id(p): p for params in candidates.values() for p in params}.values())
    total = {id(p): torch.zeros_like(p, dtype=torch.float32) for p in unique}
    model.eval()
    for batch in batches:
        grads = torch.autograd.grad(loss_fn(model, batch), unique, allow_unused=True)
        for p, grad in zip(unique, grads):
            if grad is not None:
                total[id(p)] += grad.detach().float().square()
    scores: dict[str, float] = {}
    notes: list[str] = []
    for site, params in candidates.items():
        live = [total[id(p)] for p in params if bool(total[id(p)].any())]
        if not live:
            notes.append(f"{site}: no parameter receives a gradient at injection")
            continue
        scores[site] = float(sum(t.sum() for t in live)) / (len(batches) * sum(t.numel() for t in live))
    return scores, notes


def audit_drops(model: nn.Module, method: str, candidates: Mapping[str, Sequence[nn.Parameter]],
                at_injection: Mapping[str, Sequence[torch.Tensor]], volumes: Sequence[dict], *,
                device: str | torch.device) -> tuple[dict[str, float], list[str]]:
    """Per candidate, the mean validation PSNR of ``model`` (trained) minus that with the candidate
    switched off; each is switched back on before the next."""
    peft = get_method(method)
    if not peft.switchable:
        return {}, [f"{method}: cannot be switched off (switchable is False); its candidates are unscored"]
    roi = model.preset.crop_size
    reference = evaluate(model, volumes, roi_size=roi, device=device)["psnr"]
    drops: dict[str, float] = {}
    for site, params in candidates.items():
        trained = [p.detach().clone() for p in params]
        peft.switch_off(params, at_injection[site])
        try:
            drops[site] = reference - evaluate(model, volumes, roi_size=roi, device=device)["psnr"]
        finally:
            with torch.no_grad():
                for p, value in zip(params, trained):
                    p.copy_(value)
    return drops, []
