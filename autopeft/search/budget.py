"""The parameter budget of a search, and how many parameters a plan trains.

A budget is a hard constraint: a plan that trains more than the budget never trains; the search
records it as infeasible, with its share of parameters. Budgets are written as

- a percentage: ``1%``, ``0.5%``;
- a fraction in (0, 1]: ``0.005``;
- a count of parameters: ``250k``, ``1.5M``, ``12000``.

Counting uses :func:`autopeft.peft.apply_plan` on a fresh copy of the backbone, so a plan is counted
exactly as it trains (see :mod:`autopeft.peft.apply` for the convention).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from autopeft.errors import ConfigError
from autopeft.peft import Plan, apply_plan

__all__ = ["Budget", "PlanCount", "PlanCounter"]

_SUFFIXES = {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000}
_BUDGET_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(%|[kKmMgG])?\s*$")


@dataclass(frozen=True)
class Budget:
    """A limit on trainable parameters: a ``fraction`` of the network or an absolute ``count``.

    Args:
        fraction: the share of the pre-trained network's parameters, in (0, 1].
        count: a number of parameters.
        text: how the user wrote it (for messages). Defaults to "".

    >>> Budget.parse("1%").limit(1_000_000)
    10000
    >>> Budget.parse("250k").limit(10_000_000)
    250000
    """

    fraction: float | None = None
    count: int | None = None
    text: str = ""

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.count is None):
            raise ValueError(f"exactly one of `fraction` and `count` must be given, but got {self.fraction!r}, {self.count!r}.")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"`fraction` must be in (0, 1], but got {self.fraction!r}.")
        if self.count is not None and self.count < 1:
            raise ValueError(f"`count` must be a positive integer, but got {self.count!r}.")

    @classmethod
    def parse(cls, text: str | float | int) -> Budget:
        """Read ``1%``, ``0.005`` (a fraction) or ``250k``/``1.5M``/``12000`` (a count).

        Raises:
            ConfigError: for text that is none of these.
        """
        raw = str(text)
        match = _BUDGET_PATTERN.match(raw)
        if not match:
            raise ConfigError(
                f"`budget` must be a percentage (1%), a fraction (0.005) or a parameter count (250k, 1.5M, 12000), "
                f"but got {raw!r}."
            )
        value, suffix = float(match.group(1)), (match.group(2) or "")
        if suffix == "%":
            if not 0 < value <= 100:
                raise ConfigError(f"`budget` must be a percentage in (0, 100], but got {raw!r}.")
            return cls(fraction=value / 100, text=raw.strip())
        if not suffix and value <= 1:
            if value <= 0:
                raise ConfigError(f"`budget` must be positive, but got {raw!r}.")
            return cls(fraction=value, text=raw.strip())
        count = value * _SUFFIXES[suffix.lower()]
        if count < 1 or abs(count - round(count)) > 1e-6:
            raise ConfigError(f"`budget` must be a whole number of parameters, but got {raw!r}.")
        return cls(count=int(round(count)), text=raw.strip())

    def limit(self, total: int) -> int:
        """The most parameters a plan may train on a network of ``total`` parameters."""
        if self.count is not None:
            return self.count
        return int(self.fraction * total)  # floor: a plan exactly at the budget is allowed

    def allows(self, trainable: int, total: int) -> bool:
        return trainable <= self.limit(total)

    def describe(self, total: int) -> str:
        limit = self.limit(total)
        return f"{self.text or limit} = {limit:,} of {total:,} parameters ({100 * limit / total:.3f}%)"


@dataclass(frozen=True)
class PlanCount:
    """What a plan trains on one backbone.

    Args:
        trainable: trainable parameters (the counting convention of :mod:`autopeft.peft.apply`).
        total: parameters of the pre-trained network.
        per_site: site name -> trainable parameters inside that site (PEFT additions included).
        outside: trainable parameters outside every site (e.g. biases of the output head).
        pretrained: names of the pre-trained tensors trained whole (norms, biases, Full-FT);
            SH-PEFT's selected entries and PEFT additions are not among them.
    """

    trainable: int
    total: int
    per_site: dict[str, int] = field(default_factory=dict)
    outside: int = 0
    pretrained: frozenset[str] = frozenset()

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0


class PlanCounter:
    """Counts plans on one backbone architecture, exactly as :func:`apply_plan` would, but fast.

    Applying a whole plan costs a model copy and an injection per plan (about half a second on a
    tiny backbone). Counts are additive over plan entries, except for pre-trained parameters that
    two entries or BitFit both train (counted once). So each distinct entry (pattern(s) + method
    settings) is applied once, alone, and remembered as (pre-trained parameter names it trains,
    parameters it adds per site); a plan's count is the sum of what its entries add plus the size
    of the union of the pre-trained parameters they (and BitFit) train. Full-FT plans are applied
    whole.

    Args:
        template: a freshly built backbone (weights do not matter: counts depend on shapes only).
    """

    def __init__(self, template: nn.Module) -> None:
        self.template = template
        self.total = sum(p.numel() for p in template.net.parameters())
        self._sizes = {n: p.numel() for n, p in template.named_parameters()}
        self._site_of: dict[str, str] = {}
        for site in template.sites():
            for p in site.module.parameters():
                self._site_of.setdefault(self._name_of(p), site.name)
        self.site_sizes = {site.name: sum(p.numel() for p in site.module.parameters()) for site in template.sites()}
        self._entries: dict[str, tuple[frozenset[str], dict[str, int], int]] = {}
        self._cache: dict[str, PlanCount] = {}
        self._placeholder_importance: dict[str, torch.Tensor] | None = None

    def _name_of(self, parameter: nn.Parameter) -> str:
        if not hasattr(self, "_names"):
            self._names = {id(p): n for n, p in self.template.named_parameters()}
        return self._names[id(parameter)]

    def _importance(self) -> dict[str, torch.Tensor]:
        # A method that reads importance (SH-PEFT) picks exactly its budget of weights whatever the
        # scores: zeros count it exactly.
        if self._placeholder_importance is None:
            self._placeholder_importance = {n: torch.zeros_like(p) for n, p in self.template.named_parameters()}
        return self._placeholder_importance

    def _apply(self, plan: Plan) -> tuple[frozenset[str], dict[str, int], int]:
        """(pre-trained names trained, added parameters per site, added outside sites) of ``plan``."""
        # A structural copy sharing the template's weight storage: cloning every tensor would cost
        # most of the time, and counting never changes a weight.
        memo: dict[int, Any] = {id(p): nn.Parameter(p.data, requires_grad=p.requires_grad) for p in self.template.parameters()}
        memo.update({id(b): b for b in self.template.buffers()})
        model = copy.deepcopy(self.template, memo)
        base_ids = {id(p): n for n, p in model.named_parameters()}
        apply_plan(model, plan, importance=self._importance() if plan.needs_importance else None)
        base_trained = frozenset(base_ids[id(p)] for p in model.net.parameters() if p.requires_grad and id(p) in base_ids)
        added: dict[str, int] = {}
        seen: set[int] = set()
        for site in model.sites():
            new = [p for p in site.module.parameters() if p.requires_grad and id(p) not in base_ids and id(p) not in seen]
            seen.update(id(p) for p in new)
            added[site.name] = sum(p.numel() for p in new)
        outside = sum(p.numel() for p in model.net.parameters() if p.requires_grad and id(p) not in base_ids and id(p) not in seen)
        return base_trained, added, outside

    def _entry(self, plan: Plan, patterns: tuple[str, ...], spec_dict: dict[str, Any] | None) -> tuple[frozenset[str], dict[str, int], int]:
        sites = {pattern: spec_dict for pattern in patterns} if spec_dict is not None else {}
        data = {"backbone": plan.backbone, "bitfit": spec_dict is None, "sites": sites}
        key = repr(sorted(data["sites"].items())) + repr(data["bitfit"])
        if key not in self._entries:
            self._entries[key] = self._apply(Plan.from_dict(data))
        return self._entries[key]

    def count(self, plan: Plan) -> PlanCount:
        """What ``plan`` trains: overall and per site (cached by plan)."""
        key = plan.key()
        if key in self._cache:
            return self._cache[key]
        if plan.full_ft:
            base_trained, added, outside = self._apply(plan)
            parts = [(base_trained, added, outside)]
        else:
            by_spec: dict[str, tuple[list[str], dict[str, Any]]] = {}
            for pattern, spec in plan.sites.items():
                spec_dict = spec.to_dict()
                by_spec.setdefault(repr(spec_dict), ([], spec_dict))[0].append(pattern)
            parts = [self._entry(plan, tuple(patterns), spec_dict) for patterns, spec_dict in by_spec.values()]
            if plan.bitfit:
                parts.append(self._entry(plan, (), None))
        base: set[str] = set().union(*(p[0] for p in parts)) if parts else set()
        per_site = {name: 0 for name in self.site_sizes}
        outside = 0
        for name in base:
            site = self._site_of.get(name)
            if site is None:
                outside += self._sizes[name]
            else:
                per_site[site] += self._sizes[name]
        for _, added, extra in parts:
            for site, value in added.items():
                per_site[site] += value
            outside += extra
        trainable = sum(per_site.values()) + outside
        result = PlanCount(trainable=trainable, total=self.total, per_site=per_site, outside=outside, pretrained=frozenset(base))
        self._cache[key] = result
        return result

