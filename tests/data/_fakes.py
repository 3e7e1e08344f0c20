"""Tiny NIfTI scans and manifests for the data tests (kept out of conftest.py on purpose)."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE: tuple[int, int, int] = (12, 10, 8)
AFFINE: np.ndarray = np.array(
    [[2.0, 0.0, 0.0, -10.0], [0.0, 2.0, 0.0, -8.0], [0.0, 0.0, 2.5, -6.0], [0.0, 0.0, 0.0, 1.0]]
)


def write_volume(path: Path, voxels: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    """Saves ``voxels`` as NIfTI at ``path`` (parents created) and returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(voxels, dtype=np.float32), affine), str(path))
    return path


def random_volume(rng: np.random.Generator, shape: Sequence[int] = SHAPE) -> np.ndarray:
    """A positive, non-constant volume (like a PET image) of ``shape``."""
    return (rng.random(tuple(shape)) + 0.1).astype(np.float32)


def write_manifest(path: Path, rows: Sequence[Mapping[str, object]], header: Sequence[str] | None = None) -> Path:
    """Writes ``rows`` as a CSV manifest with ``header`` (default: the keys of the first row)."""
    header = list(header or rows[0].keys())
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: row.get(key, "") for key in header})
    return path


def make_dataset(
    root: Path,
    subjects_per_scanner: Mapping[str, int],
    *,
    shape: Sequence[int] = SHAPE,
    seed: int = 0,
    long_factor: float = 2.0,
    profiles: bool = False,
) -> Path:
    """Writes a small multi-scanner data set under ``root`` and returns its manifest path.

    Each long scan is ``long_factor`` times its short scan, so after per-volume scaling to [0, 1]
    a short crop and a long crop from the same place are identical. Paths in the manifest are
    relative to ``root``.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for scanner, count in subjects_per_scanner.items():
        for index in range(count):
            subject = f"sub-{scanner}{index:02d}"
            short = random_volume(rng, shape)
            short_rel = f"scanner{scanner}/{subject}_short.nii.gz"
            long_rel = f"scanner{scanner}/{subject}_long.nii.gz"
            write_volume(root / short_rel, short)
            write_volume(root / long_rel, long_factor * short)
            rows.append({"subject": subject, "scanner": scanner, "short": short_rel, "long": long_rel})
    if profiles:
        profile_of = {sid: {"name": f"Scanner {sid}", "matrix": list(shape)} for sid in subjects_per_scanner}
        (root / "scanners.json").write_text(json.dumps(profile_of))
    return write_manifest(root / "manifest.csv", rows)
