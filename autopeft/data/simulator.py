"""The built-in multi-scanner 18F-FDG brain PET data set: short and long scans from five scanners.

Each scanner scans its own subjects (as each ADNI site does). For every subject the simulator
draws an anatomy from the MNI152 tissue maps (:mod:`autopeft.data._sim_phantom`), blurs it with the
scanner's resolution, forward-projects it through a head attenuation map, adds a flat randoms +
scatter background, draws Poisson counts for six 5-minute frames (30-60 min after injection, with
F-18 decay between frames), reconstructs every frame with OSEM and the scanner's post-filter, and
writes the first frame as the short scan and the mean of the six as the long scan, as ADNI builds
them. Scanner grids, resolutions and counts are in :mod:`autopeft.data.scanners`.

Output directory::

    manifest.csv        subject,scanner,short,long (paths relative to the directory)
    scanners.json       scanner id -> profile (simulated and native grid, resolution, recon, ...)
    summary.json        realism figures per scanner (PSNR of short and long, grey:white ratio)
    scanner<k>/<subject>_{short,long}.nii.gz   float32 NIfTI on the scanner's own grid
    .simulation.json    the arguments and whether the run completed (the cache key)

Runs are deterministic (same arguments, same bytes), cached (a finished directory is returned at
once) and resumable (an interrupted run redoes only the scans it had not finished).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from autopeft._io import PARTIAL_PREFIX, atomic_write, atomic_write_text, cache_root
from autopeft.data.scanners import SCANNERS, SimulatedScanner
from autopeft.errors import ConfigError

# `import autopeft.data` imports this module (for builtin_data), and `autopeft --help` imports
# autopeft.data; so what only a simulation needs is imported where it is used ("deferred"):
# the phantom (torch: 2.3 against 0.42 CPU-s), nibabel (0.15 s), the projector (scipy.sparse), tqdm
# and bids.py (nibabel again).
if TYPE_CHECKING:
    from autopeft.data._projector import ParallelBeamProjector

__all__ = ["simulate", "builtin_data", "is_simulated", "MANIFEST_COLUMNS"]

MANIFEST_COLUMNS = ("subject", "scanner", "short", "long")

# Bump when a change alters the simulated data: it is part of the cache key.
_SIMULATOR_VERSION = 1
_STATE_FILE = ".simulation.json"
_PROGRESS_DIR = ".progress"
_MIN_SIZE, _MAX_SIZE = 16, 192
_MAX_SUBJECTS = 1000

_FRAMES = 6
_FRAME_MINUTES = 5.0
_FIRST_FRAME_START_MIN = 30.0
_F18_HALF_LIFE_MIN = 109.77


@dataclass(frozen=True)
class _Request:
    subjects: int
    size: int
    seed: int
    scanners: tuple[str, ...]
    bids: bool = False

    def key(self) -> dict[str, Any]:
        key = {
            "simulator_version": _SIMULATOR_VERSION,
            "subjects": self.subjects,
            "size": self.size,
            "seed": self.seed,
            "scanners": list(self.scanners),
        }
        return {**key, "bids": True} if self.bids else key

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.key(), sort_keys=True).encode()).hexdigest()[:12]


def _check_request(
    subjects: int, size: int, seed: int, scanners: Iterable[str] | str
) -> _Request:
    if isinstance(subjects, bool) or not isinstance(subjects, int) or not 1 <= subjects <= _MAX_SUBJECTS:
        raise ConfigError(f"`subjects` must be an integer from 1 to {_MAX_SUBJECTS}, but got {subjects!r}.")
    if isinstance(size, bool) or not isinstance(size, int) or not _MIN_SIZE <= size <= _MAX_SIZE:
        raise ConfigError(
            f"`size` must be an integer from {_MIN_SIZE} to {_MAX_SIZE} (the in-plane matrix of "
            f"scanner 1; 64 is the default), but got {size!r}."
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError(f"`seed` must be an integer from 0 to 2**32 - 1, but got {seed!r}.")
    if isinstance(scanners, str):
        scanners = scanners.split(",")
    ids = [str(s).strip() for s in scanners]
    unknown = [s for s in ids if s not in SCANNERS]
    if unknown or not ids:
        raise ConfigError(
            f"`scanners` must be ids among {', '.join(SCANNERS)} (comma-separated), but got "
            f"{','.join(ids) or 'nothing'}."
        )
    return _Request(subjects, size, seed, tuple(sorted(set(ids), key=int)))


def _subject_id(scanner_id: str, index: int) -> str:
    return f"s{scanner_id}-{index + 1:03d}"


def _scan_paths(scanner_id: str, subject: str) -> tuple[str, str]:
    folder = f"scanner{scanner_id}"
    return f"{folder}/{subject}_short.nii.gz", f"{folder}/{subject}_long.nii.gz"


def _dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def _write_nifti(path: Path, volume: np.ndarray, affine: np.ndarray, description: str) -> None:
    import nibabel as nib  # deferred: simulation only (see the imports)

    image = nib.Nifti1Image(volume.astype(np.float32), affine)
    image.header.set_xyzt_units("mm")
    # The data lie in MNI152 space (the phantom is built there).
    image.set_sform(affine, code="mni")
    image.set_qform(affine, code="mni")
    image.header["descrip"] = description.encode()[:79]
    atomic_write(path, lambda tmp: nib.save(image, tmp), keep_suffix=True)  # nibabel reads the format from the name


def _frame_decay() -> np.ndarray:
    """Mean F-18 decay over each frame, relative to the first frame: ``F``."""
    rate = math.log(2.0) / _F18_HALF_LIFE_MIN
    starts = _FIRST_FRAME_START_MIN + _FRAME_MINUTES * np.arange(_FRAMES)
    mean = (np.exp(-rate * starts) - np.exp(-rate * (starts + _FRAME_MINUTES))) / (rate * _FRAME_MINUTES)
    return mean / mean[0]


@dataclass(frozen=True)
class _Scan:
    short: np.ndarray
    long: np.ndarray
    metrics: dict[str, float]
    frames: np.ndarray | None = None  # x x y x z x frames, post-filtered (for --bids)


def _psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB with data range = reference max, over the whole volume.

    The same figure as ``monai.metrics.PSNRMetric(max_val=reference.max())``, written out because
    importing MONAI costs ~10 s on a 2-core CPU, a tenth of a default simulation.
    """
    error = image.astype(np.float64) - reference.astype(np.float64)
    mse = float(np.mean(error**2))
    return 10.0 * math.log10(float(reference.max()) ** 2 / max(mse, 1e-30))


