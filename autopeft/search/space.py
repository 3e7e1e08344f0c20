"""Declarative search spaces: a plan with choices in it.

A space file (``search_spaces/<backbone>.yaml``) names site **groups** and, per group, the PEFT
methods that may sit there with their hyperparameter choices; plus the BitFit toggle, the learning
rate and SH-PEFT's lambda:

.. code-block:: yaml

    backbone: unetr
    groups:
      encoder.vit.late:                       # a group: one method for all its sites
        sites: ["encoder.vit.[6-9]", "encoder.vit.1[01]"]
        methods:
          none: {}                            # leave the group frozen
          lora: {rank: [1, 2, 4, 8, 16], targets: [[q, k], [q, k, v]]}
          vpt: {tokens: [8, 16, 50], first_stage: [0, 1]}
    bitfit: [true, false]
    lr: {low: 1.0e-4, high: 1.0e-2, log: true, default: 2.0e-3}
    shpeft_lambda: [0.0, 0.5, 1.0, 2.0]       # sampled only when some group picks shpeft

A hyperparameter is a list (a categorical choice; a list of lists chooses among lists), a mapping
``{low, high[, log][, step]}`` (a float range, or an integer range when both ends are integers), or
a single value (fixed). Names are the method's config fields (``autopeft.peft.registered_methods``),
plus the method's ``space_params`` (``PeftMethod.from_space`` turns them into config values; e.g.
VPT's ``first_stage``). Every hyperparameter is conditional on its method being chosen: Optuna
names it ``<group>.<method>.<name>``; the method choice is ``<group>.method``. A method that trains
nothing (``none``) adds no plan entry, and ``shpeft_lambda`` is drawn only when a chosen method
needs importance scores (``PeftMethod.needs_importance``).
"""

from __future__ import annotations

import fnmatch
import itertools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import optuna
import yaml

from autopeft.errors import ConfigError, PlanError, did_you_mean
from autopeft.peft import Plan, get_method, registered_methods
from autopeft.peft.base import PeftMethod, build_config
from autopeft.search.auto_space import AUTO_SPACES, auto_space
from autopeft.search.portfolio import lr_ladder
from autopeft.search_spaces import SPACES_DIR

__all__ = ["SearchSpace", "load_space", "space_from_data", "space_files"]

_TOP_LEVEL = ("name", "description", "backbone", "groups", "bitfit", "lr", "shpeft_lambda")


