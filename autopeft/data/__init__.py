"""Data for autopeft: manifests of paired scans, per-scanner splits, MONAI loaders, built-in data.

The MONAI loaders (``train_loader``, ``eval_volumes``, ``load_volume``) are the one exception to the
plain imports below: see :data:`_TORCH_NAMES`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from autopeft.data.builtin import resolve_manifest
from autopeft.data.manifest import REQUIRED_COLUMNS, ScanSummary, check_scans, read_manifest, read_scanner_profiles
from autopeft.data.simulator import builtin_data, simulate
from autopeft.data.splits import Protocol, scanners_in, split_scanner

if TYPE_CHECKING:  # pragma: no cover - static analysers see the loaders as plain re-exports
    from autopeft.data.loading import eval_volumes, load_volume, train_loader

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

# autopeft.data.loading imports torch: `python -c "import autopeft.data.loading"` takes 2.0 CPU-s
# against 0.42 for `import autopeft.data` without it (best of 5, 2-core CPU). `autopeft --help`
# (0.46 CPU-s) imports this package through cli/_common and needs no torch, nor does `autopeft data`;
# so these three names load it on first use (PEP 562). tests/data/test_package.py keeps it so.
_TORCH_NAMES = ("train_loader", "eval_volumes", "load_volume")


def __getattr__(name: str) -> Any:
    if name not in _TORCH_NAMES:
        raise AttributeError(f"module 'autopeft.data' has no attribute {name!r}")
    from autopeft.data import loading  # deferred: torch (see _TORCH_NAMES)

    return getattr(loading, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_TORCH_NAMES})
