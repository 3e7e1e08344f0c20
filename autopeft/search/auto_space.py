"""Search spaces generated from a backbone's sites: ``auto-blocks`` and ``auto-grouped``.

Both are the declarative structure a space YAML holds (:mod:`autopeft.search.space`), built in
memory, so nothing downstream differs from a shipped space:

- ``auto-blocks``: one group per site (a method and its hyperparameters for each block);
- ``auto-grouped``: one group per (role, kind, stage): ``encoder.cnn.s1`` holds the encoder's
  convolutional blocks at resolution level 1.

Each group offers the registered methods whose ``site_kinds`` hold its sites' kind, with the
options of the shipped spaces (:data:`METHOD_OPTIONS`, from ``search_spaces/unetr.yaml``: the
rank, reduction-factor, token and fraction ladders; a plug-in method gets its defaults). VPT is a
per-group choice (its prompts enter at the first block of a run) and is left out of
``auto-blocks``, as ``unetr-blocks.yaml`` leaves it out.

A method is offered on a site only where it works there: each method, at its first options and
at each other value of each choice (LoRA's ``targets``, SH-PEFT's ``fraction``), is applied to a
copy of the network (``apply_plan``: it must find layers to change, and something to train within
what it may train); a method that is not mergeable (it adds hooks: adapters, prompts) must also
run at its first options: the network runs forward once with the method on every site that took
it, and site by site when that fails. What fails is left out, and :func:`auto_space` says why
(``SearchSpace.describe`` shows the notes). A grouped space offers a method on a group when it
works on every site of the group. Results are kept per backbone and preset in the process.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch

from autopeft.backbones import build_backbone
from autopeft.errors import AutopeftError
from autopeft.peft import Plan, apply_plan, registered_methods
from autopeft.peft.base import BUILTIN_MODULES

__all__ = ["AUTO_SPACES", "METHOD_OPTIONS", "auto_space"]

AUTO_SPACES: tuple[str, ...] = ("auto-grouped", "auto-blocks")

# The options of the shipped spaces (search_spaces/unetr.yaml), per site kind.
METHOD_OPTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "vit": {
        "none": {},
        "lora": {"rank": [1, 2, 4, 8, 16], "targets": [["q", "k"], ["q", "k", "v"], ["qkv", "out_proj"]]},
        "adapter": {"reduction_factor": [1, 4, 8, 16, 32]},
        "ssf": {},
        "layernorm": {},
        "vpt": {"tokens": [10, 25, 50], "first_stage": [0, 1, 2]},
        "shpeft": {"fraction": [0.0005, 0.001, 0.002]},
    },
    "cnn": {
        "none": {},
        "lora": {"rank": [1, 2, 4, 8], "targets": [["conv"]]},
        "adapter": {"reduction_factor": [1, 4, 8, 16, 32]},
        "ssf": {},
        "layernorm": {},
        "shpeft": {"fraction": [0.0005, 0.001, 0.002]},
    },
}
_LR = {"low": 3.0e-5, "high": 1.0e-1, "log": True}  # the shipped spaces' range (unetr.yaml)
_SHPEFT_LAMBDA = [0.0, 0.5, 1.0, 2.0]

_CACHE: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}


def _options_for(kind: str, per_block: bool) -> dict[str, dict[str, Any]]:
    """Method -> options for a site kind: the shipped spaces' methods for that kind, and every
    plug-in method that fits it (with its defaults)."""
    table = METHOD_OPTIONS.get(kind, {})
    out: dict[str, dict[str, Any]] = {}
    for name, method in registered_methods().items():
        if kind not in method.site_kinds:
            continue
        if name in table:
            options = dict(table[name])
        elif type(method).__module__ not in BUILTIN_MODULES:
            options = {}
        else:
            continue
        if per_block and any(p in options for p in method.space_params):
            continue  # a per-group choice (VPT's first stage)
        out[name] = options
    return out


def _probe_config(options: Mapping[str, Any], key: str | None, value: Any, method) -> dict[str, Any]:
    """A plan entry: ``key`` at ``value``, every other choice at its first value."""
    config: dict[str, Any] = {"method": method.name}
    for name, values in options.items():
        if name in method.space_params:
            continue
        if name == key:
            config[name] = value
        elif isinstance(values, list):
            config[name] = values[0]
        elif isinstance(values, Mapping):
            config[name] = values.get("low")
        else:
            config[name] = values
    return config


_ERRORS = (AutopeftError, ValueError, TypeError, RuntimeError)


def _apply(model, entries: Mapping[str, dict[str, Any]]):
    try:  # a fresh build is much faster than a deep copy; weights do not matter here
        trial = build_backbone(model.name, model.preset.name)
    except AutopeftError:
        trial = copy.deepcopy(model)
    plan = Plan.from_dict({"backbone": model.name, "sites": dict(entries)})
    importance = None
    if plan.needs_importance:
        importance = {name: torch.rand_like(p) for name, p in trial.named_parameters()}
    apply_plan(trial, plan, importance=importance)
    return trial


class _SiteFailed(Exception):
    def __init__(self, site: str | None, error: BaseException) -> None:
        super().__init__(str(error))
        self.site, self.error = site, error


def _runs(trial) -> None:
    """One forward pass at batch 1 on the crop size (eval mode, no gradients); a failure names
    the innermost site that was running (:class:`_SiteFailed`)."""
    crop = tuple(trial.preset.crop_size)
    reference = next(trial.parameters())
    x = torch.rand(1, trial.in_channels, *crop, device=reference.device, dtype=reference.dtype)
    running: list[str] = []
    handles = []
    for site in trial.sites():
        # First before (ahead of a method's own pre-hooks), last after (behind its hooks).
        handles.append(site.module.register_forward_pre_hook(lambda *_, n=site.name: running.append(n), prepend=True))
        handles.append(site.module.register_forward_hook(lambda *_: running.pop() and None))
    try:
        with torch.no_grad():
            trial.eval()(x)
    except _ERRORS as err:
        raise _SiteFailed(running[-1] if running else None, err) from err
    finally:
        for handle in handles:
            handle.remove()


def _working_sites(model, sites: list, config: dict[str, Any], method, notes: dict[str, list[str]], what: str,
                   *, run: bool = True) -> list:
    """The sites where ``config`` injects (and runs, for a method that is not mergeable, when
    ``run``): all of them in one plan, and those an error names left out one at a time (site by
    site when an error names none)."""
    remaining = list(sites)
    while remaining:
        try:
            trial = _apply(model, {s.name: config for s in remaining})
            if run and not method.mergeable:
                # A mergeable method swaps layers for linear equivalents: where it injects, it runs.
                # The others (adapters, prompts: hooks) must show it in a forward pass.
                _runs(trial)
            return remaining
        except _SiteFailed as failed:
            named = [s for s in remaining if s.name == failed.site]
            if not named:
                break
            notes[named[0].name].append(f"{what}: fails in a forward pass ({type(failed.error).__name__}: {failed.error})")
            remaining.remove(named[0])
        except _ERRORS as err:
            named = [s for s in remaining if repr(s.name) in str(err)]
            if len(named) != 1:
                break
            notes[named[0].name].append(f"{what}: {err}")
            remaining.remove(named[0])
    working = []
    for site in remaining:  # one by one
        try:
            trial = _apply(model, {site.name: config})
            if run and not method.mergeable:
                _runs(trial)
            working.append(site)
        except (_SiteFailed, *_ERRORS) as err:
            notes[site.name].append(f"{what}: {type(err).__name__}: {err}")
    return working


def _feasible(model) -> dict[str, dict[str, Any]]:
    """Per site: method -> options that work there; per site, notes on what does not."""
    key = (model.name, model.preset.name)
    if key in _CACHE:
        return _CACHE[key]
    methods = registered_methods()
    sites = list(model.sites())
    works: dict[str, dict[str, dict[str, Any]]] = {s.name: {} for s in sites}
    notes: dict[str, list[str]] = {s.name: [] for s in sites}
    for kind in ("vit", "cnn"):
        kind_sites = [s for s in sites if s.kind == kind]
        if not kind_sites:
            continue
        for method_name, options in _options_for(kind, per_block=False).items():
            method = methods[method_name]
            if method.trains_nothing:
                for site in kind_sites:
                    works[site.name][method_name] = dict(options)
                continue
            varied = [k for k, v in options.items() if isinstance(v, list) and len(v) > 1 and k not in method.space_params]
            base = _working_sites(model, kind_sites, _probe_config(options, None, None, method), method, notes, method_name)
            kept = {s.name: dict(options) for s in base}
            for param in varied:
                for value in options[param][1:]:
                    what = f"{method_name} {param}={value}"
                    fine = {s.name for s in _working_sites(model, base, _probe_config(options, param, value, method),
                                                           method, notes, what, run=False)}
                    for site in base:
                        if site.name not in fine:
                            kept[site.name][param] = [v for v in kept[site.name][param] if v != value]
            for name, chosen in kept.items():
                works[name][method_name] = chosen
    result = {"works": works, "notes": notes}
    _CACHE[key] = result
    return result


def _intersect(option_sets: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Methods that work on every site, with the choices all of them take."""
    first, rest = option_sets[0], option_sets[1:]
    out = {}
    for method, options in first.items():
        if not all(method in other for other in rest):
            continue
        merged = {}
        for key, values in options.items():
            if isinstance(values, list):
                values = [v for v in values if all(v in other[method].get(key, [v]) for other in rest)]
                if not values:
                    break
            merged[key] = values
        else:
            out[method] = merged
    return out


