"""Export a search's recommended model as a MONAI bundle, and load such a bundle back.

:func:`export_run` takes a run directory's trained parts of the recommended plan for one target
(``weights/<N>/`` of the confirmed recommendation, else ``best_weights/``; on the run's source
model), merges every linear method of the plan into plain weights (LoRA, SSF,
SH-PEFT; BitFit, LayerNorm and Full-FT already are), checks on a test volume that the merged
model's outputs equal the unmerged one's, and writes::

    configs/metadata.json   MONAI bundle metadata: network_data_format (1 channel, the preset's
                            window, float32, [0, 1]), versions, the plan, % trained, and where
                            the run confirmed the plan, this pair's test PSNR +- CI over the
                            target's test subjects (confirmation.csv)
    configs/inference.json  network_def (autopeft.bundle.bundle_network), the sliding-window
                            inferer, the [0, 1] scaling and its inverse, and a runnable "run"
    models/model.safetensors
    docs/README.md

Methods that are not linear (VPT, adapters) cannot be folded in: their sites stay as modules and
the export says which sites they are. ``network_def`` applies and merges the plan on a fresh
backbone, which gives the exported model's structure; the weights then come from the file.

MONAI's tools accept the bundle offline: ``python -m monai.bundle verify_net_in_out network_def
--meta_file configs/metadata.json --config_file configs/inference.json`` passes, and
:func:`load_bundle` (``monai.bundle.ConfigParser`` + ``safetensors``) rebuilds the network with the
run's outputs. ``verify_metadata`` would download MONAI's schema, so the schema's fields are filled
in by hand here (``meta_schema_20240725``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import monai
import nibabel
import numpy
import pandas as pd
import safetensors
import torch
from safetensors.torch import save_file
from torch import nn

from autopeft import __version__
from autopeft._io import atomic_write, atomic_write_text
from autopeft.backbones import build_backbone
from autopeft.backbones.network import NetworkRef, register_network, registered_ref
from autopeft.data import eval_volumes, split_scanner
from autopeft.errors import AutopeftError, CheckpointError, ConfigError
from autopeft.evaluation import predict_volume
from autopeft.model_loading import BUNDLE_WEIGHTS, LoadedModel, load_bundle, load_model
from autopeft.peft import Plan, apply_plan, get_method, merge_plan, plan_state, trainable_fraction
from autopeft.stats import mean_ci

__all__ = ["bundle_network", "export_run", "SCHEMA_URL"]

SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
# Merged and unmerged outputs must agree to this (on [0, 1] data): float round-off, not a change.
_MERGE_ATOL = 1e-4


def bundle_network(backbone: str, preset: str, plan: dict[str, Any] | None = None,
                   network: str | None = None) -> nn.Module:
    """The network of an exported bundle: the backbone without its discriminator (inference does
    not use it), with ``plan`` applied and merged, so that it has the exported model's structure:
    merged methods leave plain layers (SSF may add a bias or an affine norm), the non-mergeable ones
    (VPT, adapters) stay as modules.

    Weights are loaded afterwards (``models/model.safetensors``); this builds the structure only.

    Args:
        backbone: registered backbone name.
        preset: its preset.
        plan: plan data. Defaults to None (the plain backbone).
        network: a user's network reference (``autopeft.backbones.network.NetworkRef`` JSON), registered
            first. Defaults to None (a registered backbone).
    """
    if network is not None:
        register_network(NetworkRef.from_json(network))

    model = build_backbone(backbone, preset)
    if plan:
        plan = Plan.from_dict(plan)
        importance = None
        if plan.needs_importance:
            # Structure only: which entries SH-PEFT selects does not matter once merged.
            importance = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
        merge_plan(apply_plan(model, plan, importance=importance))
    model.discriminator = None
    return model.eval()


def _fits(network: nn.Module, merged: nn.Module) -> bool:
    """Whether ``merged``'s state dict loads strictly into ``network`` (same names and shapes)."""
    try:
        network.load_state_dict(merged.state_dict(), strict=True)
    except RuntimeError:
        return False
    return True


def _unmerged_sites(plan: Plan) -> list[str]:
    """``"<pattern> (<method>)"`` for every plan entry whose method cannot be merged (VPT, adapters)."""
    return [f"{pattern} ({spec.method})" for pattern, spec in plan.sites.items() if not get_method(spec.method).mergeable]


