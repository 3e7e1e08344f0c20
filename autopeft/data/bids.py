"""Dynamic PET in BIDS: derive short and long scans (and a manifest) from 4D frames and sidecars.

A BIDS-PET dataset keeps each dynamic scan as ``sub-<label>[/ses-<label>]/pet/*_pet.nii.gz`` (4D,
frames along the 4th axis) with a ``_pet.json`` sidecar whose ``FrameTimesStart`` and
``FrameDuration`` (seconds) time every frame; ``ManufacturersModelName`` names the scanner. ADNI
converted by Clinica has the same layout (ADNI FDG: six 5-minute frames 30-60 min after injection).

:func:`derive_pairs` reads such a dataset with pybids and, for every scan, writes

- the *short* scan: the frames inside the short window, as their duration-weighted mean (one
  frame for a 5-minute window of 5-minute frames);
- the *long* scan: the duration-weighted mean of the frames inside the long window;

as 3D NIfTI on the scan's own grid (its affine and header), in one folder per scanner (its name
through ``autopeft._io.path_component``), plus ``manifest.csv`` and ``scanners.json`` (matrix,
spacing, model name and reconstruction per scanner), so that every other command takes the result
with ``--data``.

Windows are ``A-B`` in minutes from the start of the first frame (``reference="start"``, the
default) or after injection (``reference="injection"``: ``FrameTimesStart - InjectionStart``), or
``A-B`` frame numbers (``unit="frame"``, 1-based, inclusive). The frames inside a window must cover
it exactly (to half a second), without a gap.

Every problem of every file is collected and reported together, each naming the file and the field:
a 3D file, no sidecar, a missing or malformed timing field, durations (or starts) that do not match
the 4th dimension, frames that do not cover a window, a missing scanner name.

:func:`write_pet_scan` and :func:`write_dataset_files` write BIDS-PET (the simulator's ``--bids``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from autopeft import __version__
from autopeft._io import atomic_write, atomic_write_text, path_component, path_inside
from autopeft.data.manifest import natural_key, problems_message
from autopeft.errors import ConfigError, DataError

__all__ = ["Window", "parse_window", "derive_pairs", "write_pet_scan", "write_dataset_files", "BIDS_VERSION"]

BIDS_VERSION = "1.10.0"
# Frames count as inside a window, and a window as covered, to this tolerance (minutes): 0.5 s.
_TOLERANCE_MIN = 0.5 / 60.0
# BIDS entity short names (as in file names) -> pybids' names.
_ENTITIES = {"sub": "subject", "ses": "session", "trc": "tracer", "rec": "reconstruction", "acq": "acquisition", "run": "run"}
_RECON_FIELDS = ("ReconMethodName", "ReconMethodParameterLabels", "ReconMethodParameterUnits",
                 "ReconMethodParameterValues", "ReconFilterType", "ReconFilterSize", "AttenuationCorrection")


@dataclass(frozen=True)
class Window:
    """A time window ``start``-``end`` in minutes, or frame numbers ``start``-``end`` (1-based, inclusive).

    Args:
        start: first minute (or frame).
        end: last minute (or frame).
        unit: ``min`` or ``frame``. Defaults to ``min``.
    """

    start: float
    end: float
    unit: Literal["min", "frame"] = "min"

    def __str__(self) -> str:
        if self.unit == "frame":
            return f"frames {self.start:g}-{self.end:g}"
        return f"{self.start:g}-{self.end:g} min"


def parse_window(text: str, *, unit: str = "min", option: str = "--short") -> Window:
    """``"0-5"`` -> ``Window(0, 5)``; frame numbers with ``unit="frame"`` (``"1-6"``, or ``"1"``).

    Raises:
        ConfigError: not ``A-B`` with ``A < B`` (``A <= B`` for frames, which are integers >= 1).
    """
    if unit not in ("min", "frame"):
        raise ConfigError(f"--unit must be 'min' or 'frame', but got {unit!r}.")
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*(?:-\s*(\d+(?:\.\d*)?)\s*)?", str(text))
    example = "1-6 (frame numbers, 1-based)" if unit == "frame" else "0-5 (minutes)"
    if match is None or (match.group(2) is None and unit == "min"):
        raise ConfigError(f"{option} must be a range like {example}, but got {text!r}.")
    start = float(match.group(1))
    end = float(match.group(2)) if match.group(2) is not None else start
    if unit == "frame":
        if start != int(start) or end != int(end) or start < 1 or end < start:
            raise ConfigError(f"{option} must be frame numbers A-B with 1 <= A <= B, but got {text!r}.")
    elif end <= start:
        raise ConfigError(f"{option} must be a range A-B with A < B (minutes), but got {text!r}.")
    return Window(start, end, unit)  # type: ignore[arg-type]


def _numbers(metadata: Mapping[str, Any], field: str) -> np.ndarray | str:
    """A sidecar field as float array, or the reason it is unusable."""
    if field not in metadata:
        return "is missing"
    value = metadata[field]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return f"must be a list of numbers (seconds), but is {value!r}"
    if array.ndim != 1 or not np.all(np.isfinite(array)):
        return f"must be a list of numbers (seconds), but is {value!r}"
    return array


def _select(window: Window, starts: np.ndarray, ends: np.ndarray, origin: str) -> np.ndarray | str:
    """Indices of the frames inside ``window``, or why the frames do not cover it."""
    n = len(starts)
    if window.unit == "frame":
        if window.end > n:
            return f"asks for {window} but the scan has {n} frame(s)"
        return np.arange(int(window.start) - 1, int(window.end))
    inside = np.flatnonzero((starts >= window.start - _TOLERANCE_MIN) & (ends <= window.end + _TOLERANCE_MIN))
    frames = ", ".join(f"{s:g}-{e:g}" for s, e in zip(starts, ends))
    if inside.size == 0:
        return f"no frame lies inside {window} {origin} (frames, in minutes {origin}: {frames})"
    gaps = [i for a, i in zip(inside[:-1], inside[1:]) if abs(starts[i] - ends[a]) > _TOLERANCE_MIN]
    first, last = starts[inside[0]], ends[inside[-1]]
    if gaps or abs(first - window.start) > _TOLERANCE_MIN or abs(last - window.end) > _TOLERANCE_MIN:
        return (f"the frames inside {window} {origin} cover only {first:g}-{last:g} min"
                + (" with gaps" if gaps else "") + f" (frames: {frames}); choose a window on frame boundaries")
    return inside


def _weighted_mean(frames: np.ndarray, durations: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    weights = durations[chosen] / durations[chosen].sum()
    return np.tensordot(frames[..., chosen], weights.astype(np.float64), axes=([3], [0])).astype(np.float32)


@dataclass
class _Derived:
    """One usable dynamic scan and the frames its short and long scans average."""

    path: str
    entities: dict[str, Any]
    scanner: str
    metadata: dict[str, Any]
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    image: Any  # the 4D nibabel image, read again (voxels) when the pair is written
    durations: np.ndarray  # FrameDuration, seconds
    short_frames: np.ndarray  # 0-based frame indices
    long_frames: np.ndarray


def derive_pairs(
    bids_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    short: Window,
    long: Window,
    reference: Literal["start", "injection"] = "start",
    scanner_entity: str | None = None,
    progress: bool = True,
) -> Path:
    """Derives short/long scan pairs from a BIDS-PET dataset and writes a manifest for them.

    Args:
        bids_dir: the BIDS dataset's root (holding ``dataset_description.json``).
        out_dir: where the derived NIfTI, ``manifest.csv`` and ``scanners.json`` go (created; must
            not be ``bids_dir`` itself). Existing derived files are overwritten, inputs never.
        short: the short scan's window.
        long: the long scan's window.
        reference: minutes count from the start of the first frame (``start``) or from the
            injection (``injection``, using ``InjectionStart``). Defaults to ``start``.
        scanner_entity: a BIDS entity whose value names the scanner (e.g. ``rec``, ``acq``, ``ses``)
            instead of the sidecar's ``ManufacturersModelName``. Defaults to None.
        progress: show a progress bar. Defaults to True.

    Returns:
        Path of ``out_dir/manifest.csv``.

    Raises:
        DataError: listing every problem, each with its file and sidecar field.
    """
    root = Path(bids_dir).expanduser().resolve()
    out = Path(out_dir).expanduser().resolve()
    _check_arguments(bids_dir, out_dir, root, out, reference)
    if scanner_entity is not None:
        scanner_entity = _ENTITIES.get(scanner_entity, scanner_entity)
    files = _pet_files(bids_dir, root)

    problems: list[str] = []
    derived: list[_Derived] = []
    for file in tqdm(files, desc="deriving short/long scans", unit="scan", disable=not progress):
        item = _inspect_scan(file, root, short=short, long=long, reference=reference,
                             scanner_entity=scanner_entity, problems=problems)
        if item is not None:
            derived.append(item)
    if problems:
        raise DataError(problems_message(f"--bids {bids_dir} has {len(problems)} problem(s)", problems,
                                          "Fix these files or sidecars (or leave them out of the dataset) and run again."))
    return _write_pairs(derived, _subject_ids(derived, scanner_entity), root, out, scanner_entity)


# Reading: the dataset, then one scan at a time; each check adds its problems to `problems` ----------
def _check_arguments(bids_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], root: Path, out: Path,
                     reference: str) -> None:
    """Refuses a bad ``--from``, a folder that is not a BIDS dataset, and ``--out`` inside-out."""
    if reference not in ("start", "injection"):
        raise ConfigError(f"--from must be 'start' or 'injection', but got {reference!r}.")
    if not (root / "dataset_description.json").is_file():
        raise DataError(f"--bids {bids_dir}: no dataset_description.json in {root}; give the root folder of a BIDS dataset.")
    if out == root:
        raise ConfigError(f"--out {out_dir} is the BIDS dataset itself; derived scans go to another folder (e.g. {root}/derivatives/autopeft).")


def _pet_files(bids_dir: str | os.PathLike[str], root: Path) -> list[Any]:
    """The dataset's ``*_pet.nii[.gz]`` files (pybids ``BIDSFile`` objects)."""
    from bids import BIDSLayout  # deferred: pybids costs ~0.3 CPU-s to import, needed only here

    files = BIDSLayout(str(root), validate=False).get(suffix="pet", extension=[".nii.gz", ".nii"], datatype="pet")
    if not files:
        raise DataError(f"--bids {bids_dir}: no sub-*/[ses-*/]pet/*_pet.nii[.gz] file found in {root}.")
    return files