def auto_space(model, style: str) -> tuple[dict[str, Any], list[str]]:
    """The space data (as a space YAML holds it) of ``style`` for ``model``, and notes on what
    was left out where.

    Args:
        model: a built backbone (``sites()``, ``name``, ``preset``).
        style: ``auto-grouped`` or ``auto-blocks``.
    """
    feasible = _feasible(model)
    works, notes = feasible["works"], feasible["notes"]
    sites = list(model.sites())
    groups: dict[str, dict[str, Any]] = {}
    if style == "auto-blocks":
        for site in sites:
            options = {m: works[site.name][m] for m in _options_for(site.kind, per_block=True) if m in works[site.name]}
            groups[site.name] = {"sites": site.name, "methods": options}
    else:
        keyed: dict[tuple[str, str, int], list] = {}
        for site in sites:
            keyed.setdefault((site.role, site.kind, site.stage), []).append(site)
        for (role, kind, stage), members in keyed.items():
            common = _intersect([works[s.name] for s in members])
            options = {m: common[m] for m in _options_for(kind, per_block=False) if m in common}
            groups[f"{role}.{kind}.s{stage}"] = {"sites": [s.name for s in members], "methods": options}
    text_notes = [f"{site}: {note}" for site, site_notes in notes.items() for note in site_notes]
    data = {"backbone": model.name, "groups": groups, "bitfit": [True, False], "lr": dict(_LR),
            "shpeft_lambda": list(_SHPEFT_LAMBDA)}
    return data, text_notes
