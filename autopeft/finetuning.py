"""Fine-tuning a pre-trained source model on a target scanner, and scoring it: the one recipe.

:func:`finetune_plan` turns (plan, source model, target, fold, seed, preset) into a trained,
scored model. Trials, the search's references and confirmation, ``autopeft finetune`` and the
benchmarks all call it, so a plan found by a search trains the same way wherever it is run:

- epochs and learning rate: explicit values, else the plan's ``train`` section, else the
  preset's :class:`~backbones.base.FinetuneSchedule` (the Full-FT rate for Full-FT plans);
- crops per volume: the preset's schedule;
- SH-PEFT importance: on one epoch of the target's training crops, at the plan's
  ``train.shpeft_lambda`` (1 when absent), cached per source model, subjects and seed.

The target's subjects are split by the fine-tuning protocol into train / val / test. The model is
fine-tuned for a fixed number of epochs and the last epoch is scored on the requested held-out
splits (``val`` for a search, ``test`` to confirm): no epoch is picked by looking at held-out scans.
(PETITE reported the best epoch on its evaluation set, which flatters every method alike; we do not.)
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from autopeft._io import adopt_legacy, cache_root, path_component, path_inside
from autopeft.data import Protocol, eval_volumes, split_scanner, train_loader
from autopeft.evaluation import evaluate_identity, evaluate_subjects, mean_scores
from autopeft.importance import importance_at, importance_pair_on_scans
from autopeft.peft import apply_plan, count_trainable
from autopeft.precision import amp_precision
from autopeft.pretraining import SourceSpec, content_hash, pretrained_model
from autopeft.train import EpochResult, Trainer, TrainSettings

__all__ = [
    "FinetuneJob",
    "FinetuneResult",
    "FinetuneSettings",
    "Schedule",
    "finetune",
    "finetune_plan",
    "target_train_records",
    "plan_preparer",
    "plan_schedule",
]


@dataclass
class FinetuneResult:
    """Scores of one fine-tuning run on one target scanner.

    ``metrics`` are the means over the first split scored; ``subjects`` holds every split's
    per-subject scores (``split -> [{"subject", "psnr", "ssim", "nrmse"}]``).
    """

    method: str
    target: str
    metrics: dict[str, float]
    identity: dict[str, float]
    trainable: int
    total: int
    seconds_per_epoch: float = 0.0
    peak_memory_mb: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    subjects: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def plan_preparer(plan, *, importance=None) -> Callable[[nn.Module], tuple[int, int]]:
    """A ``prepare`` for :func:`finetune` that applies ``plan`` (``autopeft.peft.apply_plan``).

    Counts are autopeft's one way of counting (``count_trainable``) over the parameters of the
    pre-trained network before injection.
    """

    def prepare(model: nn.Module) -> tuple[int, int]:
        total = sum(p.numel() for p in model.net.parameters())
        apply_plan(model, plan, importance=importance)
        return count_trainable(model), total

    return prepare


@dataclass(frozen=True)
class Schedule:
    """Epochs, learning rate and crops of one fine-tuning run."""

    epochs: int
    lr: float
    crops_per_volume: int = 1


def plan_schedule(plan, preset, *, epochs: int | None = None, lr: float | None = None) -> Schedule:
    """How ``plan`` fine-tunes on ``preset`` (a ``autopeft.backbones.Preset``).

    Explicit values win, then the plan's ``train`` section (``epochs``, ``lr``), on every preset,
    then the preset's schedule (its Full-FT rate for Full-FT plans, its PEFT rate for the rest).
    Plans that train nothing (No-FT) train 0 epochs.
    """
    schedule = preset.finetune
    if not plan.trains_anything:
        return Schedule(0, 0.0, schedule.crops_per_volume)
    epochs = epochs if epochs is not None else int(plan.train.get("epochs", schedule.epochs))
    default_lr = schedule.lr_full if plan.full_ft else schedule.lr_peft
    lr = lr if lr is not None else float(plan.train.get("lr", default_lr))
    return Schedule(epochs, lr, schedule.crops_per_volume)


@dataclass(frozen=True, kw_only=True)
class FinetuneSettings:
    """What every fine-tuning of one search (or one ``autopeft finetune``) shares: the backbone,
    the data and its protocol, the evaluation seed and the source models (picklable: it travels to
    Ray workers). :class:`FinetuneJob` adds one (source, target, fold); a search's
    ``autopeft.runner.trial.TrialSetup`` adds its pairs, folds and execution settings.

    Args:
        backbone: registered backbone name.
        preset: the backbone's preset name.
        manifest_path: the data set's manifest.
        seed: seeds the splits and the source model: the evaluation. Defaults to 0.
        protocol: subjects per split and folds. Defaults to the CPU-scaled ``Protocol()``.
        pretrain_epochs: epochs of the source model. Defaults to the preset's.
        device: where to train. Defaults to ``cpu``.
        weights: a user's pre-trained model (file or MONAI bundle) used as the source model instead
            of pre-training one (``autopeft.pretraining.imported_model``). Defaults to None.
        pretrain: pre-train the source model when the cache lacks it. Defaults to True; a
            search's trials set False (a missing model is then an error naming it).
        amp: mixed precision (``autopeft.precision.amp_precision``) in pre-training, fine-tuning
            and scoring; source models are cached apart from full-precision ones. Defaults to False.
    """

    backbone: str
    preset: str
    manifest_path: str
    seed: int = 0
    protocol: Protocol = Protocol()
    pretrain_epochs: int | None = None
    device: str = "cpu"
    weights: str | None = None
    pretrain: bool = True
    amp: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.protocol, Protocol):
            raise TypeError(f"`protocol` must be a Protocol (Protocol.from_settings reads a mapping of its fields), "
                            f"but got {type(self.protocol).__name__}.")

    def job(self, source: str, target: str, fold: int = 0, *, train_seed: int | None = None) -> FinetuneJob:
        """The :class:`FinetuneJob` of one (source, target, fold) under these settings: the one place
        a subclass's settings (a search's ``TrialSetup``) become a job.

        Args:
            source: scanner the source model was pre-trained on.
            target: scanner to fine-tune on.
            fold: cross-validation fold. Defaults to 0.
            train_seed: seeds the fine-tuning. Defaults to ``seed``.
        """
        shared = {f.name: getattr(self, f.name) for f in fields(FinetuneSettings)}
        return FinetuneJob(**shared, source=str(source), target=str(target), fold=int(fold), train_seed=train_seed)


@dataclass(frozen=True, kw_only=True)
class FinetuneJob(FinetuneSettings):
    """Where a plan is fine-tuned and scored: :class:`FinetuneSettings` (its fields and defaults)
    and one (source, target, fold), with the fine-tuning's seed.

    Args:
        source: scanner the source model was pre-trained on.
        target: scanner to fine-tune on.
        fold: cross-validation fold (of the source's pre-training split and the target's
            fine-tuning split). Defaults to 0.
        train_seed: seeds the fine-tuning (crops, order, initialisation of added weights).
            Defaults to ``seed``.
    """

    source: str
    target: str
    fold: int = 0
    train_seed: int | None = None

    @property
    def fine_tuning_seed(self) -> int:
        return self.seed if self.train_seed is None else self.train_seed


# Source models already loaded in this process (a Ray worker runs many trials): loading and
# checking a checkpoint costs more than a copy. Keyed by what identifies the model and the content
# of the manifest; at most a few models (a search has one per source scanner and fold).
_LOADED: dict[tuple, tuple[nn.Module, dict[str, Any]]] = {}
_LOADED_MAX = 8


def source_model(job: FinetuneJob, *, progress: bool = False):
    """The job's pre-trained source model and its checkpoint metadata (cache; trained if missing
    and ``job.pretrain``).

    Returns a fresh copy each call: callers may change it.
    """
    stamp = content_hash(job.manifest_path) if os.path.isfile(job.manifest_path) else ""
    key = (job.backbone, job.preset, stamp, job.source, job.fold, job.seed, job.protocol,
           job.pretrain_epochs, job.device, job.weights, job.amp)
    if key not in _LOADED:
        if len(_LOADED) >= _LOADED_MAX:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = pretrained_model(
            job.backbone, job.source, manifest_path=job.manifest_path, preset=job.preset, fold=job.fold,
            epochs=job.pretrain_epochs, seed=job.seed, protocol=job.protocol, device=job.device, progress=progress,
            weights=job.weights, train=job.pretrain, amp=job.amp,
        )
    model, meta = _LOADED[key]
    return copy.deepcopy(model), dict(meta)


def target_train_records(job: FinetuneJob) -> list[dict[str, Any]]:
    """The target's fine-tuning subjects of ``job`` (its split's ``train`` records)."""
    return split_scanner(job.manifest_path, job.target, purpose="finetune", protocol=job.protocol,
                         fold=job.fold, seed=job.seed)["train"]


def importance_file(job: FinetuneJob, meta: dict[str, Any], *, train: list[dict[str, Any]] | None = None) -> str:
    """Where the job's importance maps are cached, relative to the cache root: keyed by the source
    model (``meta``, its checkpoint metadata), the target's training subjects (``train``, read
    from the job's split when not given) and the seed; names through ``path_component``."""
    return _importance_file(job, meta, train=train, legacy=False)


