"""Source pre-training with a checkpoint cache.

``pretrained_model(...)`` returns the pre-trained source model for a configuration, training it only
when the cache has none. The cache key holds everything that changes the result: backbone, preset,
source scanner, fold, epochs, seed, mixed precision when on (``amp``) and a hash of the data
manifest (so a different data set never reuses a model). An interrupted pre-training resumes from its last finished epoch: the Trainer
checkpoints every epoch into the cache entry (:class:`autopeft.train.EpochCheckpoints`).

Layout of one cache entry ``<cache>/pretrained/<key>/`` (names in the key through
:func:`autopeft._io.path_component`; the readable ones in the metadata)::

    model.safetensors   best epoch by validation PSNR (net + discriminator), with JSON metadata
    history.json        per-epoch loss and validation metrics
    last.*, best.safetensors   resume files (EpochCheckpoints), removed once training completes

A user's own pre-trained model (``weights=``, ``--weights``) is imported instead: checked against
the backbone and preset, and cached as ``<cache>/pretrained/imported-<backbone>-<preset>-<sha256>/``
keyed by the file's content, so a search, its resume and later commands share one entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from filelock import FileLock
from tqdm.auto import tqdm

from autopeft import _io
from autopeft.backbones import Backbone, build_backbone, registered_backbones
from autopeft.checkpoints import (
    atomic_write_bytes, file_sha256, fit_user_weights, load_checkpoint, read_user_weights, save_checkpoint, weights_file,
)
from autopeft.data import Protocol, eval_volumes, read_manifest, split_scanner, train_loader
from autopeft.data.loading import PIPELINE_VERSION
from autopeft.errors import CheckpointError, ConfigError
from autopeft.precision import amp_precision
from autopeft.train import EpochCheckpoints, EpochResult, Trainer, TrainSettings

__all__ = [
    "SourceSpec", "source_spec", "model_file", "is_pretrained", "pretrained_model", "imported_model", "cache_root", "manifest_digest",
    "content_hash",
]


def cache_root() -> Path:
    """``$AUTOPEFT_CACHE`` or ``~/.cache/autopeft``."""
    return _io.cache_root()  # the one definition (an empty $AUTOPEFT_CACHE means the default)


# (path, size, mtime_ns) -> sha256 of the file: a process hashes each scan once. The digest itself
# is of the bytes, so a copy of the data on another node (other paths, other mtimes) keys the same.
_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def content_hash(path: str) -> str:
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = file_sha256(path)
    return _FILE_HASHES[key]


def manifest_digest(manifest) -> str:
    """A hash of a manifest's records and the contents of every file it names (not their paths or
    modification times: the same scans copied elsewhere give the same digest)."""
    h = hashlib.sha256()
    for row in manifest.sort_values(["scanner", "subject"]).itertuples(index=False):
        h.update(f"{row.subject}|{row.scanner}".encode())
        for path in (row.short, row.long):
            h.update(f"|{os.path.basename(path)}|{content_hash(path)}".encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class SourceSpec:
    """Everything that determines a pre-trained source model."""

    backbone: str
    preset: str
    source: str
    fold: int
    epochs: int
    lr: float
    seed: int
    data: str  # manifest digest
    protocol: str  # subject counts of the pre-training split, e.g. "8+4"
    crops: int  # random crops per training volume and epoch
    pipeline: int = 0  # autopeft.data.loading.PIPELINE_VERSION the model was trained with
    amp: bool = False  # mixed precision (autopeft.precision.amp_precision): other arithmetic, another model

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> SourceSpec:
        """The spec of a cached model from its checkpoint metadata; fields newer than the model
        (``amp``) take their defaults, which are what it was trained with."""
        return cls(**{name: meta[name] for name in cls.__dataclass_fields__ if name in meta})

    def key(self) -> str:
        """The cache folder's name: one path component, each name in it through
        :func:`autopeft._io.path_component` (the readable names stay in the checkpoint's metadata)."""
        return self._key(_io.path_component)

    def _key(self, name: Callable[[str], str]) -> str:
        return (
            f"{name(self.backbone)}-{name(self.preset)}-src{name(self.source)}-fold{self.fold}-e{self.epochs}"
            f"-c{self.crops}-lr{self.lr:g}-seed{self.seed}-p{self.protocol}-v{self.pipeline}-{self.data}"
            + ("-amp" if self.amp else "")  # nothing when off: the keys of full-precision models stay as they were
        )

    def legacy_key(self) -> str:
        """The key autopeft gave this model before names went through ``path_component`` (the
        names as they were): a cache entry there is moved to :meth:`key` when first asked for."""
        return self._key(str)


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    # Two processes asking for the same source model (parallel trials) must not both train it.
    directory.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory / ".lock")):
        yield


