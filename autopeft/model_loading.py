"""Open a fine-tuned model for use: what ``autopeft predict --model`` and ``autopeft export`` point at.

:func:`load_model` takes

- a search's run directory (``run.json``): the recommended plan's trained parts for the target
  (``weights/<N>/<source>-<target>-fold<k>/`` of the confirmed recommendation N, else
  ``best_weights/``; named by ``autopeft.runs.pair_folder``), on the run's own source model (from
  the cache, the user's imported ``--weights`` included; never retrained here);
- a trained-plan folder (``trained.safetensors`` + ``plan.yaml`` + ``meta.json``, as
  ``autopeft finetune --save`` and a run's ``best_weights/`` hold), on its run's source model or on
  the pre-trained model given as ``weights``;
- a MONAI bundle written by ``autopeft export`` (:func:`load_bundle`).

Below both of its users: :mod:`autopeft.inference` (predict) and :mod:`autopeft.bundle` (export)
import it, and not each other.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from autopeft.backbones.network import load_run_network
from autopeft.data import read_manifest, resolve_manifest
from autopeft.errors import CheckpointError, ConfigError
from autopeft.peft import Plan, load_trained
from autopeft.peft.checkpoint import META_FILE, PLAN_FILE, TRAINED_FILE
from autopeft.pretraining import cache_root, imported_model, is_pretrained, source_spec
from autopeft.runner.trial import setup_from_config, source_model
from autopeft.runs import find_pair

__all__ = ["LoadedModel", "load_model", "load_bundle", "recommended_weights", "run_setup", "run_pairs", "BUNDLE_WEIGHTS"]

# Where an exported bundle keeps its weights (autopeft.bundle writes it, load_bundle reads it).
BUNDLE_WEIGHTS = "models/model.safetensors"


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
    return all((path / name).is_file() for name in (TRAINED_FILE, PLAN_FILE, META_FILE))


def run_setup(run_dir: str | os.PathLike):
    """The search's :class:`~autopeft.runner.trial.TrialSetup`, rebuilt from ``run.json`` as the
    engine built it (source models are then found in the cache by the same key)."""
    run_dir = Path(run_dir)
    meta_path = run_dir / "run.json"
    if not meta_path.is_file():
        raise ConfigError(f"{run_dir}: no run.json; give the folder a search wrote (its --out).")
    config = json.loads(meta_path.read_text(encoding="utf-8"))["config"]

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
    setup = setup or run_setup(run_dir)
    weights, _ = recommended_weights(run_dir)
    found = [(s, t, f, find_pair(weights, s, t, f)) for f in setup.folds for s, t in setup.pairs]
    return [(s, t, f, folder) for s, t, f, folder in found if _is_trained_dir(folder)]


def _cached_source_model(setup, source: str, fold: int):
    """The run's source model from the cache; an error (never a silent re-training) when it is gone."""
    if setup.weights is None:
        spec = source_spec(setup.backbone, source, manifest=read_manifest(setup.manifest_path), preset=setup.preset,
                           fold=fold, epochs=setup.pretrain_epochs, seed=setup.seed, protocol=setup.protocol,
                           amp=setup.amp)
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
    folder = Path(path).expanduser().resolve()
    if (folder / "configs" / "inference.json").is_file():
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

        base, _ = imported_model(weights, meta["backbone"], meta["preset"])
        model = load_trained(base, folder).eval()

        return LoadedModel(model, tuple(base.preset.crop_size), meta["backbone"], meta["preset"], source, target,
                           None, Plan.from_yaml(folder / "plan.yaml").to_dict(), str(folder))
    raise ConfigError(
        f"--model {path}: not a search run directory (run.json), a trained-plan folder (trained.safetensors, "
        "plan.yaml, meta.json) or a MONAI bundle (configs/inference.json)."
    )


def load_bundle(folder: str | os.PathLike):
    """The network of a bundle written by :func:`export_run`, through ``monai.bundle.ConfigParser``
    with ``models/model.safetensors`` loaded strictly, as an :class:`LoadedModel`."""
    folder = Path(folder).expanduser().resolve()
    configs = folder / "configs"
    parser = ConfigParser()
    parser.read_config(str(configs / "inference.json"))
    parser.read_meta(str(configs / "metadata.json"))
    parser["bundle_root"] = str(folder)
    network = parser.get_parsed_content("network_def")
    try:
        tensors = load_file(str(folder / BUNDLE_WEIGHTS))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{folder / BUNDLE_WEIGHTS} cannot be read ({err}).") from err
    try:
        network.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{folder / BUNDLE_WEIGHTS} does not fit the bundle's network_def: {err}") from err
    info = parser.get("_meta_", {}).get("autopeft", {})
    roi = tuple(info.get("roi_size") or parser.get("roi_size"))
    return LoadedModel(network.eval(), roi, info.get("backbone", ""), info.get("preset", ""), info.get("source"),
                       info.get("target"), info.get("fold"), info.get("plan"), str(folder))