def _importance_file(job: FinetuneJob, meta: dict[str, Any], *, train: list[dict[str, Any]] | None, legacy: bool) -> str:
    """:func:`importance_file`, or with ``legacy`` the name an earlier autopeft gave it (names as they were)."""
    train = target_train_records(job) if train is None else train
    spec = SourceSpec.from_metadata(meta)
    subjects = hashlib.sha256(json.dumps([job.target, [r["subject"] for r in train]]).encode()).hexdigest()[:12]
    key, target = (spec.legacy_key(), job.target) if legacy else (spec.key(), path_component(job.target))
    return f"importance/{key}-tgt{target}-{subjects}-seed{job.fine_tuning_seed}.safetensors"


def target_importance(job: FinetuneJob, model: nn.Module | None = None, meta: dict[str, Any] | None = None):
    """(I at lambda 0, I at lambda 1) of the job's source model on the target's training crops
    (``autopeft.importance.importance_pair_on_scans``), cached beside the source models
    (:func:`importance_file`)."""
    if model is None or meta is None:
        model, meta = source_model(job)
    train = target_train_records(job)
    root = cache_root() / "importance"
    path = path_inside(root, cache_root() / importance_file(job, meta, train=train), what="the importance maps' cache file")
    adopt_legacy(root, cache_root() / _importance_file(job, meta, train=train, legacy=True), path, what="importance maps")
    return importance_pair_on_scans(copy.deepcopy(model), train, seed=job.fine_tuning_seed, device=job.device, cache_file=path)