@dataclass(frozen=True)
class _Param:
    """One hyperparameter: ``kind`` is fixed, categorical, float or int."""

    name: str
    kind: str
    choices: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    default: Any = None

    def suggest(self, trial: Any, label: str) -> Any:
        if self.kind == "fixed":
            return self.choices[0]
        if self.kind == "categorical":
            labels = [_label(c) for c in self.choices]
            picked = trial.suggest_categorical(label, labels)
            return self.choices[labels.index(picked)]
        if self.kind == "int":
            return trial.suggest_int(label, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_float(label, self.low, self.high, log=self.log, step=self.step)

    def discrete_values(self) -> tuple[Any, ...]:
        """The values to enumerate: every choice, or a range's two ends."""
        if self.kind in ("fixed", "categorical"):
            return self.choices
        return (self.low, self.high) if self.kind == "float" else (int(self.low), int(self.high))

    def size(self) -> float:
        """How many values (``inf`` for a float range)."""
        if self.kind in ("fixed", "categorical"):
            return len(self.choices)
        if self.kind == "int":
            return (int(self.high) - int(self.low)) // int(self.step or 1) + 1
        if self.step:
            return math.floor((self.high - self.low) / self.step) + 1
        return math.inf

    def params_entry(self, value: Any) -> Any:
        """The value as Optuna stores it (categorical lists as their label)."""
        return _label(value) if self.kind == "categorical" else value

    def describe(self) -> str:
        if self.kind == "fixed":
            return str(_label(self.choices[0]))
        if self.kind == "categorical":
            return "{" + ", ".join(str(_label(c)) for c in self.choices) + "}"
        scale = " log" if self.log else ""
        return f"[{self.low:g}, {self.high:g}]{scale}"


def _label(value: Any) -> Any:
    # Optuna's categorical choices must be None/bool/int/float/str: lists travel as "q+k".
    if isinstance(value, (list, tuple)):
        return "+".join(str(v) for v in value)
    return value


def _param(name: str, raw: Any, where: str) -> _Param:
    if isinstance(raw, Mapping):
        unknown = set(raw) - {"low", "high", "log", "step", "default"}
        if unknown or not {"low", "high"} <= set(raw):
            raise ConfigError(f"{where}: a range must be {{low: ..., high: ...[, log: true][, step: ...]}}, but got {dict(raw)}.")
        low, high = raw["low"], raw["high"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not low < high:
            raise ConfigError(f"{where}: `low` must be a number below `high`, but got low={low!r}, high={high!r}.")
        log = bool(raw.get("log", False))
        if log and low <= 0:
            raise ConfigError(f"{where}: a log range needs `low` > 0, but got {low!r}.")
        kind = "int" if isinstance(low, int) and isinstance(high, int) and not isinstance(raw.get("step", 1), float) else "float"
        return _Param(name, kind, low=low, high=high, log=log, step=raw.get("step"), default=raw.get("default"))
    if isinstance(raw, list):
        if not raw:
            raise ConfigError(f"{where}: a list of choices must not be empty.")
        choices = tuple(tuple(c) if isinstance(c, list) else c for c in raw)
        return _Param(name, "fixed" if len(choices) == 1 else "categorical", choices=choices)
    return _Param(name, "fixed", choices=(raw,))


@dataclass(frozen=True)
class _Option:
    """A method a group may use, with its hyperparameters."""

    method: str
    params: tuple[_Param, ...]


class _SiteInfo(NamedTuple):
    """What a method's ``from_space`` may read of a site (no module: a space stays light to pickle)."""

    name: str
    role: str
    kind: str
    stage: int


@dataclass(frozen=True)
class _Group:
    name: str
    patterns: tuple[str, ...]
    options: tuple[_Option, ...]
    sites: tuple[_SiteInfo, ...]  # the sites the patterns match, in pattern order

    def option(self, method: str) -> _Option:
        return next(o for o in self.options if o.method == method)

    def idle_choice(self) -> tuple[str, dict[str, Any]]:
        """What a group left out of a :meth:`SearchSpace.params_for` choice gets: its method that
        trains nothing, else its first method (with default hyperparameters)."""
        idle = next((o.method for o in self.options if get_method(o.method).trains_nothing), self.options[0].method)
        return idle, {}


class SearchSpace:
    """A loaded, validated search space for one backbone.

    Use :func:`load_space` to read one. :meth:`suggest` samples a plan from an Optuna trial
    (define-by-run), :meth:`plan_from_params` rebuilds the plan of a recorded trial.
    """

    def __init__(
        self,
        *,
        backbone: str,
        groups: Sequence[_Group],
        bitfit: _Param,
        lr: _Param,
        shpeft_lambda: _Param,
        source: str = "",
    ) -> None:
        self.backbone = backbone
        self.groups = tuple(groups)
        self.bitfit = bitfit
        self.lr = lr
        self.shpeft_lambda = shpeft_lambda
        self.source = source
        self.notes: tuple[str, ...] = ()  # what a generated space left out, and why

    # Sampling ---------------------------------------------------------------------------------
    def suggest(self, trial: Any, *, train: Mapping[str, Any] | None = None) -> Plan:
        """Sample a plan: per group a method, then that method's hyperparameters.

        Args:
            trial: an ``optuna.Trial`` (or anything with its ``suggest_*`` methods, e.g.
                ``optuna.trial.FixedTrial``).
            train: extra training settings put in the plan's ``train`` (e.g. ``{"epochs": 20}``).
        """
        sites: dict[str, dict[str, Any]] = {}
        needs_importance = False
        for group in self.groups:
            methods = [o.method for o in group.options]
            method = trial.suggest_categorical(f"{group.name}.method", methods) if len(methods) > 1 else methods[0]
            if get_method(method).trains_nothing:
                continue
            values = {p.name: p.suggest(trial, f"{group.name}.{method}.{p.name}") for p in group.option(method).params}
            entry = self._site_entry(group, method, values)
            needs_importance |= get_method(method).needs_importance
            for pattern in group.patterns:
                sites[pattern] = entry
        bitfit = bool(self.bitfit.suggest(trial, "bitfit"))
        train_settings: dict[str, Any] = {"lr": float(self.lr.suggest(trial, "lr"))}
        if needs_importance:
            train_settings["shpeft_lambda"] = float(self.shpeft_lambda.suggest(trial, "shpeft_lambda"))
        train_settings.update(train or {})
        return Plan.from_dict({"backbone": self.backbone, "bitfit": bitfit, "sites": sites, "train": train_settings}, source="space")

    @staticmethod
    def _site_entry(group: _Group, method: str, values: dict[str, Any]) -> dict[str, Any]:
        entry: dict[str, Any] = {"method": method}
        for key, value in get_method(method).from_space(values, group.sites).items():
            entry[key] = list(value) if isinstance(value, tuple) else value
        return entry

    def plan_from_params(self, params: Mapping[str, Any], *, train: Mapping[str, Any] | None = None) -> Plan:
        """The plan that a trial with these Optuna ``params`` sampled."""
        return self.suggest(optuna.trial.FixedTrial(dict(params)), train=train)

    def params_for(self, choice: Mapping[str, Any]) -> dict[str, Any]:
        """Optuna params for a choice written as ``{group: (method, {param: value}), "bitfit": b,
        "lr": x}``; missing hyperparameters take their first choice (or a range's default/low end)."""
        params: dict[str, Any] = {}
        chosen = {group.name: choice.get(group.name) or group.idle_choice() for group in self.groups}
        for group in self.groups:
            method, values = chosen[group.name]
            if len(group.options) > 1:
                params[f"{group.name}.method"] = method
            for p in group.option(method).params:
                if p.kind == "fixed":
                    continue
                value = values.get(p.name, p.choices[0] if p.choices else (p.default if p.default is not None else p.low))
                params[f"{group.name}.{method}.{p.name}"] = p.params_entry(value)
        if self.bitfit.kind != "fixed":
            params["bitfit"] = self.bitfit.params_entry(choice.get("bitfit", self.bitfit.choices[0]))
        if self.lr.kind != "fixed":
            params["lr"] = choice.get("lr", self.default_lr())
        if any(get_method(m).needs_importance for m, _ in chosen.values()) and self.shpeft_lambda.kind != "fixed":
            params["shpeft_lambda"] = self.shpeft_lambda.params_entry(choice.get("shpeft_lambda", self.shpeft_lambda.choices[0]))
        return params

    def lr_values(self, steps: int) -> tuple[float, ...]:
        """Learning rates that span the space's: ``steps`` log-spaced rates inside a range
        (:func:`autopeft.search.portfolio.lr_ladder`; evenly spaced on a linear range), every
        choice of a categorical, the value of a fixed one."""
        if self.lr.kind in ("fixed", "categorical"):
            return tuple(float(c) for c in self.lr.choices)
        if self.lr.log:
            return lr_ladder(self.lr.low, self.lr.high, steps)
        width = (self.lr.high - self.lr.low) / steps
        return tuple(float(self.lr.low + width * (i + 0.5)) for i in range(steps))

    def params_near(self, plan: Plan, *, lr: float | None = None) -> tuple[dict[str, Any], bool]:
        """The Optuna params of the space's plan nearest to ``plan``, and whether it is ``plan``.

        Per group: the method and hyperparameters ``plan`` gives the group's sites when the group
        offers them (exact), else the group's option of the same method agreeing on the most
        hyperparameters, else the group's idle choice. Exact only when every group, BitFit and the
        learning rate are; ``plan`` must not be Full-FT.
        """
        exact = not plan.full_ft
        choice: dict[str, Any] = {}
        for group in self.groups:
            entries = [_entry_for(plan, site.name) for site in group.sites]
            if set(entries) == {None}:
                continue  # the plan leaves the group frozen: its idle choice
            picked, group_exact = self._nearest_choice(group, entries)
            exact &= group_exact
            if picked is not None:
                choice[group.name] = picked
        choice["bitfit"] = plan.bitfit
        exact &= plan.bitfit in self.bitfit.discrete_values()
        if lr is not None:
            choice["lr"] = lr
        return self.params_for(choice), exact

    def _nearest_choice(self, group: _Group, entries: list) -> tuple[tuple[str, dict[str, Any]] | None, bool]:
        """(method, hyperparameters) of ``group`` nearest to the plan's entries on its sites (the
        entry on most sites), and whether it is exactly the plan's (one entry on every site,
        offered by the group)."""
        exact = len(set(entries)) == 1  # one setting on every site of the group, none left frozen
        placed = [e for e in entries if e is not None]
        target = dict(max(sorted(set(placed), key=repr), key=placed.count))
        best, best_score = None, -1
        for method, values in self.group_choices(group):
            if method != target["method"]:
                continue
            entry = _normalised(self.backbone, self._site_entry(group, method, values))
            score = sum(entry.get(k) == v for k, v in target.items())
            if entry == target:
                return (method, values), exact
            if score > best_score:
                best, best_score = (method, values), score
        return best, False

    def default_lr(self, fallback: float | None = None) -> float:
        """The learning rate warm-start plans use: the range's ``default``, else ``fallback``
        clipped into the range, else its geometric middle."""
        if self.lr.kind == "fixed":
            return float(self.lr.choices[0])
        if self.lr.kind == "categorical":
            return float(self.lr.choices[0])
        if self.lr.default is not None:
            return float(self.lr.default)
        if fallback is not None:
            return float(min(max(fallback, self.lr.low), self.lr.high))
        return float(math.sqrt(self.lr.low * self.lr.high)) if self.lr.log else float((self.lr.low + self.lr.high) / 2)

    # Enumeration and size ---------------------------------------------------------------------
    def group_choices(self, group: _Group) -> list[tuple[str, dict[str, Any]]]:
        """Every (method, hyperparameters) of a group; ranges contribute their two ends."""
        out: list[tuple[str, dict[str, Any]]] = []
        for option in group.options:
            names = [p.name for p in option.params]
            for combo in itertools.product(*(p.discrete_values() for p in option.params)):
                out.append((option.method, dict(zip(names, combo))))
        return out

    def size(self) -> tuple[float, str]:
        """(number of distinct plans, a note on what is continuous); ``inf`` with a float range."""
        per_group, without_importance = [], []
        for group in self.groups:
            sizes = {o.method: math.prod(p.size() for p in o.params) for o in group.options}
            per_group.append(sum(sizes.values()))
            without_importance.append(sum(v for m, v in sizes.items() if not get_method(m).needs_importance))
        # Plans where some group needs importance also draw shpeft_lambda.
        all_plans, plain = math.prod(per_group), math.prod(without_importance)
        structural = plain + (all_plans - plain) * self.shpeft_lambda.size()
        total = structural * self.bitfit.size() * self.lr.size()
        note = "" if math.isfinite(total) else f"{structural * self.bitfit.size():,.0f} discrete plans x a continuous learning rate"
        return total, note

    def describe(self) -> str:
        """A readable listing of the space."""
        lines = [f"search space for {self.backbone}" + (f" ({self.source})" if self.source else "")]
        for group in self.groups:
            lines.append(f"  {group.name}  [{', '.join(group.patterns)}]")
            for option in group.options:
                params = ", ".join(f"{p.name} {p.describe()}" for p in option.params)
                lines.append(f"    {option.method:<10} {params}")
        lines.append(f"  bitfit         {self.bitfit.describe()}")
        lines.append(f"  lr             {self.lr.describe()}")
        if any(get_method(o.method).needs_importance for g in self.groups for o in g.options):
            lines.append(f"  shpeft_lambda  {self.shpeft_lambda.describe()}")
        return "\n".join(lines)


def _frozen(entry: Mapping[str, Any]) -> tuple:
    """A plan entry as a hashable, comparable value (lists as tuples)."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in entry.items()))


def _entry_for(plan: Plan, site: str) -> tuple | None:
    """The entry of ``plan`` that sits on ``site`` (its first matching pattern, as apply_plan
    reads it), frozen; None where the plan leaves the site alone."""
    for pattern, spec in plan.sites.items():
        if fnmatch.fnmatchcase(site, pattern):
            return _frozen(spec.to_dict())
    return None


def _normalised(backbone: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    """A space's plan entry with every default filled in, as a plan stores it."""
    spec = Plan.from_dict({"backbone": backbone, "sites": {"_": dict(entry)}}, source="space").sites["_"]
    return dict(_frozen(spec.to_dict()))


def space_files() -> dict[str, Path]:
    """Name -> file of the spaces shipped in ``search_spaces/``."""
    if not SPACES_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(SPACES_DIR.glob("*.yaml"))}


def _read(name_or_path: str | os.PathLike) -> tuple[dict[str, Any], str]:
    text = str(name_or_path)
    path = Path(text).expanduser()
    if not path.is_file():
        shipped = space_files()
        if text not in shipped:
            raise ConfigError(f"No search space {text!r}{did_you_mean(text, shipped)}; shipped spaces: {', '.join(shipped)}; "
                              "or give a YAML file.")
        path = shipped[text]
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: a search space must be a mapping with keys {list(_TOP_LEVEL)}.")
    return dict(data), str(path)


def load_space(name_or_path: str | os.PathLike, sites: Sequence[Any], *, model: Any = None) -> SearchSpace:
    """Read and validate a space against a backbone's sites.

    Args:
        name_or_path: a shipped space name (``unetr``), a YAML file, or a generated space
            (``auto-grouped``, ``auto-blocks``: :mod:`autopeft.search.auto_space`, which needs
            ``model``). The backbone's own name gives its shipped space, or ``auto-grouped``
            where none is shipped.
        sites: the backbone's ``sites()`` (name, role, kind, stage), in forward order.
        model: the built backbone, for generated spaces. Defaults to None.

    Raises:
        ConfigError: an unknown key, method or hyperparameter, a pattern matching no site, a
            method that cannot sit on a group's site kinds, or overlapping groups.
    """
    text = str(name_or_path)
    notes: list[str] = []
    generated = text in AUTO_SPACES or (model is not None and text == getattr(model, "name", None)
                                        and text not in space_files() and not Path(text).expanduser().is_file())
    if generated:
        if model is None:
            raise ConfigError(f"Space {text!r} is generated from a backbone's sites; pass the backbone (model=).")
        style = text if text in AUTO_SPACES else AUTO_SPACES[0]
        data, notes = auto_space(model, style)
        source = f"{style}, generated from {len(list(sites))} sites"
    else:
        data, source = _read(name_or_path)
    space = space_from_data(data, sites, source=source)
    space.notes = tuple(notes)
    return space


def space_from_data(data: Mapping[str, Any], sites: Sequence[Any], *, source: str) -> SearchSpace:
    """Validate space data (what a space YAML holds) against a backbone's sites (:func:`load_space`)."""
    data = dict(data)
    backbone, raw_groups = _check_top_level(data, source)
    methods = registered_methods()
    site_list = list(sites)
    claimed: dict[str, str] = {}  # site name -> the group that holds it, so that groups do not overlap
    groups = [_group_from_data(group_name, raw, site_list, backbone, claimed, methods, source=source)
              for group_name, raw in raw_groups.items()]
    space = SearchSpace(
        backbone=backbone,
        groups=groups,
        bitfit=_param("bitfit", data.get("bitfit", [True, False]), f"{source}: bitfit"),
        lr=_param("lr", data.get("lr", 1e-3), f"{source}: lr"),
        shpeft_lambda=_param("shpeft_lambda", data.get("shpeft_lambda", 1.0), f"{source}: shpeft_lambda"),
        source=source,
    )
    _check_choices(space, source)
    return space


def _check_top_level(data: Mapping[str, Any], source: str) -> tuple[str, Mapping[Any, Any]]:
    """The space's top-level keys: only known ones, a backbone name and a non-empty ``groups`` mapping.

    Args:
        data: the space data.
        source: where it came from, for the message.

    Returns:
        The backbone's name and the raw ``groups`` mapping.
    """
    for key in data:
        if key not in _TOP_LEVEL:
            raise ConfigError(f"{source}: unknown key {key!r}{did_you_mean(key, _TOP_LEVEL)}; valid keys: {', '.join(_TOP_LEVEL)}.")
    backbone = data.get("backbone")
    if not isinstance(backbone, str):
        raise ConfigError(f"{source}: `backbone` must name a backbone, but got {backbone!r}.")
    raw_groups = data.get("groups")
    if not isinstance(raw_groups, Mapping) or not raw_groups:
        raise ConfigError(f"{source}: `groups` must map group names to {{sites: ..., methods: ...}}.")
    return backbone, raw_groups


def _group_from_data(group_name: Any, raw: Any, site_list: list[Any], backbone: str, claimed: dict[str, str],
                     methods: Mapping[str, PeftMethod], *, source: str) -> _Group:
    """One entry of ``groups``: its sites, then its methods' options.

    Args:
        group_name: the group's name as the YAML gives it.
        raw: its data, ``{sites: ..., methods: ...}``.
        site_list: the backbone's sites.
        backbone: the backbone's name, for the message.
        claimed: site name -> group of the groups read so far; this group's sites are added.
        methods: the registered PEFT methods by name.
        source: where the space came from, for the message.
    """
    where = f"{source}: groups[{group_name!r}]"
    if not isinstance(raw, Mapping) or "sites" not in raw or "methods" not in raw:
        raise ConfigError(f"{where} must be a mapping with `sites` (patterns) and `methods`.")
    patterns = (raw["sites"],) if isinstance(raw["sites"], str) else tuple(raw["sites"])
    matched = _group_sites(where, patterns, site_list, backbone)
    for site in matched:
        if site.name in claimed:
            raise ConfigError(f"{where}: site {site.name!r} is also in group {claimed[site.name]!r}; groups must not overlap.")
        claimed[site.name] = str(group_name)
    options = _group_options(where, raw["methods"], {s.kind for s in matched}, methods)
    infos = tuple(_SiteInfo(s.name, s.role, s.kind, s.stage) for s in matched)
    return _Group(str(group_name), patterns, options, infos)


def _group_sites(where: str, patterns: tuple[str, ...], site_list: list[Any], backbone: str) -> list[Any]:
    """The sites a group's patterns match, in pattern then site order, each once; a pattern must match.

    Args:
        where: the group, for the message.
        patterns: fnmatch patterns of site names.
        site_list: the backbone's sites.
        backbone: the backbone's name, for the message.
    """
    matched: list[Any] = []
    for pattern in patterns:
        hits = [s for s in site_list if fnmatch.fnmatchcase(s.name, pattern)]
        if not hits:
            raise ConfigError(f"{where}: pattern {pattern!r} matches no site of {backbone}; sites: {', '.join(s.name for s in site_list)}.")
        matched.extend(h for h in hits if h not in matched)
    return matched


def _group_options(where: str, raw_methods: Any, kinds: set[str], methods: Mapping[str, PeftMethod]) -> tuple[_Option, ...]:
    """A group's ``methods``: each a registered method that fits the group's site kinds, with known hyperparameters.

    Args:
        where: the group, for the message.
        raw_methods: method name -> hyperparameter name -> choices.
        kinds: the kinds (vit, cnn) of the group's sites.
        methods: the registered PEFT methods by name.
    """
    if not isinstance(raw_methods, Mapping) or not raw_methods:
        raise ConfigError(f"{where}: `methods` must map method names to their hyperparameter choices.")
    options = []
    for method_name, raw_params in raw_methods.items():
        if method_name not in methods:
            raise ConfigError(f"{where}: unknown method {method_name!r}{did_you_mean(method_name, methods)}; "
                              f"methods: {', '.join(methods)}.")
        method = methods[method_name]
        if not kinds <= set(method.site_kinds):
            raise ConfigError(
                f"{where}: method {method_name!r} fits {list(method.site_kinds)} sites, but the group has "
                f"{sorted(kinds)} sites; split the group or drop the method."
            )
        valid = method.config_class.field_names() + method.space_params
        params = []
        for param_name, raw_param in (raw_params or {}).items():
            if param_name not in valid:
                raise ConfigError(f"{where}.{method_name}: unknown hyperparameter {param_name!r}"
                                  f"{did_you_mean(param_name, valid)}; valid: {', '.join(valid) or 'none'}.")
            params.append(_param(str(param_name), raw_param, f"{where}.{method_name}.{param_name}"))
        options.append(_Option(str(method_name), tuple(params)))
    return tuple(options)


def _check_choices(space: SearchSpace, source: str) -> None:
    """Every method/hyperparameter value must make a valid plan entry (fail at load, not mid-run)."""
    for group in space.groups:
        for method, values in space.group_choices(group):
            if get_method(method).trains_nothing:
                continue
            entry = SearchSpace._site_entry(group, method, values)
            hyper = {k: v for k, v in entry.items() if k != "method"}
            try:
                build_config(get_method(method), hyper, f"{source}: groups[{group.name!r}].{method}")
            except PlanError as err:
                raise ConfigError(str(err)) from err
