"""Apply a fine-tuned model to new short scans: NIfTI in, NIfTI out, in the input's units and grid.

The model comes from :mod:`autopeft.model_loading` (a run directory, a trained-plan folder or an
exported bundle).

:func:`predict_scans` runs MONAI's sliding-window inference (the preset's crop as window, Gaussian
blending, as the evaluation does) on every short scan. Each scan is scaled to [0, 1] exactly as in
training (:func:`autopeft.data.loading.scale_by_tissue_mean`: times ``TISSUE_LEVEL / tissue mean``,
clipped), the prediction is clipped to [0, 1] as the evaluation scores it, and divided by the
same factor, so outputs are in the input's units. Voxels brighter than ``1 / factor`` (3.3 x the
tissue mean) were clipped at the model's input and are clipped at its output too. Each output is
written on the input's grid with its affine and header; an output path is never an input's. When
a long scan is given, PSNR / SSIM / NRMSE are computed as :func:`autopeft.evaluation.evaluate`
computes them (on the [0, 1] scale, each scan scaled on its own), so the figures agree.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from tqdm.auto import tqdm

from autopeft._io import atomic_write, path_component, path_inside
from autopeft.data import read_manifest
from autopeft.data.loading import load_volume, scale_by_tissue_mean, tissue_scale
from autopeft.errors import ConfigError, DataError
from autopeft.evaluation import METRICS, predict_volume
from autopeft.model_loading import LoadedModel, load_bundle

__all__ = ["ScanInput", "scan_inputs", "predict_scans", "predict_with_bundle"]

_NIFTI = re.compile(r"\.nii(\.gz)?$")


@dataclass(frozen=True)
class ScanInput:
    """One scan to predict: its short scan, the long scan when known, and the output's name."""

    short: str
    long: str | None
    name: str


def scan_inputs(path: str | os.PathLike, *, target: str | None = None) -> list[ScanInput]:
    """The scans ``--input`` names: a NIfTI file, a folder of them, or a manifest (``short``, and
    ``long`` for scores; only rows of ``target`` when the manifest has that scanner).

    Raises:
        DataError: nothing to predict, or a manifest without rows of ``target``.
    """
    candidate = Path(path).expanduser()
    manifest = candidate / "manifest.csv" if candidate.is_dir() else candidate
    if manifest.suffix == ".csv" and manifest.is_file():
        frame = read_manifest(manifest)
        if target is not None:
            mine = frame[frame["scanner"] == str(target)]
            if mine.empty:
                scanners = ", ".join(sorted(set(frame["scanner"])))
                raise DataError(f"--input {path}: no row of scanner {target!r} (the model's target); its scanners are "
                                f"{scanners}. A model fine-tuned for one scanner is applied to that scanner's scans.")
            frame = mine
        return [ScanInput(row.short, row.long, f"{row.subject}_pred") for row in frame.itertuples()]
    if candidate.is_dir():
        files = sorted(p for p in candidate.iterdir() if p.is_file() and _NIFTI.search(p.name))
        if not files:
            raise DataError(f"--input {path}: the folder holds no .nii or .nii.gz file and no manifest.csv.")
        return [ScanInput(str(p), None, _NIFTI.sub("", p.name) + "_pred") for p in files]
    if candidate.is_file() and _NIFTI.search(candidate.name):
        return [ScanInput(str(candidate), None, _NIFTI.sub("", candidate.name) + "_pred")]
    raise DataError(f"--input {path}: not a NIfTI file (.nii, .nii.gz), a folder of them, or a manifest.csv.")


def _read(path: str):
    voxels, _ = load_volume(path)  # checks: exists, readable, 3D (a single-frame 4D is squeezed)
    return voxels, nib.load(path)


def _write(path: Path, volume: np.ndarray, like) -> None:
    header = like.header.copy()
    header.set_data_dtype(np.float32)
    image = nib.Nifti1Image(volume.astype(np.float32), like.affine, header=header)
    image.header.set_data_shape(volume.shape)
    atomic_write(path, lambda tmp: nib.save(image, tmp), keep_suffix=True)


