"""Fine-tuning a pre-trained source model on a target scanner, and scoring it.

The target's subjects are split by the fine-tuning protocol (few training subjects, the rest held
out). The model is fine-tuned for a fixed number of epochs and the last epoch is scored on the
held-out subjects: no epoch is picked by looking at test scans. (PETITE reported the best epoch on
its evaluation set, which flatters every method alike; we do not.)
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from autopeft.evaluation import evaluate, evaluate_identity
from autopeft.train import EpochResult, Trainer, TrainSettings

__all__ = ["FinetuneResult", "finetune", "FINETUNE_DEFAULTS", "count_parameters", "plan_preparer", "plan_schedule"]

# Fine-tuning length and learning rates per preset. PETITE: 150 (CVT-GAN) / 200 (UNETR) epochs,
# lr 1e-3 for PEFT and 1e-4 for full fine-tuning; the tiny preset is scaled to CPU minutes.
FINETUNE_DEFAULTS: dict[str, dict[str, float]] = {
    "tiny": {"epochs": 20, "lr_peft": 2e-3, "lr_full": 5e-4, "crops": 2},
    "paper": {"epochs": 150, "lr_peft": 1e-3, "lr_full": 1e-4, "crops": 1},
}


@dataclass
class FinetuneResult:
    """Scores of one fine-tuning run on one target scanner."""

    method: str
    target: str
    metrics: dict[str, float]
    identity: dict[str, float]
    trainable: int
    total: int
    seconds_per_epoch: float = 0.0
    peak_memory_mb: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def count_parameters(net: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters of a network."""
    total = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return trainable, total


def plan_preparer(plan, *, importance=None) -> Callable[[nn.Module], tuple[int, int]]:
    """A ``prepare`` for :func:`finetune` that applies ``plan`` (``autopeft.peft.apply_plan``).

    Counts are autopeft's one way of counting (``count_trainable``) over the parameters of the
    pre-trained network before injection.
    """

    def prepare(model: nn.Module) -> tuple[int, int]:
        from autopeft.peft import apply_plan, count_trainable

        total = sum(p.numel() for p in model.net.parameters())
        apply_plan(model, plan, importance=importance)
        return count_trainable(model), total

    return prepare


def plan_schedule(plan, preset: str, *, epochs: int | None = None, lr: float | None = None) -> tuple[int, float]:
    """Epochs and learning rate for fine-tuning ``plan`` on ``preset``.

    Explicit values win. Otherwise the ``paper`` preset follows the plan's ``train`` section
    (PETITE's settings); smaller presets use ``FINETUNE_DEFAULTS`` (CPU-scaled), with the full
    fine-tuning rate for Full-FT plans and the PEFT rate for the rest. No-FT plans train 0 epochs.
    """
    if not plan.sites and not plan.full_ft and not plan.bitfit:
        return 0, 0.0
    defaults = FINETUNE_DEFAULTS.get(preset, FINETUNE_DEFAULTS["paper"])
    if preset == "paper":
        epochs = epochs if epochs is not None else int(plan.train.get("epochs", defaults["epochs"]))
        lr = lr if lr is not None else float(plan.train.get("lr", defaults["lr_peft"]))
    epochs = epochs if epochs is not None else int(defaults["epochs"])
    lr = lr if lr is not None else float(defaults["lr_full" if plan.full_ft else "lr_peft"])
    return epochs, lr


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
    protocol=None,
    fold: int = 0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    on_epoch: Callable[[EpochResult], None] | None = None,
    crops_per_volume: int = 1,
) -> FinetuneResult:
    """Fine-tune ``model`` on ``target`` and score it on the target's held-out subjects.

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
        seed: seeds the split and the crops. Defaults to 0.
        device: where to train.
        progress: show a progress bar.
        on_epoch: called after each epoch.
        crops_per_volume: random crops per training volume and epoch. Defaults to 1.
    """
    from autopeft.data import Protocol, eval_volumes, split_scanner, train_loader

    device = torch.device(device)
    protocol = protocol or Protocol()
    splits = split_scanner(manifest, str(target), purpose="finetune", protocol=protocol, fold=fold, seed=seed)
    test = eval_volumes(splits["test"])
    crop = model.preset.crop_size
    model.to(device)
    trainable, total = prepare(model)
    history: list[dict[str, Any]] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if epochs > 0 and trainable > 0:
        torch.manual_seed(seed)
        loader = train_loader(
            splits["train"], crop_size=crop, batch_size=model.preset.batch_size, seed=seed,
            crops_per_volume=crops_per_volume,
        )
        trainer = Trainer(model, TrainSettings(epochs=epochs, lr=lr), device=device)
        bar = tqdm(total=epochs, desc=f"fine-tune {method} on scanner {target}", disable=not progress, unit="epoch")

        def record(result: EpochResult) -> None:
            history.append({"epoch": result.epoch, "loss": result.loss, "seconds": result.seconds})
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.4f}")
            if on_epoch is not None:
                on_epoch(result)

        started = time.perf_counter()
        trainer.fit(loader, on_epoch=record)
        bar.close()
        seconds_per_epoch = (time.perf_counter() - started) / epochs
    else:
        seconds_per_epoch = 0.0
    scores = evaluate(model, test, roi_size=crop, device=device)
    return FinetuneResult(
        method=method,
        target=str(target),
        metrics=scores,
        identity=evaluate_identity(test),
        trainable=trainable,
        total=total,
        seconds_per_epoch=seconds_per_epoch,
        peak_memory_mb=_peak_memory_mb(device),
        history=history,
    )
