"""Apply a plan to a backbone, count what trains (in one place), and merge what is linear.

Counting convention, used everywhere: trainable parameters are the parameters of ``model.net``
(after injection) with ``requires_grad``; the fraction is that count over the parameters of
``model.net`` *before* injection, i.e. the share of the pre-trained network. The discriminator of
an adversarial backbone is never counted and stays frozen. SH-PEFT counts its selected entries
(its trainable tensors hold exactly those), not whole tensors. Parameters the network never uses
(MONAI's ``TransformerBlock.norm_cross_attn`` without cross-attention) are never made trainable,
so Full-FT of UNETR trains 99.98% of its parameters (paper preset), not 100%.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from autopeft.errors import PlanError
from autopeft.peft.base import InjectContext, MergeableLayer, get_method, qualified_name, registered_methods, set_submodule
from autopeft.peft.bitfit import bias_parameters
from autopeft.peft.plan import Plan, SiteSpec

__all__ = ["PeftState", "apply_plan", "merge_plan", "count_trainable", "trainable_fraction", "plan_state", "match_sites",
           "network_of"]

_STATE_ATTR = "_autopeft_peft"


@dataclass
class PeftState:
    """What :func:`apply_plan` leaves on the model (as ``model._autopeft_peft``).

    Args:
        plan: the plan applied.
        base_param_count: parameters of ``model.net`` before injection.
        site_methods: site name -> method name, for every site a plan entry matched.
        trainable_names: names (in ``model``) of the parameters the plan trains.
        merged: whether :func:`merge_plan` has folded the linear methods in.
    """

    plan: Plan
    base_param_count: int
    site_methods: dict[str, str] = field(default_factory=dict)
    trainable_names: list[str] = field(default_factory=list)
    merged: bool = False


def plan_state(model: nn.Module) -> PeftState | None:
    """The :class:`PeftState` of a model a plan was applied to, else None."""
    return getattr(model, _STATE_ATTR, None)


def network_of(model: nn.Module) -> nn.Module:
    """The network a plan adapts: a backbone's ``net`` (its discriminator apart), else the model itself."""
    net = getattr(model, "net", None)
    return net if isinstance(net, nn.Module) else model


def match_sites(plan: Plan, sites: list) -> list[tuple[str, SiteSpec, list]]:
    """Per plan entry, the sites it matches (in forward order); checks conflicts and kinds."""
    names = [site.name for site in sites]
    claimed: dict[str, tuple[str, SiteSpec]] = {}
    groups: list[tuple[str, SiteSpec, list]] = []
    methods = registered_methods()
    for pattern, spec in plan.sites.items():
        matched = [site for site in sites if fnmatch.fnmatchcase(site.name, pattern)]
        if not matched:
            raise PlanError(
                f"Site pattern {pattern!r} matches no site of backbone {plan.backbone!r}; sites: {', '.join(names)}."
            )
        method = methods[spec.method]
        for site in matched:
            if site.kind not in method.site_kinds:
                fitting = [name for name, m in methods.items() if site.kind in m.site_kinds]
                raise PlanError(
                    f"Method {spec.method!r} (pattern {pattern!r}) cannot sit on site {site.name!r} of kind "
                    f"{site.kind!r}; methods that fit {site.kind!r} sites: {', '.join(fitting)}."
                )
            if site.name in claimed and claimed[site.name][1] != spec:
                other_pattern, other = claimed[site.name]
                raise PlanError(
                    f"Site {site.name!r} is matched by {other_pattern!r} ({other.method}) and by {pattern!r} "
                    f"({spec.method}) with different settings; make the patterns disjoint."
                )
        fresh = [site for site in matched if site.name not in claimed]
        for site in fresh:
            claimed[site.name] = (pattern, spec)
        if fresh:
            groups.append((pattern, spec, fresh))
    return groups


def _unused_parameters(model: nn.Module) -> set[int]:
    """Ids of the network's parameters that a forward pass never reaches (no gradient).

    One probe on a zero input of the preset's crop size (batch 1, eval mode, so no running
    statistics change; the modes are restored). Such parameters exist in real networks: MONAI's
    ``TransformerBlock`` always builds ``norm_cross_attn`` even without cross-attention. Training
    and counting them is PETITE's "unused layers unfrozen and counted" defect, so no plan does.
    A model without ``preset.crop_size`` is not probed.
    """
    crop = getattr(getattr(model, "preset", None), "crop_size", None)
    params = [p for p in network_of(model).parameters() if p.is_floating_point()]
    if crop is None or not params:
        return set()
    # Reachability depends on the architecture, not on the weights: probe once per architecture.
    key = (type(model), repr(model.preset), tuple((n, tuple(p.shape)) for n, p in model.named_parameters()))
    if key not in _UNUSED_CACHE:
        _UNUSED_CACHE[key] = _probe_unused(model, crop, params)
    unused_names = _UNUSED_CACHE[key]
    return {id(p) for n, p in model.named_parameters() if n in unused_names}


_UNUSED_CACHE: dict[tuple, frozenset[str]] = {}