def predict_scans(
    loaded: LoadedModel,
    scans: Sequence[ScanInput],
    out_dir: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    overlap: float = 0.25,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Predicts every scan and writes ``out_dir/<name>.nii.gz`` (module docstring; the name through
    ``autopeft._io.path_component``).

    Returns:
        Per scan: ``name`` (as given), ``input``, ``output``, ``scale`` (the factor to [0, 1]) and,
        with a long scan, ``psnr``, ``ssim``, ``nrmse`` as the evaluation computes them.

    Raises:
        ConfigError: an output path would be an input's, or two outputs would share a name.
        DataError: a scan that cannot be scaled (empty, NaN), naming its file. An output folder
            this call made is removed again when nothing was written into it.
    """
    out = Path(out_dir).expanduser().resolve()
    made = not out.exists()
    try:
        return _predict_into(loaded, scans, out, device=device, overlap=overlap, progress=progress)
    except BaseException:
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _predict_into(loaded: LoadedModel, scans: Sequence[ScanInput], out: Path, *, device: str | torch.device,
                  overlap: float, progress: bool) -> list[dict[str, Any]]:
    # A name may be a manifest's subject: a path component, checked to stay in --out.
    targets = [path_inside(out, out / f"{path_component(scan.name)}.nii.gz", what="a prediction") for scan in scans]
    inputs = {Path(p).resolve() for scan in scans for p in (scan.short, scan.long) if p}
    clash = [str(t) for t in targets if t in inputs]
    if clash:
        raise ConfigError(f"--out {out}: writing {clash[0]} would overwrite an input; choose another --out.")
    if len(set(targets)) != len(targets):
        raise ConfigError(f"--input: two scans would both be written as {out}/<name>.nii.gz; give scans distinct names.")
    out.mkdir(parents=True, exist_ok=True)
    model = loaded.model.to(device).eval()
    results = []
    for scan, target in tqdm(list(zip(scans, targets)), desc="predicting", unit="scan", disable=not progress):
        voxels, image = _read(scan.short)
        volume = torch.from_numpy(voxels)[None]  # 1 x D x H x W, as the loaders give it
        try:
            factor = tissue_scale(volume)
        except DataError as err:
            raise DataError(f"{scan.short}: {err}") from err
        scaled = (volume * factor).clamp_(0.0, 1.0)
        pred = predict_volume(model, scaled, roi_size=loaded.roi_size, overlap=overlap, device=device).clamp(0, 1)
        _write(target, (pred[0] / factor).numpy(), image)
        row: dict[str, Any] = {"name": scan.name, "input": scan.short, "output": str(target), "scale": float(factor)}
        if scan.long:
            long_voxels, _ = _read(scan.long)
            if long_voxels.shape != voxels.shape:
                raise DataError(f"long scan {scan.long} has shape {long_voxels.shape}, its short scan {voxels.shape}.")
            long = scale_by_tissue_mean(torch.from_numpy(long_voxels)[None])
            row.update({name: fn(pred.unsqueeze(0), long.unsqueeze(0)) for name, fn in METRICS.items()})
            row["identity_psnr"] = METRICS["psnr"](scaled.unsqueeze(0), long.unsqueeze(0))
        results.append(row)
    return results


def predict_with_bundle(bundle_root: str | os.PathLike, input: str | os.PathLike, output_dir: str | os.PathLike,
                        device: str | None = None) -> list[dict[str, Any]]:
    """What an exported bundle's ``inference.json`` runs (``python -m monai.bundle run ... --input
    DIR --output_dir OUT``): :func:`predict_scans` with the bundle's network."""

    if not str(input):
        raise ConfigError("the bundle's 'input' is empty: pass --input FILE_OR_DIR (a NIfTI, a folder or a manifest.csv).")
    loaded = load_bundle(bundle_root)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return predict_scans(loaded, scan_inputs(input, target=loaded.target), output_dir, device=device)
