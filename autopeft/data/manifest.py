"""Manifests of paired PET scans: read, validate, and check every file they name.

A manifest is a CSV file, ``manifest.csv``, with one row per scan pair: a subject's short scan
(e.g. the first 5-minute frame) and long scan (e.g. the 30-minute mean) from one scanner::

    subject,scanner,short,long
    sub-001,1,scanner1/sub-001_short.nii.gz,scanner1/sub-001_long.nii.gz
    sub-002,1,/data/adni/s002/frame1.nii.gz,/data/adni/s002/mean.nii.gz

- ``subject`` and ``scanner`` are identifiers, kept as strings (``1`` and ``01`` differ).
- ``short`` and ``long`` are NIfTI paths, relative to the manifest's folder or absolute.
- Extra columns are allowed and kept; only the four above must be filled in.
- A (subject, scanner) pair appears at most once.

An optional ``scanners.json`` beside the manifest maps scanner id -> profile (a JSON object such as
``{"name": ..., "matrix": [...], "spacing_mm": [...], "fwhm_mm": ...}``). When it is there, every
scanner id in the manifest must be one of its keys.

Errors name the manifest and the CSV line number as a text editor shows it (the header is line 1).
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from autopeft.errors import DataError

__all__ = [
    "REQUIRED_COLUMNS",
    "ScanSummary",
    "read_manifest",
    "read_scanner_profiles",
    "check_scans",
    "MANIFEST_NAME",
    "locate_manifest",
    "natural_key",
    "problems_message",
]

REQUIRED_COLUMNS: tuple[str, ...] = ("subject", "scanner", "short", "long")
"""The columns every manifest must have, in the order of the expected header."""

_SCAN_COLUMNS: tuple[str, str] = ("short", "long")
MANIFEST_NAME = "manifest.csv"
"""The manifest's file name inside a data folder."""
_PROFILES_NAME = "scanners.json"
_MAX_LISTED_PROBLEMS = 20
# Affines of a short/long pair must agree to this many millimetres: both come from one scanner's
# reconstruction grid, so any real difference is a mix-up, while float32 header rounding is not.
_AFFINE_ATOL_MM = 1e-3


@dataclass(frozen=True)
class ScanSummary:
    """What :func:`check_scans` learned about one row of a manifest.

    Args:
        line: CSV line number of the row (header is line 1).
        subject: subject id.
        scanner: scanner id.
        shape: voxel grid ``D x H x W`` shared by the short and long scans.
        spacing_mm: voxel size along each axis, from the NIfTI header.
        short_range: (min, max) intensity of the short scan.
        long_range: (min, max) intensity of the long scan.
    """

    line: int
    subject: str
    scanner: str
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    short_range: tuple[float, float]
    long_range: tuple[float, float]


def locate_manifest(path: str | os.PathLike[str]) -> Path:
    """The manifest file that ``path`` names, whether or not it exists.

    Args:
        path: a manifest CSV, or a folder (then its ``manifest.csv``).

    Returns:
        ``path`` itself, or ``path/manifest.csv`` when ``path`` is a folder; ``~`` expanded.
    """
    candidate = Path(path).expanduser()
    return candidate / MANIFEST_NAME if candidate.is_dir() else candidate


def _existing_manifest(path: str | os.PathLike[str]) -> Path:
    candidate = locate_manifest(path)
    if not candidate.is_file():
        raise DataError(
            f"manifest {candidate} does not exist. Give the path of a CSV file with the header "
            f"'{','.join(REQUIRED_COLUMNS)}' (or the folder holding {MANIFEST_NAME}); "
            "'autopeft simulate' writes one for the built-in data."
        )
    return candidate.resolve()


