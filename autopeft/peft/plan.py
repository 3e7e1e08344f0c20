"""Plans: how to fine-tune one backbone, as a small frozen, serialisable value.

.. code-block:: yaml

    backbone: unetr
    bitfit: true              # every bias of the network trains, on top of the site methods
    full_ft: false            # true: every parameter of the network trains (Full-FT)
    sites:                    # site name or glob (fnmatch) -> method and hyperparameters
      encoder.vit.*: {method: lora, rank: 4, alpha: 8, targets: [q, k]}
      decoder.*:     {method: ssf}
    train: {lr: 1.0e-3, epochs: 200}   # handed to the trainer as is

No-FT is the plan with no sites. Named plans ship in ``autopeft/plans/*.yaml``
(:func:`load_plan`, :func:`named_plans`). Validation that needs no backbone (method names,
hyperparameter names and values) happens here; matching sites happens in
:func:`autopeft.peft.apply_plan`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from autopeft._io import atomic_write_text
from autopeft.errors import PlanError, did_you_mean
from autopeft.peft.base import MethodConfig, build_config, get_method

__all__ = ["Plan", "SiteSpec", "load_plan", "named_plans"]

_TOP_LEVEL = ("name", "description", "backbone", "bitfit", "full_ft", "sites", "train")


@dataclass(frozen=True)
class SiteSpec:
    """One plan entry: a method and its validated hyperparameters."""

    method: str
    config: MethodConfig

    def to_dict(self) -> dict[str, Any]:
        # Every value, defaults included: a saved plan must not change meaning if defaults do.
        return {"method": self.method, **self.config.to_dict()}


@dataclass(frozen=True)
class Plan:
    """A PEFT plan for one backbone.

    Args:
        backbone: registered backbone name the plan is written for (``unetr``, ``cvtgan``).
        sites: site pattern -> :class:`SiteSpec`, in the order written.
        bitfit: train every bias of the network on top of the site methods. Defaults to False.
        full_ft: train every parameter of the network (Full-FT). Defaults to False.
        train: training settings handed to the trainer unchanged (``lr``, ``epochs``, ...).
        name: a short name (named plans carry theirs). Defaults to "".
        description: where the plan comes from. Defaults to "".
    """

    backbone: str
    sites: Mapping[str, SiteSpec] = field(default_factory=dict)
    bitfit: bool = False
    full_ft: bool = False
    train: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""
    description: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "plan") -> Plan:
        """Validate and build a plan from plain data (as loaded from YAML).

        Raises:
            PlanError: naming the field at fault and the valid choices.
        """
        if not isinstance(data, Mapping):
            raise PlanError(f"{source}: a plan must be a mapping with keys {list(_TOP_LEVEL)}, but got {type(data).__name__}.")
        for key in data:
            if key not in _TOP_LEVEL:
                raise PlanError(f"{source}: unknown field {key!r}{did_you_mean(key, _TOP_LEVEL)}; valid fields: {', '.join(_TOP_LEVEL)}.")
        backbone = data.get("backbone")
        if not isinstance(backbone, str) or not backbone:
            raise PlanError(f"{source}: `backbone` must name a registered backbone, but got {backbone!r}.")
        for flag in ("bitfit", "full_ft"):
            if not isinstance(data.get(flag, False), bool):
                raise PlanError(f"{source}: `{flag}` must be true or false, but got {data[flag]!r}.")
        raw_sites = data.get("sites") or {}
        if not isinstance(raw_sites, Mapping):
            raise PlanError(f"{source}: `sites` must map site patterns to {{method: ..., ...}}, but got {type(raw_sites).__name__}.")
        sites: dict[str, SiteSpec] = {}
        for pattern, entry in raw_sites.items():
            where = f"{source}: sites[{pattern!r}]"
            if not isinstance(pattern, str) or not pattern:
                raise PlanError(f"{where}: a site pattern must be a non-empty string.")
            if not isinstance(entry, Mapping) or "method" not in entry:
                raise PlanError(f"{where} must be a mapping with a `method` key, e.g. {{method: lora, rank: 4}}.")
            method = get_method(str(entry["method"]))
            hyper = {k: v for k, v in entry.items() if k != "method"}
            sites[pattern] = SiteSpec(method.name, build_config(method, hyper, where))
        train = data.get("train") or {}
        if not isinstance(train, Mapping):
            raise PlanError(f"{source}: `train` must be a mapping (lr, epochs, ...), but got {type(train).__name__}.")
        for text_field in ("name", "description"):
            if not isinstance(data.get(text_field, ""), str):
                raise PlanError(f"{source}: `{text_field}` must be a string, but got {data[text_field]!r}.")
        return cls(
            backbone=backbone,
            sites=sites,
            bitfit=bool(data.get("bitfit", False)),
            full_ft=bool(data.get("full_ft", False)),
            train=dict(train),
            name=data.get("name", ""),
            description=data.get("description", ""),
        )

    @classmethod
    def from_yaml(cls, text_or_path: str | os.PathLike) -> Plan:
        """Read a plan from a YAML file path or a YAML string (``yaml.safe_load`` only)."""
        source = "plan"
        text = str(text_or_path)
        path = Path(text_or_path)
        if isinstance(text_or_path, os.PathLike) or ("\n" not in text and text.endswith((".yaml", ".yml"))):
            if not path.is_file():
                raise PlanError(f"Plan file {path} does not exist.")
            source = str(path)
            text = path.read_text(encoding="utf-8")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise PlanError(f"{source} is not valid YAML: {err}") from err
        return cls.from_dict(data, source=source)

    @property
    def needs_importance(self) -> bool:
        """Whether a method of the plan reads importance scores (``PeftMethod.needs_importance``)."""
        return any(get_method(spec.method).needs_importance for spec in self.sites.values())

    @property
    def trains_anything(self) -> bool:
        """Whether the plan trains any parameter (No-FT plans do not, nor plans whose every entry
        is a method that trains nothing)."""
        return self.full_ft or self.bitfit or any(not get_method(s.method).trains_nothing for s in self.sites.values())

    def to_dict(self) -> dict[str, Any]:
        """Plain data that :meth:`from_dict` turns back into an equal plan."""
        out: dict[str, Any] = {}
        if self.name:
            out["name"] = self.name
        if self.description:
            out["description"] = self.description
        out["backbone"] = self.backbone
        out["bitfit"] = self.bitfit
        if self.full_ft:
            out["full_ft"] = True
        out["sites"] = {pattern: spec.to_dict() for pattern, spec in self.sites.items()}
        if self.train:
            out["train"] = dict(self.train)
        return out

    def key(self) -> str:
        """A string equal for equal plans and different otherwise (:meth:`to_dict` as JSON, in its
        own key order, which matters: site patterns match in order). For caches: far cheaper than
        :meth:`to_yaml`, and the budget checks count thousands of draws in a search."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    def to_yaml(self, path: str | os.PathLike | None = None) -> str:
        """The plan as YAML; also written to ``path`` when given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)
        if path is not None:
            atomic_write_text(path, text)
        return text


def named_plans() -> dict[str, Path]:
    """Name -> file of every plan shipped in ``autopeft/plans/``."""
    folder = resources.files("autopeft") / "plans"
    return {Path(str(entry)).stem: Path(str(entry)) for entry in sorted(folder.iterdir(), key=str) if str(entry).endswith(".yaml")}


def load_plan(name_or_path: str | os.PathLike) -> Plan:
    """A named plan (``petite-unetr``) or a plan YAML file.

    Raises:
        PlanError: listing the named plans when ``name_or_path`` is neither.
    """
    text = str(name_or_path)
    if isinstance(name_or_path, os.PathLike) or text.endswith((".yaml", ".yml")) or os.sep in text:
        return Plan.from_yaml(Path(text))
    plans = named_plans()
    if text not in plans:
        raise PlanError(f"No plan named {text!r}{did_you_mean(text, plans)}; named plans: {', '.join(plans)}; "
                        "or give a path to a YAML file.")
    return Plan.from_yaml(plans[text])