def _test_volume(loaded: LoadedModel) -> tuple[torch.Tensor, str]:
    """A held-out target scan of the run (scaled as in training), or a seeded random window."""
    setup = loaded.extra.get("setup")
    if setup is not None and loaded.target is not None:
        try:
            test = split_scanner(setup.manifest_path, loaded.target, purpose="finetune", protocol=setup.protocol,
                                 fold=loaded.fold or 0, seed=setup.seed)["test"][:1]
            volume = eval_volumes(test)[0]
            return volume["short"], f"held-out scan {volume['subject']} of scanner {loaded.target}"
        except (AutopeftError, OSError, RuntimeError):  # the data may be gone: a random window still tests the merge
            pass
    generator = torch.Generator().manual_seed(0)
    return torch.rand(1, *loaded.roi_size, generator=generator), "a random window (seed 0)"


def _predict(model: nn.Module, volume: torch.Tensor, roi: tuple[int, ...]) -> torch.Tensor:
    return predict_volume(model.eval(), volume, roi_size=roi)


def _max_diff(reference: torch.Tensor, model: nn.Module, volume: torch.Tensor, roi: tuple[int, ...]) -> float:
    return float((reference - _predict(model, volume, roi)).abs().max())


def _confirmed_psnr(run_dir: Path, trial: int | None, source: str, target: str) -> dict[str, Any] | None:
    """The exported model's own confirmed test PSNR: the recommended plan's rows of
    ``confirmation.csv`` for this source -> target only (the bundle holds that pair's model, not
    the plan's mean over every pair), each test subject averaged over folds and seeds, then mean
    and 95% CI over subjects (:func:`autopeft.stats.mean_ci`). None when the run did not confirm
    the exported trial or has no rows for the pair."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        number = summary["confirmation"]["recommended"]["number"]
        frame = pd.read_csv(run_dir / "confirmation.csv", dtype={"source": str, "target": str, "subject": str})
        rows = frame[(frame["number"] == number) & (frame["source"] == source) & (frame["target"] == target)]
    except (OSError, KeyError, TypeError, ValueError):  # no confirmation, or not the files it writes
        return None
    if trial is None or number != trial or rows.empty:
        return None
    stat = mean_ci(rows.groupby("subject")["psnr"].mean().to_numpy())
    ci = stat["ci"] if all(math.isfinite(v) for v in stat["ci"]) else None  # one subject: no interval
    return {"mean": stat["mean"], "ci": ci, "subjects": stat["n"], "split": "test", "source": source, "target": target,
            "trial": int(number), "folds": sorted(int(f) for f in rows["fold"].unique()),
            "seeds": sorted(int(s) for s in rows["seed"].unique())}


def _psnr_text(psnr: dict[str, Any] | None) -> str:
    if not psnr:
        return "not confirmed in this run"
    ci = f" (95% CI {psnr['ci'][0]:.3f}-{psnr['ci'][1]:.3f})" if psnr.get("ci") else ""
    return (f"{psnr['mean']:.3f} dB{ci} on scanner {psnr['target']}'s {psnr['subjects']} test subjects "
            f"({psnr['source']} -> {psnr['target']}; {len(psnr['folds'])} folds x {len(psnr['seeds'])} seeds)")


def _versions() -> dict[str, str]:
    return {"monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
            "numpy_version": numpy.__version__,
            "required_packages_version": {"autopeft": __version__, "safetensors": safetensors.__version__,
                                          "nibabel": nibabel.__version__}}


def _data_format(roi: tuple[int, ...]) -> dict[str, Any]:
    def entry(what: str) -> dict[str, Any]:
        return {"type": "image", "format": "magnitude", "modality": "PET", "num_channels": 1,
                "spatial_shape": list(roi), "dtype": "float32", "value_range": [0, 1], "is_patch_data": True,
                "channel_def": {"0": what}}

    return {"inputs": {"image": entry("short scan scaled to [0, 1]")},
            "outputs": {"pred": entry("long-scan estimate on the [0, 1] scale")}}


def export_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    target: str | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """Writes a run's model for ``target`` as a MONAI bundle in ``out_dir`` (module docstring).

    Returns:
        What was done: ``merge_diff`` and ``bundle_diff`` (max output differences on the test
        volume), ``test_volume``, ``unmerged`` sites, ``trained_percent``, ``test_psnr`` (the pair's
        confirmed test PSNR, :func:`_confirmed_psnr`, or None), ``test_psnr_text``, and the files
        written.

    Raises:
        ConfigError: ``out_dir`` holds something else, or the target is ambiguous.
        CheckpointError: merged and unmerged outputs differ (a bug: nothing is written then).
    """
    run_dir, out = _export_folders(run_dir, out_dir)
    loaded = load_model(run_dir, target=target, source=source)
    merge = _merge_checked(loaded)
    network, network_def, ref = _exported_network(loaded, merge)
    bundle_diff = _max_diff(merge.reference, network, merge.volume, loaded.roi_size)
    psnr = _confirmed_psnr(run_dir, loaded.extra.get("trial"), str(loaded.source), str(loaded.target))
    name = f"autopeft {loaded.backbone}/{loaded.preset} {loaded.source} -> {loaded.target}"
    metadata = _metadata(name, run_dir, loaded, merge, psnr, bundle_diff)
    inference = _inference_config(loaded.roi_size, network_def, ref)
    psnr_text = _psnr_text(psnr)
    readme = _readme(name, loaded, merge.trained_fraction, merge.unmerged_sites, psnr_text, merge.volume_name,
                     merge.merge_diff)
    _write_bundle(out, network, metadata, inference, readme)
    parser_diff = _max_diff(merge.reference, load_bundle(out).model, merge.volume, loaded.roi_size)
    return {"out": str(out), "name": name, "merge_diff": merge.merge_diff, "bundle_diff": bundle_diff,
            "parser_diff": parser_diff, "test_volume": merge.volume_name, "unmerged": merge.unmerged_sites,
            "trained_percent": 100 * merge.trained_fraction, "test_psnr": psnr, "test_psnr_text": psnr_text,
            "source": loaded.source, "target": loaded.target}


def _export_folders(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """The run directory and the bundle's folder, resolved and checked before anything is read.

    Raises:
        ConfigError: ``out_dir`` holds something that is not a bundle, or ``run_dir`` no run.json.
    """
    run = Path(run_dir).expanduser().resolve()
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not (out / "configs" / "metadata.json").is_file():
        raise ConfigError(f"--out {out_dir} is not empty and holds no bundle; choose a new or empty folder.")
    if not (run / "run.json").is_file():
        raise ConfigError(f"{run}: no run.json; give the folder a search wrote (its --out).")
    return run, out


@dataclass
class _MergedModel:
    """A run's model with its plan merged in place, and the check that merging kept its outputs.

    Args:
        model: the merged model (the run's model object itself).
        plan: its plan.
        trained_fraction: the share of the network the plan trains (counted before merging).
        unmerged_sites: the plan's sites that cannot merge (:func:`_unmerged_sites`).
        volume: the test volume the outputs are compared on.
        volume_name: what that volume is, for messages.
        reference: the unmerged model's outputs on it.
        merge_diff: max absolute difference of the merged model's outputs from ``reference``.
    """

    model: nn.Module
    plan: Plan
    trained_fraction: float
    unmerged_sites: list[str]
    volume: torch.Tensor
    volume_name: str
    reference: torch.Tensor
    merge_diff: float


def _merge_checked(loaded: LoadedModel) -> _MergedModel:
    """Merge the plan of ``loaded`` into its model in place, checking the outputs on a test volume.

    Raises:
        CheckpointError: merging changed the outputs by more than ``_MERGE_ATOL`` (a bug in a method).
    """
    tuned = loaded.model
    plan = plan_state(tuned).plan
    fraction = trainable_fraction(tuned)  # before merging: the trained share of the network
    unmerged_sites = _unmerged_sites(plan)
    volume, what = _test_volume(loaded)
    reference = _predict(tuned, volume, loaded.roi_size)  # unmerged outputs, before merging in place
    # In place, not on a copy: a deep copy of SH-PEFT's torch parametrizations does not survive merging.
    merged = merge_plan(tuned).eval()
    merge_diff = _max_diff(reference, merged, volume, loaded.roi_size)
    if merge_diff > _MERGE_ATOL:
        raise CheckpointError(f"merging the plan changed the outputs on {what} by up to {merge_diff:.3g} (> {_MERGE_ATOL:g}); "
                              "nothing was exported. This is a bug in a method's merge: please report it.")
    return _MergedModel(model=merged, plan=plan, trained_fraction=fraction, unmerged_sites=unmerged_sites,
                        volume=volume, volume_name=what, reference=reference, merge_diff=merge_diff)


def _exported_network(loaded: LoadedModel, merge: _MergedModel) -> tuple[nn.Module, dict[str, Any], NetworkRef | None]:
    """The bundle's network with the merged weights, its ``network_def``, and the user's network
    reference (None for a registered backbone).

    The user's own network is the ``network_def`` when the merged weights fit it as they are (SSF
    merged into a layer without a bias gives it one); otherwise :func:`bundle_network`.

    Raises:
        CheckpointError: the merged model does not fit :func:`bundle_network`'s structure.
    """
    ref = registered_ref(loaded.backbone, loaded.preset)
    if ref is not None and not merge.unmerged_sites:
        native = ref.build()
        if _fits(native, merge.model.net):
            return native.eval(), ref.network_def(), ref
    network = bundle_network(loaded.backbone, loaded.preset, merge.plan.to_dict())
    state = {k: v for k, v in merge.model.state_dict().items() if not k.startswith("discriminator.")}
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"the merged model does not fit the bundle's network_def: {err}") from err
    network_def = {"_target_": "autopeft.bundle.bundle_network", "backbone": loaded.backbone,
                   "preset": loaded.preset, "plan": merge.plan.to_dict()}
    if ref is not None:  # a JSON string: the parser must not instantiate a bundle's network_def inside it
        network_def["network"] = ref.to_json()
    return network, network_def, ref


def _autopeft_info(run_dir: Path, loaded: LoadedModel, merge: _MergedModel, psnr: dict[str, Any] | None,
                   bundle_diff: float) -> dict[str, Any]:
    """The metadata's ``autopeft`` section: where the model comes from, its plan and the checks."""
    unmerged = merge.unmerged_sites
    return {
        "backbone": loaded.backbone, "preset": loaded.preset, "source": loaded.source, "target": loaded.target,
        "fold": loaded.fold, "plan": Plan.from_dict(merge.plan.to_dict()).to_dict(),
        "trained_percent": round(100 * merge.trained_fraction, 6),
        "merged": not unmerged, "unmerged_sites": unmerged, "roi_size": list(loaded.roi_size), "run": str(run_dir),
        "trained_dir": str(loaded.extra.get("trained_dir", "")), "trial": loaded.extra.get("trial"), "test_psnr": psnr,
        "scaling": "input x TISSUE_LEVEL / mean(tissue), clipped to [0, 1] (autopeft.data.loading.scale_by_tissue_mean); "
                   "outputs divided by the same factor (autopeft.inference)",
        "merge_check": {"volume": merge.volume_name, "max_abs_diff": merge.merge_diff, "bundle_max_abs_diff": bundle_diff},
    }