def finetune_plan(
    plan,
    job: FinetuneJob,
    *,
    splits: Sequence[str] = ("val",),
    epochs: int | None = None,
    lr: float | None = None,
    source: tuple[nn.Module, dict[str, Any]] | None = None,
    progress: bool = False,
    on_epoch: Callable[[EpochResult], None] | None = None,
    score_epochs: Collection[int] = (),
) -> tuple[nn.Module, FinetuneResult]:
    """Fine-tune ``plan`` as the job says and score it on ``splits``: the one recipe.

    Args:
        plan: an ``autopeft.peft.Plan``.
        job: source, target, fold, seeds, preset, data.
        splits: held-out splits to score, ``val`` and/or ``test``. Defaults to ``("val",)``.
        epochs: overrides the plan's and the preset's epochs.
        lr: overrides the plan's and the preset's learning rate.
        source: the pre-trained ``(model, metadata)`` when the caller has it loaded (not modified).
        progress: show a progress bar.
        on_epoch: called after each epoch.
        score_epochs: epochs (1-based) after which the first split is also scored, before the
            last: ``on_epoch`` then gets the means in ``EpochResult.metrics``.

    Returns:
        ``(model, result)``: the fine-tuned ``Backbone`` and its scores.
    """
    pretrained, meta = source if source is not None else source_model(job, progress=progress)
    importance = None
    if plan.needs_importance:
        task, hybrid = target_importance(job, pretrained, meta)
        importance = importance_at(task, hybrid, float(plan.train.get("shpeft_lambda", 1.0)))
    schedule = plan_schedule(plan, pretrained.preset, epochs=epochs, lr=lr)
    model = copy.deepcopy(pretrained)
    result = finetune(
        model, job.target, manifest=job.manifest_path, method=plan.name or "plan",
        prepare=plan_preparer(plan, importance=importance), epochs=schedule.epochs, lr=schedule.lr,
        protocol=job.protocol, fold=job.fold, seed=job.fine_tuning_seed, split_seed=job.seed,
        device=job.device, progress=progress, on_epoch=on_epoch, crops_per_volume=schedule.crops_per_volume,
        splits=splits, score_epochs=score_epochs, amp=job.amp,
    )
    return model, result


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # CPU: the process's peak resident set (Linux reports KiB, macOS bytes).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def finetune(
    model: nn.Module,
    target: str,
    *,
    manifest,
    method: str,
    prepare: Callable[[nn.Module], tuple[int, int]],
    epochs: int,
    lr: float,
    protocol: Protocol | None = None,
    fold: int = 0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    on_epoch: Callable[[EpochResult], None] | None = None,
    crops_per_volume: int = 1,
    split_seed: int | None = None,
    splits: Sequence[str] = ("val",),
    score_epochs: Collection[int] = (),
    amp: bool = False,
) -> FinetuneResult:
    """Fine-tune ``model`` on ``target`` and score it on the target's held-out subjects.

    The building block of :func:`finetune_plan`, which settles the schedule and importance; call
    that one unless you prepare the model yourself.

    Args:
        model: the pre-trained source ``Backbone`` (modified in place).
        target: target scanner id.
        manifest: a validated manifest DataFrame (``autopeft.data.read_manifest``).
        method: a label for reports (``none``, ``full`` or a plan name).
        prepare: sets what trains (e.g. ``apply_plan``) and returns ``(trainable, total)`` counts.
        epochs: fine-tuning epochs; 0 means score the model as it is (No-FT).
        lr: AdamW learning rate.
        protocol: a ``autopeft.data.Protocol``. Defaults to the CPU-scaled PETITE protocol.
        fold: cross-validation fold. Defaults to 0.
        seed: seeds the crops and the order of training. Defaults to 0.
        device: where to train.
        progress: show a progress bar.
        on_epoch: called after each epoch.
        crops_per_volume: random crops per training volume and epoch. Defaults to 1.
        split_seed: seeds the train / val / test split. Defaults to ``seed``.
        splits: held-out splits to score (``val``, ``test``); the first gives ``metrics``.
            Defaults to ``("val",)``: test subjects are scored only when asked for.
        score_epochs: epochs (1-based) after which the first split is also scored, before the
            last (a scheduler's rungs inside a pair): ``on_epoch`` gets the means in
            ``EpochResult.metrics``.
        amp: train and score in mixed precision (``autopeft.precision.amp_precision``). Defaults to False.
    """
    if not splits or any(name not in ("val", "test") for name in splits):
        raise ValueError(f"`splits` must name 'val' and/or 'test', but got {splits!r}.")
    device = torch.device(device)
    precision = amp_precision(amp, device)
    subjects = split_scanner(manifest, str(target), purpose="finetune", protocol=protocol or Protocol(), fold=fold,
                             seed=seed if split_seed is None else split_seed)
    trainable, total = _prepare(model, prepare, device=device, seed=seed)
    held_out = _held_out_reader(subjects)
    crop = model.preset.crop_size

    def score_first_split() -> dict[str, float]:
        return mean_scores(evaluate_subjects(model, held_out(splits[0]), roi_size=crop, device=device, precision=precision))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    history: list[dict[str, Any]] = []
    seconds_per_epoch = 0.0
    if epochs > 0 and trainable > 0:
        history, seconds_per_epoch = _train(
            model, subjects["train"], label=f"fine-tune {method} on scanner {target}", epochs=epochs, lr=lr, seed=seed,
            crops_per_volume=crops_per_volume, device=device, progress=progress, on_epoch=on_epoch,
            score_epochs=score_epochs, score=score_first_split, precision=precision,
        )
    scored = {name: evaluate_subjects(model, held_out(name), roi_size=crop, device=device, precision=precision)
              for name in splits}
    return FinetuneResult(
        method=method,
        target=str(target),
        metrics=mean_scores(scored[splits[0]]),
        identity=evaluate_identity(held_out(splits[0])),
        subjects=scored,
        trainable=trainable,
        total=total,
        seconds_per_epoch=seconds_per_epoch,
        peak_memory_mb=_peak_memory_mb(device),
        history=history,
    )