def _probe_unused(model: nn.Module, crop: tuple[int, ...], params: list[nn.Parameter]) -> frozenset[str]:
    modes = {module: module.training for module in model.modules()}
    flags = [p.requires_grad for p in params]
    try:
        model.eval()
        for p in params:
            p.requires_grad_(True)
        channels = getattr(model, "in_channels", 1)
        probe = torch.zeros(1, channels, *crop, device=params[0].device, dtype=params[0].dtype)
        with torch.enable_grad():
            grads = torch.autograd.grad(model(probe).sum(), params, allow_unused=True)
    finally:
        for module, training in modes.items():
            module.training = training
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    unused_ids = {id(p) for p, grad in zip(params, grads) if grad is None}
    return frozenset(n for n, p in model.named_parameters() if id(p) in unused_ids)


def apply_plan(
    model: nn.Module,
    plan: Plan | Mapping,
    *,
    importance: Mapping[str, torch.Tensor] | None = None,
    _sparse_selection: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Freeze ``model``, inject each site's method, and unfreeze exactly what the plan trains.

    Parameters the network never uses are never trained (see :func:`_unused_parameters`: one
    probe forward/backward at batch 1 on the preset's crop size finds them).

    Args:
        model: a freshly built or loaded pre-trained backbone (``sites()``, ``net``); changed in place.
        plan: a :class:`Plan` or plain plan data.
        importance: per-parameter scores from :func:`autopeft.importance.compute_importance` on
            this model, needed by SH-PEFT entries only.

    Returns:
        ``model``, with the plan recorded (see :func:`count_trainable`, :func:`merge_plan`).

    Raises:
        PlanError: a pattern matching no site, a method that cannot sit on a site's kind, a site
            matched by two entries with different settings, a backbone name that differs, or a
            plan entry that finds nothing to train; each message lists the valid choices. Errors
            found while injecting leave ``model`` partly changed: apply plans to a fresh copy.
    """
    if not isinstance(plan, Plan):
        plan = Plan.from_dict(plan)
    if plan_state(model) is not None:
        raise PlanError("A plan was already applied to this model; apply plans to a fresh pre-trained model.")
    model_name = getattr(model, "name", "")
    if model_name and plan.backbone != model_name:
        raise PlanError(f"The plan is written for backbone {plan.backbone!r}, but the model is {model_name!r}.")
    net = network_of(model)
    base_param_count = sum(p.numel() for p in net.parameters())
    groups = match_sites(plan, list(model.sites()))

    unused = _unused_parameters(model)
    param_names = {id(p): n for n, p in model.named_parameters()}
    context = InjectContext(model, base_param_count, param_names, importance, _sparse_selection, unused)
    for p in model.parameters():
        p.requires_grad_(False)
    trainable: dict[int, nn.Parameter] = {}
    if plan.full_ft:
        trainable.update((id(p), p) for p in net.parameters())
    if plan.bitfit:
        trainable.update((id(p), p) for p in bias_parameters(net))

    site_methods: dict[str, str] = {}
    for pattern, spec, sites in groups:
        method = get_method(spec.method)
        method.prepare(sites, spec.config, context)
        found = 0
        for site in sites:
            params = [p for p in method.inject(site, spec.config, context) if id(p) not in unused]
            trainable.update((id(p), p) for p in params)
            site_methods[site.name] = method.name
            found += len(params)
        if found == 0 and not method.trains_nothing:
            raise PlanError(
                f"Plan entry {pattern!r} ({method.name}) finds nothing to train in sites "
                f"{', '.join(s.name for s in sites)}; choose another method or sites."
            )
    for key in unused:
        trainable.pop(key, None)
    for p in trainable.values():
        p.requires_grad_(True)

    names_after = {id(p): n for n, p in model.named_parameters()}
    state = PeftState(
        plan=plan,
        base_param_count=base_param_count,
        site_methods=site_methods,
        trainable_names=[names_after[i] for i in names_after if i in trainable],
    )
    setattr(model, _STATE_ATTR, state)
    return model


def count_trainable(model: nn.Module) -> int:
    """Trainable parameters of ``model.net`` (the discriminator is never counted)."""
    return sum(p.numel() for p in network_of(model).parameters() if p.requires_grad)


def trainable_fraction(model: nn.Module) -> float:
    """:func:`count_trainable` over the parameters of ``model.net`` before any injection."""
    state = plan_state(model)
    base = state.base_param_count if state is not None else sum(p.numel() for p in network_of(model).parameters())
    return count_trainable(model) / base if base else 0.0


def merge_plan(model: nn.Module) -> nn.Module:
    """Fold every linear method (LoRA incl. grouped and transposed convs, SSF, SH-PEFT) into plain
    weights, in place. BitFit, LayerNorm and Full-FT already live in the weights. Adapters and
    VPT are not linear and stay in place. Outputs before and after agree to float round-off.

    Returns:
        ``model``; its plan state is marked merged (such a model cannot be saved with
        :func:`autopeft.peft.save_trained` any more: save before merging).
    """
    state = plan_state(model)
    if state is None:
        raise PlanError("merge_plan needs a model a plan was applied to (apply_plan).")
    if state.merged:
        return model
    sites = {site.name: site for site in model.sites()}
    with torch.no_grad():
        for site_name, method_name in state.site_methods.items():
            method = get_method(method_name)
            if not method.mergeable:
                continue
            module = sites[site_name].module
            method.merge(module)
            if isinstance(module, MergeableLayer):  # a site that is one wrapped layer
                set_submodule(model, qualified_name(model, module), module.merged())
    state.merged = True
    return model
