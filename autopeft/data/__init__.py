"""Data for autopeft: manifests of paired scans, per-scanner splits, MONAI loaders, built-in data.

Names are imported on first use (PEP 562), so ``import autopeft.data`` stays cheap and MONAI is only
loaded by the loaders. The built-in simulator's ``simulate`` and ``builtin_data`` are re-exported
from :mod:`autopeft.data.simulator`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "REQUIRED_COLUMNS",
    "ScanSummary",
    "read_manifest",
    "read_scanner_profiles",
    "check_scans",
    "resolve_manifest",
    "Protocol",
    "split_scanner",
    "scanners_in",
    "train_loader",
    "eval_volumes",
    "load_volume",
    "simulate",
    "builtin_data",
]

# public name -> module that defines it
_HOMES: dict[str, str] = {
    "REQUIRED_COLUMNS": "autopeft.data.manifest",
    "ScanSummary": "autopeft.data.manifest",
    "read_manifest": "autopeft.data.manifest",
    "read_scanner_profiles": "autopeft.data.manifest",
    "check_scans": "autopeft.data.manifest",
    "resolve_manifest": "autopeft.data.builtin",
    "Protocol": "autopeft.data.splits",
    "split_scanner": "autopeft.data.splits",
    "scanners_in": "autopeft.data.splits",
    "train_loader": "autopeft.data.loading",
    "eval_volumes": "autopeft.data.loading",
    "load_volume": "autopeft.data.loading",
    "simulate": "autopeft.data.simulator",
    "builtin_data": "autopeft.data.simulator",
}

if TYPE_CHECKING:  # pragma: no cover - static analysers see the eager imports
    from autopeft.data.builtin import resolve_manifest
    from autopeft.data.loading import eval_volumes, load_volume, train_loader
    from autopeft.data.manifest import REQUIRED_COLUMNS, ScanSummary, check_scans, read_manifest, read_scanner_profiles
    from autopeft.data.simulator import builtin_data, simulate
    from autopeft.data.splits import Protocol, scanners_in, split_scanner


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'autopeft.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