def _prepare(model: nn.Module, prepare: Callable[[nn.Module], tuple[int, int]], *, device: torch.device,
             seed: int) -> tuple[int, int]:
    """Moves ``model`` to ``device`` and sets what trains (``prepare``): returns ``(trainable, total)``."""
    model.to(device)
    torch.manual_seed(seed)  # before prepare: weights that PEFT adds start the same in every process
    return prepare(model)


def _held_out_reader(subjects: Mapping[str, list[dict[str, Any]]]) -> Callable[[str], list[dict]]:
    """Split name -> its volumes, read when first asked for (after training, or at the first epoch
    scored mid-training), only for the splits asked for, and once."""
    return functools.cache(lambda name: eval_volumes(subjects[name]))


def _train(
    model: nn.Module,
    train: list[dict[str, Any]],
    *,
    label: str,
    epochs: int,
    lr: float,
    seed: int,
    crops_per_volume: int,
    device: torch.device,
    progress: bool,
    on_epoch: Callable[[EpochResult], None] | None,
    score_epochs: Collection[int],
    score: Callable[[], dict[str, float]],
    precision: str = "fp32",
) -> tuple[list[dict[str, Any]], float]:
    """Fine-tunes ``model`` on the ``train`` subjects' random crops for ``epochs`` (AdamW at ``lr``).

    Args:
        model: the prepared ``Backbone`` (trained in place).
        train: the training subjects' records.
        label: the progress bar's description.
        epochs: epochs to train (at least 1).
        lr: the learning rate.
        seed: seeds the crops and their order.
        crops_per_volume: random crops per training volume and epoch.
        device: where to train.
        progress: show a progress bar.
        on_epoch: called after each epoch.
        score_epochs: epochs (1-based, before the last) after which ``score`` fills the epoch's ``metrics``.
        score: the means on the first held-out split.
        precision: ``TrainSettings.precision``. Defaults to ``fp32``.

    Returns:
        ``(history, seconds_per_epoch)``: one ``{"epoch", "loss", "seconds", **metrics}`` per epoch.
    """
    loader = train_loader(train, crop_size=model.preset.crop_size, batch_size=model.preset.batch_size, seed=seed,
                          crops_per_volume=crops_per_volume)
    trainer = Trainer(model, TrainSettings(epochs=epochs, lr=lr, precision=precision), device=device)
    history: list[dict[str, Any]] = []
    with tqdm(total=epochs, desc=label, disable=not progress, unit="epoch") as bar:

        def record(result: EpochResult) -> None:
            if result.epoch in score_epochs and result.epoch < epochs:
                result.metrics = score()
            history.append({"epoch": result.epoch, "loss": result.loss, "seconds": result.seconds, **result.metrics})
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.4f}")
            if on_epoch is not None:
                on_epoch(result)

        started = time.perf_counter()
        trainer.fit(loader, on_epoch=record)
    return history, (time.perf_counter() - started) / epochs
