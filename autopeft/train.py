"""Training loops: source pre-training and target fine-tuning.

Losses belong to the backbone (``Backbone.generator_loss``, and ``Backbone.discriminator_loss`` for
adversarial ones): L1 between the prediction and the long scan by default (UNETR); CVT-GAN's
adversarial loss as PETITE trains it. A discriminator trains during pre-training only; in
fine-tuning it stays frozen and only supplies the adversarial term.

Only parameters with ``requires_grad`` are optimised, so the same loop serves Full-FT and every
PEFT plan (``apply_plan`` decides what trains). BatchNorm layers whose scale does not train (frozen
layers, the frozen discriminator, BitFit's bias-only layers) stay in eval mode while training: their
running statistics are part of the pre-trained network, not of the plan, and letting them drift to
the target's crops cost CVT-GAN 2.2 dB on scanner 1 -> 5 before any weight moved (measured at lr ~0).

A run that must survive an interruption (source pre-training) hands ``Trainer.fit`` an
:class:`EpochCheckpoints`: after every epoch it writes the weights, the trainer's state, the history
and the best epoch by validation PSNR into one folder, and ``EpochCheckpoints.resume`` starts the
trainer again from the last finished epoch.

With ``TrainSettings.precision`` other than ``fp32`` the forward pass and the losses run under
``torch.autocast`` (:mod:`autopeft.precision`), and so does validation; float16 scales the losses
with one ``torch.amp.GradScaler`` for the generator's and the discriminator's optimisers, whose state
is part of the resume state.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autopeft.checkpoints import load_checkpoint, load_state, save_checkpoint, save_state
from autopeft.evaluation import evaluate
from autopeft.precision import Precision, autocast, check_precision

__all__ = ["TrainSettings", "EpochResult", "Trainer", "EpochCheckpoints", "NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run cannot continue."""


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings of one training run.

    Args:
        epochs: passes over the training volumes (one random crop per volume and pass).
        lr: AdamW learning rate. PETITE: 1e-3 for PEFT, 1e-4 for full training.
        weight_decay: AdamW weight decay. Defaults to 1e-4.
        train_discriminator: update the discriminator (pre-training only). Defaults to False.
        grad_clip: max gradient norm, 0 for none. Defaults to 1.0.
        precision: ``fp32``, or mixed precision in ``bf16`` or ``fp16`` (CUDA only; with loss
            scaling). Defaults to ``fp32``. ``autopeft.precision.amp_precision`` gives the one
            ``--amp`` picks for a device.
    """

    epochs: int
    lr: float
    weight_decay: float = 1e-4
    train_discriminator: bool = False
    grad_clip: float = 1.0
    # The dtype, not an on/off switch: the Trainer needs it (float16 alone needs a GradScaler, and a
    # CPU refuses it), and a run records which arithmetic it used.
    precision: Precision = "fp32"

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"`epochs` must be >= 0, but got {self.epochs}.")
        if not self.lr > 0:
            raise ValueError(f"`lr` must be > 0, but got {self.lr}.")
        check_precision(self.precision)  # the name; the Trainer checks it against its device


@dataclass
class EpochResult:
    """What one epoch produced: mean training loss, validation metrics (if evaluated), seconds."""

    epoch: int
    loss: float
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def _trainable(module: nn.Module | None) -> list[nn.Parameter]:
    if module is None:
        return []
    return [p for p in module.parameters() if p.requires_grad]


def _keep_frozen_norm_statistics(model: nn.Module) -> None:
    """Put every affine BatchNorm layer whose scale does not train in eval mode (module docstring)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine and not module.weight.requires_grad:
            module.eval()