def _grey_white_uptake(image: np.ndarray, tissue_maps: list[np.ndarray]) -> float:
    """Grey:white uptake ratio corrected for partial volume by the geometric transfer matrix idea.

    The image is fitted in least squares as a sum of the grey-matter, white-matter and remaining
    activity maps, each blurred to the image's resolution; the ratio of the grey and white
    coefficients is the uptake ratio the image implies (4 x the subject's regional cortical factor
    for a perfect image), free of the partial-volume loss that heavy blurring causes.

    Args:
        image: ``x x y x z`` image.
        tissue_maps: [grey, white, other activity], each ``x x y x z`` and at the image's resolution.
    """
    design = np.stack([m.ravel() for m in tissue_maps], axis=1).astype(np.float64)
    coef, *_ = np.linalg.lstsq(design, image.ravel().astype(np.float64), rcond=None)
    return float(coef[0] / coef[1]) if coef[1] > 0 else float("nan")


def _simulate_scan(
    scanner: SimulatedScanner, projector: ParallelBeamProjector, seed_sequence: np.random.SeedSequence
) -> _Scan:
    """Simulates one subject on one scanner: six noisy frames, reconstructed, and their figures."""
    from scipy import ndimage  # deferred: simulation only (see the imports)

    from autopeft.data._projector import osem  # deferred: simulation only (see the imports)
    from autopeft.data._sim_phantom import make_subject, to_scanner_grid  # deferred: simulation only (see the imports)

    anatomy_seed, noise_seed = seed_sequence.spawn(2)
    subject = make_subject(np.random.default_rng(anatomy_seed))

    def on_grid(volume: np.ndarray, fwhm: tuple[float, float, float] | None) -> np.ndarray:
        return to_scanner_grid(volume, subject.affine, scanner, fwhm)

    emission = on_grid(subject.activity, scanner.fwhm_mm)
    reference = on_grid(subject.activity, scanner.resolution_fwhm_mm)
    attenuation_map = on_grid(subject.attenuation, None)
    nx, ny, nz = scanner.matrix
    n_pixels = nx * ny

    attenuation = np.exp(-projector.forward(attenuation_map.reshape(n_pixels, nz)))  # R x Z
    trues_shape = attenuation * projector.forward(emission.reshape(n_pixels, nz))
    # Counts per unit activity, set so that the first frame holds counts_per_frame x uptake trues
    # (the count level follows the subject's uptake; head size is not modelled to change it).
    counts_per_activity = scanner.counts_per_frame * subject.uptake / float(trues_shape.sum())
    plane_weights = (counts_per_activity * attenuation).astype(np.float32)
    decay = _frame_decay()
    mean_trues = counts_per_activity * float(trues_shape.sum()) / trues_shape.size * decay
    background = scanner.profile.background_fraction * mean_trues  # F, flat over the sinogram
    expected = (
        (counts_per_activity * trues_shape)[:, None, :] * decay[None, :, None]
        + background[None, :, None]
    )
    counts = np.random.default_rng(noise_seed).poisson(expected).astype(np.float32)

    frames = osem(projector, counts, plane_weights, decay, background, scanner.iterations)
    frames = frames.reshape(nx, ny, _FRAMES, nz)
    sigma = scanner.sigma_voxels(scanner.postfilter_fwhm_mm)

    def postfilter(volume: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(volume, sigma, mode="constant", truncate=3.0).astype(np.float32)

    short = postfilter(frames[:, :, 0, :])
    long = postfilter(frames.mean(axis=2))
    resolution = scanner.resolution_fwhm_mm
    tissue_maps = [on_grid(m, resolution) for m in (subject.grey, subject.white, subject.other_activity)]
    metrics = {
        "psnr_short_db": _psnr(short, reference),
        "psnr_long_db": _psnr(long, reference),
        "grey_white_long": _grey_white_uptake(long, tissue_maps),
        "grey_white_reference": _grey_white_uptake(reference, tissue_maps),
        "uptake": subject.uptake,
        "hypometabolism": subject.hypometabolism,
        "trues_first_frame": float(counts_per_activity * trues_shape.sum()),
    }
    framewise = np.stack([postfilter(frames[:, :, k, :]) for k in range(_FRAMES)], axis=-1)
    return _Scan(short, long, metrics, framewise)


def _summary(request: _Request, metrics: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    per_scanner: dict[str, Any] = {}
    for scanner_id, rows in metrics.items():
        scanner = SCANNERS[scanner_id].at_size(request.size)

        def mean(name: str) -> float:
            return round(float(np.mean([row[name] for row in rows])), 3)

        per_scanner[scanner_id] = {
            "name": scanner.profile.name,
            "scans": len(rows),
            "psnr_short_db": mean("psnr_short_db"),
            "psnr_long_db": mean("psnr_long_db"),
            "psnr_gain_db": round(mean("psnr_long_db") - mean("psnr_short_db"), 3),
            "grey_white_long": mean("grey_white_long"),
            "grey_white_reference": mean("grey_white_reference"),
            "resolution_fwhm_mm": [round(f, 2) for f in scanner.resolution_fwhm_mm],
            "spacing_mm": [round(s, 3) for s in scanner.spacing_mm],
            "mean_trues_first_frame": round(mean("trues_first_frame")),
        }
    return {
        "definition": (
            "PSNR in dB over the whole volume of the short (first 5-min frame) and long (mean of "
            "six frames) scans against the noise-free activity blurred to the scanner's image "
            "resolution (system FWHM and post-filter in quadrature) and sampled on its grid; data "
            "range = max of that reference; images unscaled (SUV-like units). grey_white = grey "
            "over white uptake from a least-squares fit of the image by the grey, white and "
            "remaining activity maps blurred to the same resolution (partial-volume corrected, "
            "geometric-transfer-matrix style; the phantom's value is 4 x its cortical variation). "
            "Means over subjects."
        ),
        "arguments": request.key(),
        "scanners": per_scanner,
    }


def _read_state(out_dir: Path) -> dict[str, Any] | None:
    state_path = out_dir / _STATE_FILE
    if not state_path.is_file():
        return None
    return json.loads(state_path.read_text(encoding="utf-8"))


def _is_complete(out_dir: Path, state: dict[str, Any]) -> bool:
    """The run finished and every file its manifest names is still there (a few stat calls)."""
    manifest = out_dir / "manifest.csv"
    if not state.get("complete") or not manifest.is_file():
        return False
    with open(manifest, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return all((out_dir / row[column]).is_file() for row in rows for column in ("short", "long"))


def _prepare_directory(out_dir: Path, request: _Request) -> bool:
    """Checks ``out_dir`` against the request; returns True when it already holds the finished set."""
    state = _read_state(out_dir)
    if state is not None:
        if state.get("key") != request.key():
            raise ConfigError(
                f"{out_dir} already holds a simulation made with other arguments "
                f"({state.get('key')}); pass the same arguments to reuse it, or choose another "
                f"--out (or delete that directory) to simulate {request.key()}."
            )
        return _is_complete(out_dir, state)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(
            f"{out_dir} is not empty and holds no simulation of autopeft: choose an empty or new "
            f"directory for --out."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / _STATE_FILE, _dump({"key": request.key(), "complete": False}))
    return False


def _scan_is_done(out_dir: Path, scanner_id: str, subject: str, bids: bool = False) -> bool:
    short, long = _scan_paths(scanner_id, subject)
    progress = out_dir / _PROGRESS_DIR / f"{subject}.json"
    done = progress.is_file() and (out_dir / short).is_file() and (out_dir / long).is_file()
    return done and (not bids or (out_dir / _bids_path(scanner_id, subject)).is_file())


def _bids_path(scanner_id: str, subject: str) -> str:
    """BIDS-PET path of a simulated scan: one session per scanner (``ses-scanner<k>``)."""
    label, session = subject.replace("-", ""), f"scanner{scanner_id}"
    return f"sub-{label}/ses-{session}/pet/sub-{label}_ses-{session}_trc-FDG_pet.nii.gz"


def _bids_sidecar(grid: SimulatedScanner) -> dict[str, Any]:
    """The ``_pet.json`` sidecar of a simulated scan (times in seconds from injection)."""
    p = grid.profile
    recon = grid.to_dict()["recon"]
    return {
        "Manufacturer": p.maker, "ManufacturersModelName": p.name, "Units": "Bq/mL",
        "BodyPart": "Brain", "TracerName": "FDG", "TracerRadionuclide": "F18", "ModeOfAdministration": "bolus",
        "InjectedRadioactivity": 185, "InjectedRadioactivityUnits": "MBq", "InjectedMass": "n/a",
        "InjectedMassUnits": "n/a", "SpecificRadioactivity": "n/a", "SpecificRadioactivityUnits": "n/a",
        "TimeZero": "00:00:00", "ScanStart": _FIRST_FRAME_START_MIN * 60.0, "InjectionStart": 0.0,
        "FrameTimesStart": [(_FIRST_FRAME_START_MIN + k * _FRAME_MINUTES) * 60.0 for k in range(_FRAMES)],
        "FrameDuration": [_FRAME_MINUTES * 60.0] * _FRAMES, "AcquisitionMode": "list mode",
        "ImageDecayCorrected": True, "ImageDecayCorrectionTime": _FIRST_FRAME_START_MIN * 60.0,
        "ReconMethodName": recon["algorithm"], "ReconMethodParameterLabels": ["subsets", "iterations"],
        "ReconMethodParameterUnits": ["none", "none"], "ReconMethodParameterValues": [recon["subsets"], recon["iterations"]],
        "ReconFilterType": "Gaussian", "ReconFilterSize": recon["postfilter_fwhm_mm"], "AttenuationCorrection": "head model",
        "ScatterFraction": 100.0 * p.background_fraction / (1.0 + p.background_fraction),
        "Description": f"autopeft simulation of scanner {p.scanner_id} ({p.name}); image values are simulated (SUV-like scale)",
    }


def is_simulated(
    out_dir: str | os.PathLike[str],
    *,
    subjects: int = 16,
    size: int = 64,
    seed: int = 0,
    scanners: Sequence[str] | str = tuple(SCANNERS),
    bids: bool = False,
) -> bool:
    """Whether ``out_dir`` already holds the finished simulation for these arguments.

    Args:
        out_dir: the output directory.
        subjects, size, seed, scanners: as for :func:`simulate`.

    Returns:
        True when :func:`simulate` would return at once.
    """
    request = replace(_check_request(subjects, size, seed, scanners), bids=bids)
    state = _read_state(Path(out_dir))
    return state is not None and state.get("key") == request.key() and _is_complete(Path(out_dir), state)


def simulate(
    out_dir: str | os.PathLike[str],
    *,
    subjects: int = 16,
    size: int = 64,
    seed: int = 0,
    scanners: Sequence[str] | str = tuple(SCANNERS),
    progress: bool = True,
    bids: bool = False,
) -> Path:
    """Simulates short and long 18F-FDG brain scans of different subjects on several scanners.

    Args:
        out_dir: output directory: new, empty, or one this function filled with the same
            arguments (then nothing is redone; an interrupted run resumes).
        subjects: subjects per scanner (each scanner has its own). Defaults to 16.
        size: in-plane matrix of scanner 1; every scanner is scaled by the same factor (see
            :meth:`autopeft.data.scanners.ScannerProfile.at_size`). Defaults to 64.
        seed: seed of all random draws. Defaults to 0.
        scanners: scanner ids ("1".."5"), as a sequence or comma-separated. Defaults to all five.
        progress: show a progress bar. Defaults to True.
        bids: also write ``out_dir`` as a BIDS-PET dataset: every scan's six frames as 4D
            ``sub-<id>/ses-scanner<k>/pet/*_pet.nii.gz`` with its ``_pet.json`` sidecar (one session
            per scanner), ``dataset_description.json``, ``participants.tsv``, and a ``.bidsignore``
            for the files above. Defaults to False.

    Returns:
        Path of ``out_dir/manifest.csv``.

    Raises:
        ConfigError: a bad argument, or ``out_dir`` holds something else.

    >>> manifest = simulate("/tmp/sim", subjects=2, size=24, progress=False)  # doctest: +SKIP
    """
    request = replace(_check_request(subjects, size, seed, scanners), bids=bids)
    out_dir = Path(out_dir)
    manifest_path = out_dir / "manifest.csv"
    if _prepare_directory(out_dir, request):
        return manifest_path
    for stale in out_dir.rglob(PARTIAL_PREFIX + "*"):  # left by an interrupted run
        stale.unlink()

    grids = {sid: SCANNERS[sid].at_size(request.size) for sid in request.scanners}
    atomic_write_text(out_dir / "scanners.json", _dump({sid: g.to_dict() for sid, g in grids.items()}))
    (out_dir / _PROGRESS_DIR).mkdir(exist_ok=True)
    jobs = [(sid, index) for sid in request.scanners for index in range(request.subjects)]
    _simulate_missing_scans(out_dir, request, grids, jobs, progress=progress)
    _finish(out_dir, request, jobs)
    return manifest_path


def _simulate_missing_scans(out_dir: Path, request: _Request, grids: dict[str, SimulatedScanner],
                            jobs: list[tuple[str, int]], *, progress: bool) -> None:
    """Simulates and writes every (scanner, subject index) of ``jobs`` that an earlier run has not
    finished, under a progress bar that counts the finished ones too."""
    from tqdm.auto import tqdm  # deferred: simulation only (see the imports)

    from autopeft.data._projector import ParallelBeamProjector  # deferred: simulation only (see the imports)

    todo = [(sid, i) for sid, i in jobs if not _scan_is_done(out_dir, sid, _subject_id(sid, i), request.bids)]
    projectors: dict[str, ParallelBeamProjector] = {}
    with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="simulating scans", unit="scan",
              disable=not progress) as bar:
        for sid, index in todo:
            grid = grids[sid]
            if sid not in projectors:
                projectors[sid] = ParallelBeamProjector(grid.matrix[0], grid.spacing_mm[0], grid.n_views, grid.subsets)
            bar.set_postfix_str(_subject_id(sid, index))
            _write_scan(out_dir, request, sid, index, grid, projectors[sid])
            bar.update()


def _write_scan(out_dir: Path, request: _Request, sid: str, index: int, grid: SimulatedScanner,
                projector: ParallelBeamProjector) -> None:
    """Simulates one subject on one scanner and writes its short and long NIfTI (and, with
    ``--bids``, its dynamic scan); its progress file, written last, marks it finished."""
    subject = _subject_id(sid, index)
    # Seeded by (seed, scanner, subject): a scan never depends on order or on resuming.
    seeds = np.random.SeedSequence([request.seed, int(sid), index])
    scan = _simulate_scan(grid, projector, seeds)
    short_rel, long_rel = _scan_paths(sid, subject)
    (out_dir / short_rel).parent.mkdir(exist_ok=True)
    label = f"autopeft sim scanner {sid} {subject}"
    _write_nifti(out_dir / short_rel, scan.short, grid.affine, f"{label} short (frame 1 of 6)")
    _write_nifti(out_dir / long_rel, scan.long, grid.affine, f"{label} long (mean of 6 frames)")
    if request.bids:
        from autopeft.data.bids import write_pet_scan  # deferred: simulation only (see the imports)

        write_pet_scan(out_dir, _bids_path(sid, subject), scan.frames, grid.affine, _bids_sidecar(grid),
                       _FRAME_MINUTES * 60.0)
    atomic_write_text(out_dir / _PROGRESS_DIR / f"{subject}.json", _dump(scan.metrics))


def _finish(out_dir: Path, request: _Request, jobs: list[tuple[str, int]]) -> None:
    """Writes ``summary.json``, the BIDS dataset files (``--bids``) and ``manifest.csv``, then the
    state that marks the run complete (last, so an interrupted finish is redone)."""
    metrics: dict[str, list[dict[str, float]]] = {sid: [] for sid in request.scanners}
    for sid, index in jobs:
        progress_file = out_dir / _PROGRESS_DIR / f"{_subject_id(sid, index)}.json"
        metrics[sid].append(json.loads(progress_file.read_text(encoding="utf-8")))
    atomic_write_text(out_dir / "summary.json", _dump(_summary(request, metrics)))
    if request.bids:
        from autopeft.data.bids import write_dataset_files  # deferred: simulation only (see the imports)

        write_dataset_files(
            out_dir, name="autopeft simulated multi-scanner 18F-FDG brain PET",
            participants=[_subject_id(sid, i).replace("-", "") for sid, i in jobs],
            readme="Simulated dynamic 18F-FDG brain PET (autopeft simulate --bids): six 5-minute frames from 30 min "
            "after injection per scan, one session per scanner (ses-scanner<k>). Derive short/long pairs with "
            "'autopeft data --bids DIR --short 0-5 --long 0-30 --out DERIVED'.",
            ignore=["manifest.csv", "scanners.json", "summary.json", "scanner*/"],
        )
    atomic_write_text(out_dir / "manifest.csv", _manifest_text(jobs))
    atomic_write_text(out_dir / _STATE_FILE, _dump({"key": request.key(), "complete": True}))


def _manifest_text(jobs: list[tuple[str, int]]) -> str:
    """``manifest.csv``: one row per (scanner, subject index), paths relative to the data folder."""
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for sid, index in jobs:
        subject = _subject_id(sid, index)
        writer.writerow([subject, sid, *_scan_paths(sid, subject)])
    return rows.getvalue()


def builtin_data(*, subjects: int = 16, size: int = 64, seed: int = 0, progress: bool = True) -> Path:
    """The default five-scanner data set, simulated into the cache on first use.

    The cache is ``$AUTOPEFT_CACHE`` (default ``~/.cache/autopeft``), in ``sim-<key>/`` where the
    key is a digest of the arguments and the simulator version.

    Args:
        subjects: subjects per scanner. Defaults to 16 (the CPU protocol: 4 fine-tune train + 4 val + 8 test).
        size: in-plane matrix of scanner 1. Defaults to 64.
        seed: random seed. Defaults to 0.
        progress: show a progress bar while simulating. Defaults to True.

    Returns:
        Path of the data set's ``manifest.csv``.
    """
    request = _check_request(subjects, size, seed, tuple(SCANNERS))
    return simulate(
        cache_root() / f"sim-{request.digest()}",
        subjects=subjects,
        size=size,
        seed=seed,
        scanners=request.scanners,
        progress=progress,
    )
