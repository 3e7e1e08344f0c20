"""Apply a fine-tuned model to new short scans: NIfTI in, NIfTI out, in the input's units and grid.

:func:`load_model` opens what a user points ``--model`` at:

- a search's run directory (``run.json``): the recommended plan's trained parts for the target
  (``weights/<N>/<source>-<target>-fold<k>/`` of the confirmed recommendation N, else
  ``best_weights/``; named by ``autopeft.runs.pair_folder``), on the run's own source model (from
  the cache, the user's imported ``--weights`` included; never retrained here);
- a trained-plan folder (``trained.safetensors`` + ``plan.yaml`` + ``meta.json``, as
  ``autopeft finetune --save`` and a run's ``best_weights/`` hold), on its run's source model or on
  the pre-trained model given as ``weights``;
- a MONAI bundle written by ``autopeft export`` (:mod:`autopeft.bundle`).

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

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from autopeft._io import atomic_write, path_component, path_inside
from autopeft.errors import CheckpointError, ConfigError, DataError

__all__ = ["LoadedModel", "ScanInput", "load_model", "recommended_weights", "scan_inputs", "predict_scans", "predict_with_bundle", "run_setup", "run_pairs"]

_NIFTI = re.compile(r"\.nii(\.gz)?$")


@dataclass
class LoadedModel:
    """A fine-tuned network ready for inference.

    Args:
        model: maps ``B x 1 x D x H x W`` windows (``roi_size``) to the same shape; eval mode.
        roi_size: the sliding window, the preset's crop.
        backbone: backbone name.
        preset: preset name.
        source: source scanner, when known.
        target: target scanner the model was fine-tuned for, when known.
        fold: cross-validation fold of the trained part, when known.
        plan: the plan (dict), when known.
        origin: where it was loaded from, for messages.
    """

    model: nn.Module
    roi_size: tuple[int, int, int]
    backbone: str
    preset: str
    source: str | None = None
    target: str | None = None
    fold: int | None = None
    plan: dict[str, Any] | None = None
    origin: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _is_trained_dir(path: Path) -> bool:
    from autopeft.peft.checkpoint import META_FILE, PLAN_FILE, TRAINED_FILE

    return all((path / name).is_file() for name in (TRAINED_FILE, PLAN_FILE, META_FILE))


def run_setup(run_dir: str | os.PathLike):
    """The search's :class:`~autopeft.runner.trial.TrialSetup`, rebuilt from ``run.json`` as the
    engine built it (source models are then found in the cache by the same key)."""
    from autopeft.data import resolve_manifest
    from autopeft.runner.trial import setup_from_config

    run_dir = Path(run_dir)
    meta_path = run_dir / "run.json"
    if not meta_path.is_file():
        raise ConfigError(f"{run_dir}: no run.json; give the folder a search wrote (its --out).")
    config = json.loads(meta_path.read_text(encoding="utf-8"))["config"]
    from backbones.network import load_run_network

    load_run_network(run_dir)  # a user's network by reference (network.json): registered first
    return setup_from_config(config, manifest_path=resolve_manifest(config.get("data"), progress=False), run_dir=run_dir,
                             device="cpu", threads=1)


def recommended_weights(run_dir: str | os.PathLike) -> tuple[Path, int | None]:
    """The folder of the recommended plan's trained parts and its trial number: ``weights/<N>/`` of
    ``summary.json["confirmation"]["recommended"]["number"]`` when the run was confirmed and kept
    them, else ``best_weights/`` (the best trial by validation; number from summary.json's best)."""
    run_dir = Path(run_dir)
    summary: dict[str, Any] = {}
    if (run_dir / "summary.json").is_file():
        try:
            summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            summary = {}
    number = ((summary.get("confirmation") or {}).get("recommended") or {}).get("number")
    if isinstance(number, int) and (run_dir / "weights" / f"{number:04d}").is_dir():
        return run_dir / "weights" / f"{number:04d}", number
    best = summary.get("best") or {}
    return run_dir / "best_weights", best.get("number") if isinstance(best, dict) else None


def run_pairs(run_dir: str | os.PathLike, setup=None) -> list[tuple[str, str, int, Path]]:
    """``(source, target, fold, folder)`` of every trained part of the recommended plan
    (:func:`recommended_weights`; folders named by ``autopeft.runs.pair_folder``)."""
    from autopeft.runs import find_pair

    setup = setup or run_setup(run_dir)
    weights, _ = recommended_weights(run_dir)
    found = [(s, t, f, find_pair(weights, s, t, f)) for f in setup.folds for s, t in setup.pairs]
    return [(s, t, f, folder) for s, t, f, folder in found if _is_trained_dir(folder)]


def _cached_source_model(setup, source: str, fold: int):
    """The run's source model from the cache; an error (never a silent re-training) when it is gone."""
    from autopeft.pretraining import cache_root, is_pretrained, source_spec
    from autopeft.runner.trial import source_model

    if setup.weights is None:
        from autopeft.data import read_manifest

        spec = source_spec(setup.backbone, source, manifest=read_manifest(setup.manifest_path), preset=setup.preset,
                           fold=fold, epochs=setup.pretrain_epochs, seed=setup.seed, protocol=setup.make_protocol())
        if not is_pretrained(spec):
            raise CheckpointError(
                f"{setup.run_dir}: its source model of scanner {source} ({spec.key()}) is not in the cache "
                f"{cache_root() / 'pretrained'} any more (another AUTOPEFT_CACHE, or the data changed). Run with the "
                "cache the search used, or predict with the bundle 'autopeft export' wrote."
            )
    model, _ = source_model(setup, source, fold)
    return model


def load_model(
    path: str | os.PathLike,
    *,
    target: str | None = None,
    source: str | None = None,
    weights: str | os.PathLike | None = None,
) -> LoadedModel:
    """Opens a run directory, a trained-plan folder or an exported bundle (module docstring).

    Args:
        path: the ``--model`` path.
        target: the target scanner; needed for a run directory that fine-tuned several.
        source: the source scanner, when a run has several for ``target``.
        weights: the pre-trained model a trained-plan folder outside a run was fine-tuned from.

    Raises:
        ConfigError: the path is none of the three, or the target or source is ambiguous or absent.
        CheckpointError: the files do not match (other pre-trained weights, corrupt files).
    """
    from autopeft.peft import load_trained

    folder = Path(path).expanduser().resolve()
    if (folder / "configs" / "inference.json").is_file():
        from autopeft.bundle import load_bundle

        loaded = load_bundle(folder)
        if target is not None and loaded.target is not None and str(target) != loaded.target:
            raise ConfigError(f"--model {path}: the bundle was fine-tuned for target {loaded.target!r}, not {target!r}.")
        return loaded
    if (folder / "run.json").is_file():
        setup = run_setup(folder)
        pairs = run_pairs(folder, setup)
        if not pairs:
            raise ConfigError(f"--model {path}: the run has no trained parts in best_weights/ (no finished PEFT trial, "
                              "or the best plan was Full-FT, whose weights a search does not keep).")
        chosen = [p for p in pairs if (target is None or p[1] == str(target)) and (source is None or p[0] == str(source))]
        listed = ", ".join(f"{s} -> {t} (fold {f})" for s, t, f, _ in pairs)
        if not chosen:
            raise ConfigError(f"--model {path}: no trained part for --target {target}"
                              + (f" --source {source}" if source else "") + f"; the run has {listed}.")
        if len({(s, t) for s, t, _, _ in chosen}) > 1:
            raise ConfigError(f"--model {path}: several trained parts fit ({listed}); choose one with --target "
                              "(and --source).")
        s, t, f, trained = chosen[0]
        base = _cached_source_model(setup, s, f)
        model = load_trained(base, trained).eval()
        from autopeft.peft.plan import Plan

        number = recommended_weights(folder)[1]
        return LoadedModel(model, tuple(base.preset.crop_size), setup.backbone, setup.preset, s, t, f,
                           Plan.from_yaml(trained / "plan.yaml").to_dict(),
                           f"{folder} ({s} -> {t}, fold {f}" + (f", trial #{number})" if number is not None else ")"),
                           {"setup": setup, "trained_dir": trained, "trial": number})
    if _is_trained_dir(folder):
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        run_dir = folder.parent.parent
        if weights is None and (run_dir / "run.json").is_file() and folder.parent.name == "best_weights":
            setup = run_setup(run_dir)
            for s, t, f, candidate in run_pairs(run_dir, setup):
                if candidate == folder:
                    return load_model(run_dir, target=t, source=s)
        if weights is None:
            raise ConfigError(f"--model {path} is a trained-plan folder outside a search run; pass the pre-trained "
                              "model it was fine-tuned from with --weights FILE_OR_DIR.")
        from autopeft.pretraining import imported_model

        base, _ = imported_model(weights, meta["backbone"], meta["preset"])
        model = load_trained(base, folder).eval()
        from autopeft.peft.plan import Plan

        return LoadedModel(model, tuple(base.preset.crop_size), meta["backbone"], meta["preset"], source, target,
                           None, Plan.from_yaml(folder / "plan.yaml").to_dict(), str(folder))
    raise ConfigError(
        f"--model {path}: not a search run directory (run.json), a trained-plan folder (trained.safetensors, "
        "plan.yaml, meta.json) or a MONAI bundle (configs/inference.json)."
    )


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
        from autopeft.data import read_manifest

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
    import nibabel as nib

    from autopeft.data.loading import load_volume

    voxels, _ = load_volume(path)  # checks: exists, readable, 3D (a single-frame 4D is squeezed)
    return voxels, nib.load(path)


def _write(path: Path, volume: np.ndarray, like) -> None:
    import nibabel as nib

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
    from tqdm.auto import tqdm

    from autopeft.data.loading import scale_by_tissue_mean, tissue_scale
    from autopeft.evaluation import METRICS, predict_volume

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
    from autopeft.bundle import load_bundle

    if not str(input):
        raise ConfigError("the bundle's 'input' is empty: pass --input FILE_OR_DIR (a NIfTI, a folder or a manifest.csv).")
    loaded = load_bundle(bundle_root)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return predict_scans(loaded, scan_inputs(input, target=loaded.target), output_dir, device=device)