def _inspect_scan(file: Any, root: Path, *, short: Window, long: Window, reference: str,
                  scanner_entity: str | None, problems: list[str]) -> _Derived | None:
    """One dynamic scan checked and its short and long frames chosen.

    Args:
        file: the scan, a pybids ``BIDSFile``.
        root: the dataset's root (problems name the file relative to it).
        short, long, reference, scanner_entity: as for :func:`derive_pairs`.
        problems: every problem of the scan is added to it.

    Returns:
        The scan, or None when it has problems.
    """
    where = os.path.relpath(file.path, root)
    entities = file.get_entities()
    metadata = file.get_metadata() or {}
    image = _open_dynamic(file.path, where, metadata, problems)
    if image is None:
        return None
    own = len(problems)
    timing = _frame_timing(where, metadata, int(image.shape[3]), problems)
    scanner = _scanner_name(where, metadata, entities, scanner_entity, problems)
    offset = 0.0
    if reference == "injection" and not isinstance(timing["FrameTimesStart"], str):
        offset = _injection_start(where, metadata, problems)
    if len(problems) > own:
        return None
    starts_s, durations = timing["FrameTimesStart"], timing["FrameDuration"]
    if np.any(durations <= 0):
        problems.append(f"{where}: sidecar field FrameDuration must be positive, but is {durations.tolist()}")
        return None
    starts = (starts_s - (starts_s[0] if reference == "start" else offset)) / 60.0
    ends = starts + durations / 60.0
    origin = "after the first frame's start" if reference == "start" else "after injection"
    chosen = _frames_in_windows(where, {"short": short, "long": long}, starts, ends, origin, problems)
    if chosen is None:
        return None
    spacing = tuple(float(z) for z in image.header.get_zooms()[:3])
    return _Derived(file.path, entities, scanner, metadata, tuple(int(s) for s in image.shape[:3]), spacing, image,
                    durations, chosen["short"], chosen["long"])


