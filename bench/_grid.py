"""PETITE's exhaustive Mix-PEFT grid (``search_spaces/petite-grid.yaml``) as plans: the benchmarks'
reference (``rediscovery.py``), not part of the search."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from autopeft.errors import ConfigError
from autopeft.peft import Plan
from autopeft.search_spaces import SPACES_DIR

__all__ = ["grid_plans"]

_GRID = SPACES_DIR / "petite-grid.yaml"


def grid_plans(backbone: str, *, path: str | Path = _GRID, train: dict[str, Any] | None = None) -> list[Plan]:
    """The grid's plans for ``backbone``, named ``<encoder>-<decoder>[+bitfit]``, in file order.

    Raises:
        ConfigError: the grid has no entry for ``backbone``.
    """
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    settings = data["backbones"].get(backbone)
    if settings is None:
        raise ConfigError(f"{path} has no grid for backbone {backbone!r}; it has {', '.join(data['backbones'])}.")
    plans = []
    for encoder, decoder, bitfit in data["combinations"]:
        sites = {settings["encoder"]: {"method": encoder, **settings["methods"][encoder]},
                 settings["decoder"]: {"method": decoder, **settings.get("decoder_methods", {}).get(decoder, settings["methods"][decoder])}}
        name = f"{encoder}-{decoder}" + ("+bitfit" if bitfit else "")
        plans.append(Plan.from_dict({"name": name, "backbone": backbone, "bitfit": bool(bitfit), "sites": sites,
                                     "train": dict(train or {})}, source=f"{path} ({name})"))
    return plans