def _read_rows(manifest_path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Reads the CSV with the standard library so each row keeps its true line number.

    pandas renumbers rows and drops blank lines, which would make the line numbers in our errors
    disagree with what the user sees in an editor; ``csv.reader.line_num`` does not.
    """
    try:
        with manifest_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header: list[str] | None = None
            rows: list[tuple[int, list[str]]] = []
            for cells in reader:
                if not any(cell.strip() for cell in cells):
                    continue  # blank lines carry no row
                if header is None:
                    header = [cell.strip() for cell in cells]
                else:
                    rows.append((reader.line_num, [cell.strip() for cell in cells]))
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(
            f"manifest {manifest_path} is not a readable UTF-8 CSV file ({err}). Save it as plain "
            f"CSV with the header '{','.join(REQUIRED_COLUMNS)}'."
        ) from err
    if header is None:
        raise DataError(
            f"manifest {manifest_path} is empty. Its first line must be the header "
            f"'{','.join(REQUIRED_COLUMNS)}', followed by one row per scan pair."
        )
    return header, rows


def _check_header(manifest_path: Path, header: list[str]) -> None:
    missing = [name for name in REQUIRED_COLUMNS if name not in header]
    if missing:
        raise DataError(
            f"manifest {manifest_path} lacks the column(s) {', '.join(missing)} (its header is "
            f"'{','.join(header)}'). The header must contain '{','.join(REQUIRED_COLUMNS)}'; "
            "extra columns are allowed."
        )
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise DataError(
            f"manifest {manifest_path} has the column(s) {', '.join(repeated)} more than once in its "
            "header. Give every column a distinct name."
        )


def _check_cells(manifest_path: Path, header: list[str], rows: list[tuple[int, list[str]]]) -> None:
    problems: list[str] = []
    for line, cells in rows:
        if len(cells) > len(header):
            problems.append(f"line {line} has {len(cells)} cells but the header has {len(header)}")
            continue
        padded = cells + [""] * (len(header) - len(cells))
        empty = [name for name in REQUIRED_COLUMNS if not padded[header.index(name)]]
        if empty:
            problems.append(f"line {line} has no value in column(s) {', '.join(empty)}")
    if problems:
        raise DataError(
            problems_message(
                f"manifest {manifest_path}",
                problems,
                "Every row needs a subject, a scanner id and the short and long scan paths.",
            )
        )


def _check_duplicates(manifest_path: Path, frame: pd.DataFrame) -> None:
    duplicated = frame[frame.duplicated(subset=["subject", "scanner"], keep=False)]
    if duplicated.empty:
        return
    problems = [
        f"subject {subject!r} on scanner {scanner!r} appears on lines "
        + ", ".join(str(line) for line in group.index)
        for (subject, scanner), group in duplicated.groupby(["subject", "scanner"], sort=True)
    ]
    raise DataError(
        problems_message(
            f"manifest {manifest_path}", problems, "Keep one row per subject and scanner (one short/long pair each)."
        )
    )


def _absolute(base: Path, raw: str) -> str:
    candidate = Path(raw).expanduser()
    if not candidate.is_absolute():
        candidate = base / candidate
    # normpath, not resolve(): keeps symlinked data folders as the user named them.
    return os.path.normpath(candidate)


def read_manifest(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Reads and validates a manifest of paired scans.

    Checks the file exists, the header has the columns ``subject,scanner,short,long`` (extra ones
    are kept), no required cell is empty and no (subject, scanner) pair repeats. It does not open
    the scans: :func:`check_scans` does.

    Args:
        path: the manifest CSV, or a folder holding ``manifest.csv``.

    Returns:
        One row per scan pair, every cell a string. The index is the CSV line number of the row (the
        header is line 1), so messages can point at it. ``short`` and ``long`` are absolute paths.
        ``frame.attrs["manifest"]`` holds the manifest's absolute path.

    Raises:
        DataError: the file is missing or malformed; the message names the line and the fix.

    Example:
        >>> frame = read_manifest("data/sim/manifest.csv")  # doctest: +SKIP
        >>> sorted(frame["scanner"].unique())  # doctest: +SKIP
        ['1', '2', '3', '4', '5']
    """
    manifest_path = _existing_manifest(path)
    header, rows = _read_rows(manifest_path)
    _check_header(manifest_path, header)
    if not rows:
        raise DataError(
            f"manifest {manifest_path} has a header but no rows. Add one row per scan pair: "
            "subject,scanner,short,long."
        )
    _check_cells(manifest_path, header, rows)
    records = [dict(zip(header, cells + [""] * (len(header) - len(cells)))) for _, cells in rows]
    frame = pd.DataFrame.from_records(records, columns=header, index=[line for line, _ in rows])
    frame = frame.astype(str)
    frame.index.name = "line"
    _check_duplicates(manifest_path, frame)
    base = manifest_path.parent
    for column in _SCAN_COLUMNS:
        frame[column] = [_absolute(base, raw) for raw in frame[column]]
    frame.attrs["manifest"] = str(manifest_path)
    return frame


def read_scanner_profiles(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]] | None:
    """Reads the ``scanners.json`` that sits beside a manifest, if there is one.

    Args:
        path: the manifest CSV (or its folder), or the JSON file itself.

    Returns:
        Scanner id -> profile dict, or None when no ``scanners.json`` is there.

    Raises:
        DataError: the file is not a JSON object of objects.
    """
    candidate = Path(path).expanduser()
    if candidate.suffix.lower() != ".json":
        candidate = (candidate if candidate.is_dir() else candidate.parent) / _PROFILES_NAME
    if not candidate.is_file():
        return None
    try:
        profiles = json.loads(candidate.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"scanner profiles {candidate} are not valid JSON ({err}). Fix or remove the file.") from err
    if not isinstance(profiles, dict) or not all(isinstance(v, dict) for v in profiles.values()):
        raise DataError(
            f"scanner profiles {candidate} must be a JSON object mapping scanner id -> profile object, "
            'e.g. {"1": {"name": "Biograph", "spacing_mm": [2, 2, 2]}}. Fix or remove the file.'
        )
    return {str(key): value for key, value in profiles.items()}