def _open_dynamic(path: str, where: str, metadata: Mapping[str, Any], problems: list[str]) -> Any | None:
    """The 4D image at ``path`` (header only: voxels are read when the pair is written), or None
    when it has no sidecar, is unreadable or is not 4D."""
    sidecar = re.sub(r"\.nii(\.gz)?$", ".json", path)
    if not metadata and not os.path.isfile(sidecar):
        problems.append(f"{where}: no sidecar ({os.path.basename(sidecar)}); FrameTimesStart, FrameDuration and "
                        "ManufacturersModelName are read from it")
        return None
    try:
        image = nib.load(path)
    except Exception as err:  # noqa: BLE001 - any reader failure, said with its cause
        problems.append(f"{where}: cannot be read as NIfTI ({type(err).__name__}: {err})")
        return None
    if len(image.shape) != 4:
        problems.append(f"{where}: is {len(image.shape)}D with shape {tuple(image.shape)}; dynamic PET with its frames "
                        "along the 4th dimension is needed")
        return None
    return image


def _frame_timing(where: str, metadata: Mapping[str, Any], n_frames: int,
                  problems: list[str]) -> dict[str, np.ndarray | str]:
    """``FrameTimesStart`` and ``FrameDuration`` (seconds, one per frame), or why each is unusable."""
    timing = {field: _numbers(metadata, field) for field in ("FrameTimesStart", "FrameDuration")}
    for field, value in timing.items():
        if isinstance(value, str):
            problems.append(f"{where}: sidecar field {field} {value}")
        elif len(value) != n_frames:
            problems.append(f"{where}: sidecar field {field} has {len(value)} entries but the image has {n_frames} "
                            "frames (its 4th dimension)")
    return timing