def _metadata(name: str, run_dir: Path, loaded: LoadedModel, merge: _MergedModel, psnr: dict[str, Any] | None,
              bundle_diff: float) -> dict[str, Any]:
    """``configs/metadata.json``: MONAI's bundle metadata (schema ``meta_schema_20240725``) and autopeft's."""
    percent, unmerged = 100 * merge.trained_fraction, merge.unmerged_sites
    return {
        "schema": SCHEMA_URL,
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by autopeft from {run_dir.name}"},
        **_versions(),
        "name": name,
        "task": "PET scan-time reduction: a short (e.g. 5-minute) scan in, a long-scan (e.g. 30-minute) quality estimate out",
        "description": (f"{loaded.backbone} pre-trained on scanner {loaded.source} and fine-tuned for scanner "
                        f"{loaded.target} with an autopeft plan training {percent:.3f}% of its parameters; "
                        + ("the plan is merged into plain weights." if not unmerged else
                           f"not merged: {', '.join(unmerged)} stay as modules.")),
        "authors": "autopeft",
        "copyright": "Copyright the authors of the fine-tuned model",
        "data_source": f"the search's data ({loaded.extra['setup'].manifest_path})" if loaded.extra.get("setup") else "",
        "data_type": "nibabel",
        "image_classes": "single-channel PET short scan, scaled to [0, 1]",
        "pred_classes": "single-channel long-scan estimate, [0, 1] scale",
        "intended_use": "research; check it on your own scanner's scans before any use",
        "eval_metrics": ({"test_psnr_db": psnr["mean"], "split": "test", "pair": f"{psnr['source']} -> {psnr['target']}"}
                         if psnr else {}),
        "references": ["PETITE, MICCAI 2024", "UNETR (Hatamizadeh et al., WACV 2022)"],
        "network_data_format": _data_format(loaded.roi_size),
        "autopeft": _autopeft_info(run_dir, loaded, merge, psnr, bundle_diff),
    }