def problems_message(prefix: str, problems: list[str], advice: str) -> str:
    """``prefix: problem. advice`` for one problem; an indented list (cut after a few) for several."""
    if len(problems) == 1:
        return f"{prefix}: {problems[0]}. {advice}"
    listed = problems[:_MAX_LISTED_PROBLEMS]
    more = [f"... and {len(problems) - len(listed)} more"] if len(problems) > len(listed) else []
    return f"{prefix}:" + "".join(f"\n  - {problem}" for problem in listed + more) + f"\n{advice}"


@dataclass(frozen=True)
class _Scan:
    """One opened scan file, or the reason it could not be used."""

    shape: tuple[int, ...] = ()
    affine: np.ndarray | None = None
    spacing_mm: tuple[float, ...] = ()
    value_range: tuple[float, float] = (0.0, 0.0)
    problem: str | None = None


def _open_scan(path: str) -> _Scan:
    """Opens one NIfTI with nibabel and checks its voxels; never raises for a bad file."""
    import nibabel as nib  # deferred: keeps `import autopeft.data.manifest` light for the CLI

    if not os.path.isfile(path):
        return _Scan(problem="does not exist")
    try:
        image = nib.load(path)
        shape = tuple(int(size) for size in image.shape)
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]  # a single-frame 4D image is read as 3D, as the MONAI loader does
        if len(shape) != 3:
            return _Scan(problem=f"is {len(image.shape)}D with shape {tuple(image.shape)}; a 3D volume is needed")
        voxels = np.asarray(image.dataobj, dtype=np.float32).reshape(shape)
        affine = np.asarray(image.affine, dtype=np.float64)
        spacing = tuple(float(size) for size in image.header.get_zooms()[:3])
    except Exception as err:  # noqa: BLE001 - any reader failure means "unreadable", said with its cause
        return _Scan(problem=f"cannot be read as NIfTI ({type(err).__name__}: {err})")
    finite = np.isfinite(voxels)
    if not finite.all():
        bad = int(voxels.size - np.count_nonzero(finite))
        return _Scan(problem=f"has {bad} NaN/Inf voxel(s)")
    low, high = float(voxels.min()), float(voxels.max())
    if high == low:
        what = "all voxels are zero" if high == 0 else f"all voxels equal {high:g}"
        return _Scan(problem=f"is a constant volume ({what}), so it holds no image")
    return _Scan(shape=shape, affine=affine, spacing_mm=spacing, value_range=(low, high))


def _allowed_scanners(manifest_path: str, scanners: Iterable[Any] | None) -> tuple[set[str] | None, str]:
    if scanners is not None:
        return {str(scanner) for scanner in scanners}, "the scanners given"
    profiles = read_scanner_profiles(manifest_path) if manifest_path else None
    if profiles is None:
        return None, ""
    return set(profiles), f"{Path(manifest_path).parent / _PROFILES_NAME}"