def _scanner_name(where: str, metadata: Mapping[str, Any], entities: Mapping[str, Any], scanner_entity: str | None,
                  problems: list[str]) -> str:
    """The scanner: the sidecar's ``ManufacturersModelName``, or the value of ``scanner_entity``."""
    if scanner_entity is None:
        scanner = str(metadata.get("ManufacturersModelName", "")).strip()
        if not scanner:
            problems.append(f"{where}: sidecar field ManufacturersModelName is missing (it names the scanner; or pass "
                            "--scanner-entity ENTITY, e.g. rec or acq)")
        return scanner
    scanner = str(entities.get(scanner_entity, "")).strip()
    if not scanner:
        problems.append(f"{where}: has no BIDS entity {scanner_entity!r} (--scanner-entity); its entities are "
                        f"{', '.join(k for k in entities if k not in ('suffix', 'extension', 'datatype'))}")
    return scanner


def _injection_start(where: str, metadata: Mapping[str, Any], problems: list[str]) -> float:
    """``InjectionStart`` in seconds (for ``--from injection``); 0 with a problem when unusable."""
    injection = metadata.get("InjectionStart")
    if not isinstance(injection, (int, float)) or isinstance(injection, bool):
        problems.append(f"{where}: sidecar field InjectionStart is missing or not a number (seconds); it is needed "
                        "for --from injection")
        return 0.0
    return float(injection)


def _frames_in_windows(where: str, windows: Mapping[str, Window], starts: np.ndarray, ends: np.ndarray, origin: str,
                       problems: list[str]) -> dict[str, np.ndarray] | None:
    """Window name -> indices of the frames inside it; None when a window is not covered."""
    chosen = {}
    for name, window in windows.items():
        picked = _select(window, starts, ends, origin)
        if isinstance(picked, str):
            problems.append(f"{where}: {name} window: {picked} (sidecar fields FrameTimesStart, FrameDuration)")
        else:
            chosen[name] = picked
    return chosen if len(chosen) == len(windows) else None


# Writing: the derived pairs, manifest.csv and scanners.json ----------------------------------------
def _write_pairs(derived: Sequence[_Derived], subjects: Sequence[str], root: Path, out: Path,
                 scanner_entity: str | None) -> Path:
    """Writes every scan's short and long NIfTI (one folder per scanner), then the manifest and the
    scanner profiles; returns the manifest's path."""
    out.mkdir(parents=True, exist_ok=True)
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(["subject", "scanner", "short", "long", "bids_file", "short_frames", "long_frames"])
    for item, subject in zip(derived, subjects):
        frames = np.asarray(item.image.dataobj, dtype=np.float32)
        # Scanner names are sidecar text: a path component each (the manifest keeps the name itself).
        folder = path_inside(out, out / path_component(item.scanner), what="a scanner's folder of derived scans")
        folder.mkdir(exist_ok=True)
        names = []
        for kind, chosen in (("short", item.short_frames), ("long", item.long_frames)):
            target = path_inside(out, folder / f"{path_component(subject)}_{kind}.nii.gz", what="a derived scan")
            _save_3d(target, _weighted_mean(frames, item.durations, chosen), item.image)
            names.append(os.path.relpath(target, out))
        frame_numbers = ["+".join(str(i + 1) for i in chosen) for chosen in (item.short_frames, item.long_frames)]
        writer.writerow([subject, item.scanner, *names, os.path.relpath(item.path, root), *frame_numbers])
    atomic_write_text(out / "manifest.csv", rows.getvalue())
    atomic_write_text(out / "scanners.json", json.dumps(_profiles(derived, scanner_entity), indent=2) + "\n")
    return out / "manifest.csv"