def _inference_config(roi: tuple[int, ...], network_def: dict[str, Any], ref: NetworkRef | None) -> dict[str, Any]:
    """``configs/inference.json``: the network, MONAI's sliding-window inferer and a runnable ``run``;
    a user's bundle network brings what its own ``network_def`` refers to."""
    inference = {
        "imports": ["$import torch", "$from autopeft.inference import predict_with_bundle"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "roi_size": list(roi),
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": "@roi_size", "sw_batch_size": 4, "overlap": 0.25,
                    "mode": "gaussian", "padding_mode": "constant"},
        "input": "",
        "output_dir": "$@bundle_root + '/predictions'",
        "run": "$predict_with_bundle(@bundle_root, @input, @output_dir)",
    }
    if ref is not None and ref.bundle_config is not None:  # what the bundle's own network_def refers to
        inference = {**{k: v for k, v in ref.bundle_config.items() if k not in inference}, **inference}
    return inference


def _write_bundle(out: Path, network: nn.Module, metadata: dict[str, Any], inference: dict[str, Any],
                  readme: str) -> None:
    """Write the bundle's four files into ``out``, each atomically."""
    for folder in ("configs", "models", "docs"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in network.state_dict().items()}
    atomic_write(out / BUNDLE_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}), inside=out)
    # Scanner names go into the files' contents only (JSON, the README), never into their paths.
    atomic_write_text(out / "configs" / "metadata.json", json.dumps(metadata, indent=2) + "\n", inside=out)
    atomic_write_text(out / "configs" / "inference.json", json.dumps(inference, indent=2) + "\n", inside=out)
    atomic_write_text(out / "docs" / "README.md", readme, inside=out)