def check_scans(
    manifest: pd.DataFrame | str | os.PathLike[str],
    *,
    scanners: Iterable[Any] | None = None,
    max_workers: int = 4,
) -> list[ScanSummary]:
    """Opens every scan of a manifest and checks it can be trained on.

    Each file is read whole with nibabel (header and voxels). A 4D image whose 4th axis has length 1
    is accepted as the 3D volume it holds (the loader squeezes it the same way). Problems found:
    a missing or unreadable file; a volume that is not 3D; NaN or Inf voxels; a constant (e.g.
    all-zero) volume; short and long scans of a row with different shapes or affines; a scanner id
    that is not allowed. Nothing is skipped: every problem of every row is collected and reported
    together.

    Args:
        manifest: a frame from :func:`read_manifest`, or the path of a manifest to read.
        scanners: the allowed scanner ids. Defaults to the keys of ``scanners.json`` beside the
            manifest when that file exists, else any id.
        max_workers: files read at once; reading is mostly decompression, which frees the GIL.
            Defaults to 4.

    Returns:
        One summary per row, in manifest order.

    Raises:
        DataError: naming the manifest, line, column and file of each problem.
    """
    if max_workers < 1:
        raise ValueError(f"`max_workers` must be a positive integer, but got {max_workers}.")
    frame = manifest if isinstance(manifest, pd.DataFrame) else read_manifest(manifest)
    manifest_path = str(frame.attrs.get("manifest", ""))
    where = f"manifest {manifest_path or '(in memory)'}"
    allowed, allowed_source = _allowed_scanners(manifest_path, scanners)

    paths = sorted({path for column in _SCAN_COLUMNS for path in frame[column]})
    with ThreadPoolExecutor(max_workers=min(max_workers, max(1, len(paths)))) as pool:
        opened = dict(zip(paths, pool.map(_open_scan, paths)))

    problems = _unknown_scanner_problems(frame, allowed, allowed_source)
    summaries: list[ScanSummary] = []
    for line, row in frame.iterrows():
        row_problems = _pair_problems(line, row, opened)
        if row_problems or (allowed is not None and str(row["scanner"]) not in allowed):
            problems.extend(row_problems)
            continue
        short, long = opened[row["short"]], opened[row["long"]]
        summaries.append(
            ScanSummary(
                line=int(line),
                subject=str(row["subject"]),
                scanner=str(row["scanner"]),
                shape=tuple(short.shape),  # type: ignore[arg-type]
                spacing_mm=tuple(short.spacing_mm),  # type: ignore[arg-type]
                short_range=short.value_range,
                long_range=long.value_range,
            )
        )
    if problems:
        raise DataError(
            problems_message(
                f"{where} has {len(problems)} problem(s)",
                problems,
                "Fix or remove these rows, then run 'autopeft data --manifest ...' again.",
            )
        )
    return summaries


def _unknown_scanner_problems(frame: pd.DataFrame, allowed: set[str] | None, allowed_source: str) -> list[str]:
    """One problem per scanner id outside ``allowed``, naming every line that uses it."""
    if allowed is None:
        return []
    known = ", ".join(sorted(allowed, key=natural_key)) or "none"
    problems = []
    for scanner, rows in frame[~frame["scanner"].isin(allowed)].groupby("scanner", sort=False):
        lines = ", ".join(str(line) for line in rows.index)
        problems.append(
            f"line{'s' if len(rows) > 1 else ''} {lines}, column scanner: unknown scanner {scanner!r} "
            f"(known in {allowed_source}: {known})"
        )
    return problems


def _pair_problems(line: Any, row: pd.Series, opened: dict[str, _Scan]) -> list[str]:
    """A row's problems: each scan's own (unreadable, not 3D, NaN, constant), then whether the short
    and long scans share one voxel grid (shape and affine)."""
    problems = [f"line {line}, column {column}: {row[column]} {opened[row[column]].problem}"
                for column in _SCAN_COLUMNS if opened[row[column]].problem is not None]
    short, long = opened[row["short"]], opened[row["long"]]
    if short.problem is not None or long.problem is not None:
        return problems
    if short.shape != long.shape:
        problems.append(
            f"line {line}: short scan {row['short']} has shape {short.shape} but long scan "
            f"{row['long']} has shape {long.shape}; a pair must share one voxel grid"
        )
    elif not np.allclose(short.affine, long.affine, rtol=0.0, atol=_AFFINE_ATOL_MM):
        problems.append(
            f"line {line}: short scan {row['short']} and long scan {row['long']} have different "
            "affines (voxel-to-world matrices); a pair must share one voxel grid"
        )
    return problems


def natural_key(text: str) -> tuple[Any, ...]:
    """Sort key putting '2' before '10' (scanner ids are strings but often numbers)."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))
