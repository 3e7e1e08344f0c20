"""Which data a command uses: the manifest that ``--data`` names, or the built-in simulated set.

This sits above :mod:`autopeft.data.manifest` (reading manifests) and
:mod:`autopeft.data.simulator` (making the built-in set) so that neither needs to know the other.
"""

from __future__ import annotations

import os
from pathlib import Path

from autopeft.data.manifest import MANIFEST_NAME, locate_manifest
from autopeft.data.simulator import builtin_data
from autopeft.errors import DataError

__all__ = ["resolve_manifest"]


def resolve_manifest(data: str | os.PathLike[str] | None, *, progress: bool = True) -> Path:
    """The manifest a command reads: the one ``--data`` names, or the built-in data set's.

    Args:
        data: the value of ``--data``: a folder holding ``manifest.csv``, or the CSV itself; None
            for the built-in simulated data (simulated into the cache on first use).
        progress: show a progress bar while the built-in data is simulated. Defaults to True.

    Returns:
        The absolute path of the manifest CSV.

    Raises:
        DataError: ``data`` names no manifest.
    """
    if data is None:
        return builtin_data(progress=progress)
    candidate = locate_manifest(data)
    if not candidate.is_file():
        raise DataError(
            f"--data {data}: no manifest found at {candidate}. Pass a directory holding {MANIFEST_NAME} or "
            "the CSV itself, or leave --data out to use the built-in simulated data."
        )
    return candidate.resolve()