def source_spec(
    backbone: str,
    source: str,
    *,
    manifest,
    preset: str = "tiny",
    fold: int = 0,
    epochs: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    protocol=None,
    amp: bool = False,
) -> SourceSpec:
    """The cache identity of a source model (arguments as :func:`pretrained_model`; ``manifest``
    is the read manifest)."""
    presets = registered_backbones().get(backbone)
    if presets is None:
        raise ConfigError(f"Unknown backbone {backbone!r}; registered: {', '.join(registered_backbones())}.")
    if preset not in presets:
        raise ConfigError(f"Backbone {backbone!r} has no preset {preset!r}; presets: {', '.join(presets)}.")
    schedule = presets[preset].pretrain  # backbones.PretrainSchedule: every preset has its own
    protocol = protocol or Protocol()
    return SourceSpec(
        backbone=backbone,
        preset=preset,
        source=str(source),
        fold=fold,
        epochs=int(epochs if epochs is not None else schedule.epochs),
        lr=float(lr if lr is not None else schedule.lr),
        seed=seed,
        data=manifest_digest(manifest),
        protocol=f"{protocol.pretrain_train}+{protocol.pretrain_val}",
        crops=int(schedule.crops_per_volume),
        pipeline=PIPELINE_VERSION,
        amp=bool(amp),
    )


def model_file(spec: SourceSpec) -> str:
    """The finished model of ``spec``, relative to the cache root (the same key in an artifact store)."""
    return f"pretrained/{spec.key()}/model.safetensors"


def _entry(spec: SourceSpec, cache_dir: str | os.PathLike | None) -> Path:
    """The cache folder of ``spec``: its finished model is ``model.safetensors`` there. An entry an
    earlier autopeft made under :meth:`SourceSpec.legacy_key` is moved here first."""
    root = Path(cache_dir or cache_root()) / "pretrained"
    entry = (Path(cache_dir or cache_root()) / model_file(spec)).parent
    _io.adopt_legacy(root, root / spec.legacy_key(), entry, what="source models")
    return _io.path_inside(root, entry, what="the source model's cache folder")


