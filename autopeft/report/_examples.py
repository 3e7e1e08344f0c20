"""Example slices of the best plan (PETITE's Fig. 4), drawn by the search for its report.

The best plan's trained parts (``best_weights/<source>-<target>-fold<k>/``, named by
``autopeft.runs.pair_folder``) are loaded onto the pre-trained source model; it and No-FT (the
source model itself) predict one held-out subject of the target, a test subject once the
confirmation has read them, else a validation one. The axial middle planes of the short scan, the
long scan and both predictions are kept in ``<run>/examples/slices.safetensors`` with
``slices.json`` (subject, pair, split, PSNR over the whole volume): the report draws them and runs
no model. Their format and reader are :mod:`autopeft.report._slices`'s: the report reads them
without this module's models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from autopeft import metrics
from autopeft._io import atomic_write, atomic_write_json
from autopeft.data import eval_volumes, split_scanner
from autopeft.evaluation import predict_volume
from autopeft.peft import load_trained
from autopeft.peft.checkpoint import META_FILE
from autopeft.report._slices import EXAMPLES_DIR, SLICES_FILE, SLICES_META
from autopeft.runner.trial import source_model
from autopeft.runs import find_pair

__all__ = ["write_examples"]


def _pick_pair(run_dir: Path, setup) -> tuple[Path, str, str, int] | None:
    """The first pair of the run (in the set-up's order) with trained parts in ``best_weights/``:
    found by the names the writer used (``autopeft.runs.find_pair``), never parsed back out of a
    folder name (scanner names may hold '-')."""
    weights = run_dir / "best_weights"
    if not weights.is_dir():
        return None
    for source, target, fold in setup.units:
        folder = find_pair(weights, source, target, fold)
        if (folder / META_FILE).is_file():
            return folder, source, target, fold
    return None


def write_examples(run_dir: Path, setup, best: dict[str, Any] | None, *, split: str) -> bool:
    """Predict one ``split`` subject with the best plan and with No-FT; keep the middle planes.

    Returns:
        False (and writes nothing) when the run has no best plan with saved weights.
    """
    picked = _pick_pair(run_dir, setup)
    if best is None or picked is None:
        return False
    folder, source, target, fold = picked
    pretrained, _ = source_model(setup, source, fold)
    tuned = load_trained(pretrained, folder).eval()
    splits = split_scanner(setup.manifest_path, target, purpose="finetune", protocol=setup.protocol,
                           fold=fold, seed=setup.seed)
    volume = eval_volumes(splits[split][:1])[0]
    roi = pretrained.preset.crop_size
    no_ft = predict_volume(pretrained, volume["short"], roi_size=roi).clamp(0, 1)
    best_pred = predict_volume(tuned, volume["short"], roi_size=roi).clamp(0, 1)
    long = volume["long"]
    z = long.shape[-1] // 2  # axial plane: the last voxel axis is superior-inferior in RAS NIfTI
    planes = {name: t[0, :, :, z].T.contiguous().float().cpu()  # rows = anterior-posterior
              for name, t in (("short", volume["short"]), ("long", long), ("no_ft", no_ft), ("best", best_pred))}
    meta = {"subject": volume.get("subject", "?"), "source": source, "target": target, "fold": fold, "split": split,
            "z": z, "number": best["number"],
            "psnr": {name: float(metrics.psnr(pred.unsqueeze(0), long.unsqueeze(0)))
                     for name, pred in (("no_ft", no_ft), ("best", best_pred))}}
    out = run_dir / EXAMPLES_DIR
    atomic_write(out / SLICES_FILE, lambda tmp: save_file(planes, str(tmp)))
    atomic_write_json(out / SLICES_META, meta)
    return True