def _subject_ids(items: Sequence[_Derived], scanner_entity: str | None) -> list[str]:
    """``sub-<label>``; when a subject has several scans on one scanner, followed by the entities
    that tell them apart (session, tracer, reconstruction, acquisition, run: ``sub-01_ses-2``)."""
    short_names = {"session": "ses", "tracer": "trc", "reconstruction": "rec", "acquisition": "acq", "run": "run"}
    groups: dict[tuple[str, str], list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault((str(item.entities["subject"]), item.scanner), []).append(index)
    ids = [f"sub-{item.entities['subject']}" for item in items]
    for members in groups.values():
        if len(members) < 2:
            continue
        varying = [e for e in short_names if e != scanner_entity
                   and len({str(items[i].entities.get(e, "")) for i in members}) > 1]
        for i in members:
            ids[i] += "".join(f"_{short_names[e]}-{items[i].entities[e]}" for e in varying if e in items[i].entities)
        if len({ids[i] for i in members}) < len(members):  # same entities (e.g. a copy): number them
            for k, i in enumerate(members):
                ids[i] += f"_{k + 1}"
    return ids


def _profiles(items: Sequence[_Derived], scanner_entity: str | None) -> dict[str, dict[str, Any]]:
    profiles: dict[str, dict[str, Any]] = {}
    for scanner in sorted({i.scanner for i in items}, key=natural_key):
        mine = [i for i in items if i.scanner == scanner]
        first = mine[0].metadata
        matrix = Counter(i.shape for i in mine).most_common(1)[0][0]
        spacing = Counter(i.spacing for i in mine).most_common(1)[0][0]
        profiles[scanner] = {
            "name": str(first.get("ManufacturersModelName", scanner)),
            "maker": str(first.get("Manufacturer", "")),
            "matrix": list(matrix),
            "spacing_mm": [round(s, 6) for s in spacing],
            "recon": {field: first[field] for field in _RECON_FIELDS if field in first},
            "subjects": len({i.entities.get("subject") for i in mine}),
            "scans": len(mine),
            "from": f"BIDS entity {scanner_entity}" if scanner_entity else "sidecar ManufacturersModelName",
        }
        if len({i.shape for i in mine}) > 1 or len({i.spacing for i in mine}) > 1:
            profiles[scanner]["note"] = "scans of this scanner differ in matrix or spacing; the most common is shown"
    return profiles


def _save_3d(path: Path, volume: np.ndarray, like) -> None:
    """``volume`` as NIfTI with the affine and header of the 4D image ``like`` (3D now)."""
    header = like.header.copy()
    image = nib.Nifti1Image(volume, like.affine, header=header)
    image.header.set_data_shape(volume.shape)
    image.header.set_data_dtype(np.float32)
    atomic_write(path, lambda tmp: nib.save(image, tmp), keep_suffix=True)


# Writing BIDS-PET ---------------------------------------------------------------------------------
def write_pet_scan(root: str | os.PathLike[str], relpath: str, frames: np.ndarray, affine: np.ndarray,
                   sidecar: Mapping[str, Any], frame_seconds: float) -> Path:
    """Writes one dynamic scan, ``frames`` (``X x Y x Z x T``), at ``root/relpath`` (a ``*_pet.nii.gz``
    path) with its ``_pet.json`` sidecar beside it; atomically (temporary name, then rename)."""
    path = Path(root) / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.asarray(frames, dtype=np.float32), affine)
    image.header.set_xyzt_units("mm", "sec")
    if image.ndim == 4:
        image.header.set_zooms((*image.header.get_zooms()[:3], float(frame_seconds)))
    image.set_sform(affine, code="scanner")
    image.set_qform(affine, code="scanner")
    atomic_write(path, lambda tmp: nib.save(image, tmp), keep_suffix=True)
    side = path.with_name(path.name.replace(".nii.gz", ".json"))
    atomic_write_text(side, json.dumps(dict(sidecar), indent=2, sort_keys=True) + "\n")
    return path


def write_dataset_files(root: str | os.PathLike[str], *, name: str, participants: Sequence[str], readme: str,
                        ignore: Sequence[str] = ()) -> None:
    """``dataset_description.json``, ``participants.tsv``, ``README`` and (for files beside the
    dataset that are not BIDS) ``.bidsignore``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    description = {"Name": name, "BIDSVersion": BIDS_VERSION, "DatasetType": "raw", "License": "CC0",
                   "GeneratedBy": [{"Name": "autopeft", "Version": __version__, "Description": "autopeft simulate --bids"}]}
    (root / "dataset_description.json").write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    (root / "participants.tsv").write_text("participant_id\n" + "".join(f"sub-{p}\n" for p in participants), encoding="utf-8")
    (root / "README").write_text(readme.rstrip() + "\n", encoding="utf-8")
    if ignore:
        (root / ".bidsignore").write_text("\n".join(ignore) + "\n", encoding="utf-8")