class Trainer:
    """Trains a ``Backbone`` with its own losses (``generator_loss``, ``discriminator_loss``).

    Args:
        model: a ``autopeft.backbones.Backbone``; what trains is what has ``requires_grad``.
        settings: optimisation settings.
        device: where to train. Defaults to ``cpu``.

    Raises:
        ConfigError: ``settings.precision`` is ``fp16`` and ``device`` a CPU.
    """

    def __init__(self, model: nn.Module, settings: TrainSettings, *, device: torch.device | str = "cpu") -> None:
        check_precision(settings.precision, device)
        self.model = model.to(device)
        self.settings = settings
        self.device = torch.device(device)
        disc = getattr(model, "discriminator", None)
        self.discriminator: nn.Module | None = disc
        if settings.train_discriminator and disc is None:
            raise ValueError("`train_discriminator` needs a backbone with a discriminator.")
        if disc is not None:
            disc.requires_grad_(settings.train_discriminator)
        params = _trainable(model.net)
        if not params:
            raise ValueError("Nothing to train: no parameter of the network has requires_grad.")
        self.optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        self.disc_optimizer = (
            torch.optim.AdamW(_trainable(disc), lr=settings.lr, betas=(0.5, 0.999))
            if settings.train_discriminator
            else None
        )
        # Disabled (every call a pass-through) unless float16: bfloat16 has float32's range.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=settings.precision == "fp16")
        self.epoch = 0

    # One optimisation step ------------------------------------------------------------------
    def _discriminator_step(self, optimizer: torch.optim.Optimizer, short: torch.Tensor, long: torch.Tensor,
                            fake: torch.Tensor) -> None:
        with autocast(self.settings.precision, self.device):
            loss = self.model.discriminator_loss(short, long, fake.detach())
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)

    def step(self, batch: dict) -> float:
        """One optimisation step on a batch of ``short``/``long`` crops ``B x 1 x D x H x W``."""
        self.model.train()
        _keep_frozen_norm_statistics(self.model)
        short = batch["short"].to(self.device, non_blocking=True)
        long = batch["long"].to(self.device, non_blocking=True)
        with autocast(self.settings.precision, self.device):
            fake = self.model(short)
            loss = self.model.generator_loss(short, long, fake)
        if not torch.isfinite(loss):
            fp16 = " or train without mixed precision (float16 overflows where float32 does not)"
            raise NonFiniteLossError(
                f"Loss became {loss.item()} (not finite) at epoch {self.epoch + 1}: lower the learning rate "
                f"({self.settings.lr:g}), check the inputs for extreme values"
                f"{fp16 if self.settings.precision == 'fp16' else ''}."
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.settings.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], self.settings.grad_clip)
        self.scaler.step(self.optimizer)  # skipped when float16 gradients overflowed
        if self.disc_optimizer is not None:
            self._discriminator_step(self.disc_optimizer, short, long, fake)
        self.scaler.update()  # once per step, after every optimiser (PyTorch's AMP recipe)
        return float(loss.detach())

    # Epochs ---------------------------------------------------------------------------------
    def run_epoch(self, loader: Iterable[dict]) -> float:
        """One pass over ``loader``; returns the mean training loss."""
        losses = [self.step(batch) for batch in loader]
        self.epoch += 1
        return sum(losses) / max(len(losses), 1)

    def fit(
        self,
        loader: Iterable[dict],
        *,
        val_volumes: Sequence[dict] = (),
        roi_size: Sequence[int] | None = None,
        eval_every: int = 1,
        on_epoch: Callable[[EpochResult], None] | None = None,
        checkpoints: EpochCheckpoints | None = None,
    ) -> list[EpochResult]:
        """Train from ``self.epoch`` up to ``settings.epochs``.

        Args:
            loader: yields training batches (a fresh random crop per volume each pass).
            val_volumes: whole volumes scored every ``eval_every`` epochs and at the last.
            roi_size: sliding-window size for evaluation (the crop size).
            eval_every: evaluate every this many epochs. Defaults to 1.
            on_epoch: called after each epoch, after its checkpoint (reporting, progress).
            checkpoints: where every epoch is checkpointed (resume first with
                :meth:`EpochCheckpoints.resume`). Defaults to None (nothing is written).
        """
        if val_volumes and roi_size is None:
            raise ValueError("`roi_size` is required when `val_volumes` are given.")
        history: list[EpochResult] = []
        while self.epoch < self.settings.epochs:
            started = time.perf_counter()
            loss = self.run_epoch(loader)
            result = EpochResult(epoch=self.epoch, loss=loss)
            last = self.epoch == self.settings.epochs
            if val_volumes and (self.epoch % eval_every == 0 or last):
                result.metrics = evaluate(self.model, val_volumes, roi_size=roi_size, device=self.device,
                                          precision=self.settings.precision)
            result.seconds = time.perf_counter() - started
            history.append(result)
            if checkpoints is not None:
                checkpoints.save(self, result)
            if on_epoch is not None:
                on_epoch(result)
        return history

    # Resume state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Optimizer state, the float16 loss scaler's and epoch, for resuming (model weights are
        saved separately)."""
        state = {"epoch": self.epoch, "optimizer": self.optimizer.state_dict()}
        if self.disc_optimizer is not None:
            state["disc_optimizer"] = self.disc_optimizer.state_dict()
        if self.scaler.is_enabled():
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.disc_optimizer is not None and "disc_optimizer" in state:
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])
        if self.scaler.is_enabled() and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])


class EpochCheckpoints:
    """The per-epoch checkpoints of one :class:`Trainer` run, in one folder, to resume it.

    After every epoch :meth:`save` writes, each file atomically: ``last.safetensors`` (the weights),
    ``last.state`` (the trainer's optimizer state and epoch, the history, the best epoch) and, when
    the epoch is the best so far by validation PSNR, ``best.safetensors``. The names are part of
    the on-disk layout: folders that earlier autopeft versions left behind resume too.

    Args:
        folder: where the files go (it must exist).
        metadata: JSON metadata stored in every weights file (with ``epoch``, or ``best``, added).
    """

    def __init__(self, folder: str | os.PathLike, metadata: dict[str, Any]) -> None:
        folder = Path(folder)
        self.last_weights = folder / "last.safetensors"
        self.last_state = folder / "last.state"
        self.best_weights = folder / "best.safetensors"
        self.metadata = dict(metadata)
        # One row per finished epoch: epoch, loss, validation metrics (if scored), seconds.
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, float] | None = None  # the best epoch's metrics and its number

    def resume(self, trainer: Trainer) -> bool:
        """Put ``trainer`` (weights, optimizer state, epoch) and the history back at the last
        finished epoch, when the folder holds one. Returns whether it did."""
        if not (self.last_weights.exists() and self.last_state.exists()):
            return False
        load_checkpoint(trainer.model, self.last_weights)
        state = load_state(self.last_state)
        trainer.load_state_dict(state["trainer"])
        self.history, self.best = state["history"], state["best"]
        return True

    def save(self, trainer: Trainer, result: EpochResult) -> None:
        """Record the epoch ``result`` of ``trainer`` and write its files (``Trainer.fit`` calls it)."""
        self.history.append({"epoch": result.epoch, "loss": result.loss, **result.metrics, "seconds": result.seconds})
        if result.metrics and is_better(result.metrics, self.best):
            self.best = dict(result.metrics, epoch=result.epoch)
            save_checkpoint(trainer.model, self.best_weights, {**self.metadata, "best": self.best})
        save_checkpoint(trainer.model, self.last_weights, {**self.metadata, "epoch": result.epoch})
        save_state({"trainer": trainer.state_dict(), "history": self.history, "best": self.best}, self.last_state)

    def load_best(self, model: nn.Module) -> dict[str, float]:
        """Load the best epoch's weights into ``model``; returns that epoch's metrics and number.

        Raises:
            ValueError: no epoch was scored better than NaN yet (nothing to load).
        """
        if self.best is None:
            raise ValueError(f"No best epoch in {self.best_weights.parent}: no epoch was validated yet.")
        load_checkpoint(model, self.best_weights)
        return self.best

    def remove(self) -> None:
        """Delete the files, once the run's result is kept elsewhere."""
        for leftover in (self.last_weights, self.last_state, self.best_weights):
            leftover.unlink(missing_ok=True)


def is_better(candidate: dict[str, float], best: dict[str, float] | None, key: str = "psnr") -> bool:
    """Whether ``candidate`` beats ``best`` on ``key`` (higher is better; NaN never wins)."""
    value = candidate.get(key, float("nan"))
    if math.isnan(value):
        return False
    return best is None or value > best.get(key, -math.inf)