def _readme(name: str, loaded, fraction: float, unmerged: list[str], psnr_text: str, what: str, diff: float) -> str:
    sites = (loaded.plan or {}).get("sites", {})
    summary = " ".join(f"{p}={spec['method']}" for p, spec in sites.items()) + (" +bitfit" if (loaded.plan or {}).get("bitfit") else "")
    merged = ("All of the plan is merged into plain weights." if not unmerged else
              f"Not merged (not linear, kept as modules): {', '.join(unmerged)}.")
    return f"""# {name}

A {loaded.backbone} ({loaded.preset} preset) pre-trained on scanner {loaded.source} and fine-tuned
for scanner {loaded.target} by autopeft: plan `{summary.strip() or 'frozen'}`, training
{100 * fraction:.3f}% of the network's parameters. Confirmed test PSNR: {psnr_text}.

{merged} The merged model's outputs equal the unmerged one's on {what} (max |diff| {diff:.2e}).

## Use

```bash
autopeft predict --model {{this folder}} --input scans/ --out predictions/
python -m monai.bundle run --config_file configs/inference.json --input scans/ --output_dir predictions/
```

Inputs are 3D NIfTI short scans of scanner {loaded.target}. Each is scaled to [0, 1] (times 0.3 /
its tissue mean, clipped), predicted by sliding windows of {list(loaded.roi_size)} voxels, and
divided by the same factor: outputs are in the input's units, on its grid, with its affine and header.
The network definition is `autopeft.bundle.bundle_network` (autopeft must be installed).

## Check

```bash
python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json --config_file configs/inference.json
```
"""