def is_pretrained(spec: SourceSpec, cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether the cache holds the finished model of ``spec``."""
    return (_entry(spec, cache_dir) / "model.safetensors").is_file()


def pretrained_model(
    backbone: str,
    source: str,
    *,
    manifest_path: str | os.PathLike,
    preset: str = "tiny",
    fold: int = 0,
    epochs: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    protocol=None,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    on_epoch: Callable[[EpochResult], None] | None = None,
    weights: str | os.PathLike | None = None,
    train: bool = True,
    amp: bool = False,
):
    """The pre-trained source model, from the cache or freshly trained (and then cached).

    Args:
        backbone: registered backbone name.
        source: source scanner id (as in the manifest).
        manifest_path: the data set's ``manifest.csv``.
        preset: backbone preset. Defaults to ``tiny``.
        fold: cross-validation fold of the pre-training split. Defaults to 0.
        epochs: training epochs. Defaults to the preset's (``Preset.pretrain``).
        lr: AdamW learning rate. Defaults to the preset's.
        seed: seeds weight initialisation, splits and crops. Defaults to 0.
        protocol: a ``autopeft.data.Protocol``; defaults to the CPU-scaled PETITE protocol.
        device: where to train.
        cache_dir: cache root. Defaults to ``cache_root()``.
        progress: show a progress bar.
        on_epoch: called after each epoch (e.g. to print), besides checkpointing.
        weights: a user's own pre-trained model (see :func:`imported_model`) used instead of
            pre-training; the data arguments are then not used. Defaults to None.
        train: pre-train the model when the cache lacks it. Defaults to True; a search's trials
            pass False (their driver pre-trains every source model before them).
        amp: pre-train in mixed precision (``autopeft.precision.amp_precision`` on ``device``),
            validation included; a model of its own in the cache. Defaults to False.

    Returns:
        ``(model, metadata)``: the ``Backbone`` in eval mode with the best weights, and the
        checkpoint metadata (spec, validation metrics, epochs, seconds).

    Raises:
        CheckpointError: ``train`` is False and the cache has no such model (the spec is named).
    """
    if weights is not None:
        model, meta = imported_model(weights, backbone, preset, cache_dir=cache_dir)
        return model, {**meta, "source": str(source), "fold": fold, "seed": seed}
    manifest = read_manifest(manifest_path)
    protocol = protocol or Protocol()
    spec = source_spec(backbone, source, manifest=manifest, preset=preset, fold=fold, epochs=epochs, lr=lr, seed=seed,
                       protocol=protocol, amp=amp)
    entry = _entry(spec, cache_dir)
    torch.manual_seed(seed)
    model = build_backbone(backbone, preset)
    with _locked(entry):
        if (entry / "model.safetensors").exists():
            meta = load_checkpoint(model, entry / "model.safetensors", expect={"backbone": backbone, "preset": preset})
            return model.eval(), meta
        if not train:
            raise _not_pretrained_here(spec, entry)
        splits = split_scanner(manifest, spec.source, purpose="pretrain", protocol=protocol, fold=fold, seed=seed)
        meta = _pretrain(model, spec, splits, entry, device=device, progress=progress, on_epoch=on_epoch)
        return model.eval(), meta


def _not_pretrained_here(spec: SourceSpec, entry: Path) -> CheckpointError:
    """A search's trial found no source model in the cache (``train=False``): what to do instead."""
    return CheckpointError(
        f"source model {spec.key()} is missing from {entry.parent} and is not pre-trained here: a search "
        "pre-trains every source model before its trials (and puts them in its --storage-path for other "
        "nodes). Resume the search, or run 'autopeft pretrain' with the search's settings.")


def _pretrain(
    model: Backbone, spec: SourceSpec, splits: dict[str, list[dict]], entry: Path, *, device: str | torch.device,
    progress: bool, on_epoch: Callable[[EpochResult], None] | None,
) -> dict[str, Any]:
    """Train ``model`` as ``spec`` says, checkpointed every epoch in ``entry`` (resumed from there),
    and keep its best epoch as the entry's ``model.safetensors``.

    Args:
        model: the freshly built backbone; it ends with the best epoch's weights.
        spec: what to train (epochs, learning rate, crops, seed).
        splits: the source scanner's ``train`` and ``val`` records (:func:`autopeft.data.split_scanner`).
        entry: the cache folder (locked by the caller).
        device, progress, on_epoch: as :func:`pretrained_model`.

    Returns:
        The finished model's metadata (spec, subjects, best epoch, seconds).
    """
    crop = model.preset.crop_size
    loader = train_loader(splits["train"], crop_size=crop, batch_size=model.preset.batch_size, seed=spec.seed,
                          crops_per_volume=spec.crops)
    val = eval_volumes(splits["val"])
    model.requires_grad_(True)
    settings = TrainSettings(epochs=spec.epochs, lr=spec.lr, train_discriminator=model.discriminator is not None,
                             precision=amp_precision(spec.amp, device))
    trainer = Trainer(model, settings, device=device)
    metadata = {**asdict(spec), "precision": settings.precision, "train_subjects": [r["subject"] for r in splits["train"]],
                "val_subjects": [r["subject"] for r in splits["val"]]}
    checkpoints = EpochCheckpoints(entry, metadata)
    checkpoints.resume(trainer)  # an interrupted pre-training goes on from its last finished epoch
    bar = tqdm(total=spec.epochs, initial=trainer.epoch, desc=f"pre-train {spec.backbone}/{spec.preset} on scanner "
               f"{spec.source}", disable=not progress, unit="epoch")

    def report(result: EpochResult) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{result.loss:.4f}", psnr=f"{(checkpoints.best or {}).get('psnr', float('nan')):.2f}")
        if on_epoch is not None:
            on_epoch(result)

    started = time.perf_counter()
    # Whole-volume validation costs several epochs of training on a CPU: about ten per run.
    trainer.fit(loader, val_volumes=val, roi_size=crop, eval_every=max(1, spec.epochs // 10), on_epoch=report,
                checkpoints=checkpoints)
    bar.close()
    if checkpoints.best is None:
        raise ConfigError(f"Pre-training of {spec.key()} ran no epoch; `epochs` must be at least 1.")
    return _keep_best(model, checkpoints, entry, seconds=time.perf_counter() - started)


def _keep_best(model: Backbone, checkpoints: EpochCheckpoints, entry: Path, *, seconds: float) -> dict[str, Any]:
    """Save the best epoch of a finished pre-training as the cache entry's ``model.safetensors``
    (loaded into ``model``) with ``history.json``, and remove its checkpoints. Returns the metadata.

    Args:
        model: the trained backbone; it ends with the best epoch's weights.
        checkpoints: the pre-training's checkpoints (with a best epoch).
        entry: the cache folder.
        seconds: how long this session of the pre-training took.
    """
    best = checkpoints.load_best(model)
    history = checkpoints.history
    meta = {**checkpoints.metadata, "best": best, "seconds": seconds,
            "seconds_per_epoch": sum(h["seconds"] for h in history) / max(len(history), 1)}
    save_checkpoint(model, entry / "model.safetensors", meta)
    atomic_write_bytes(entry / "history.json", json.dumps(history, indent=1).encode())
    checkpoints.remove()  # the entry's model and history are what a cache hit reads
    return meta


def imported_model(
    weights: str | os.PathLike, backbone: str, preset: str = "tiny", *, cache_dir: str | os.PathLike | None = None
):
    """A user's own pre-trained model, checked and cached by content.

    Args:
        weights: a ``.safetensors`` file, a PyTorch state dict (read with
            ``torch.load(weights_only=True)`` only) or a MONAI bundle folder (``models/model.safetensors``
            or ``models/model.pt``). It holds the backbone's whole state dict or, for a backbone without
            a discriminator, its network's (e.g. MONAI UNETR's).
        backbone: registered backbone name.
        preset: backbone preset. Defaults to ``tiny``.
        cache_dir: cache root. Defaults to ``cache_root()``.

    Returns:
        ``(model, metadata)`` as :func:`pretrained_model`: the :class:`SourceSpec` fields (data: the
        file's hash; :func:`pretrained_model` sets source, fold and seed to the caller's),
        ``metadata["imported_from"]`` names the file, ``metadata["sha256"]`` its content hash, and
        ``metadata["best"]`` is None (no validation ran).

    Raises:
        CheckpointError: an unreadable file, a pickle payload that is not a plain state dict, or names
            and shapes that do not fit (listed, with the backbone and preset the file fits).
    """
    source = weights_file(weights)
    digest = file_sha256(source)
    root = Path(cache_dir or cache_root()) / "pretrained"
    name = f"imported-{_io.path_component(backbone)}-{_io.path_component(preset)}-{digest[:16]}"
    entry = _io.path_inside(root, root / name, what="the imported model's cache folder")
    final = entry / "model.safetensors"
    model = build_backbone(backbone, preset)
    with _locked(entry):
        if final.exists():
            meta = load_checkpoint(model, final, expect={"backbone": backbone, "preset": preset, "sha256": digest})
            return model.eval(), meta
        state = fit_user_weights(read_user_weights(source), model, source)
        model.load_state_dict(state, strict=True)
        # SourceSpec's fields too (what caches keyed on a source model read), the data being the file.
        spec = SourceSpec(backbone=backbone, preset=preset, source="imported", fold=0, epochs=0, lr=0.0, seed=0,
                          data=f"sha{digest[:16]}", protocol="imported", crops=0, pipeline=PIPELINE_VERSION)
        meta = {**asdict(spec), "imported_from": str(source.resolve()), "sha256": digest, "best": None}
        save_checkpoint(model, final, meta)
    return model.eval(), meta
