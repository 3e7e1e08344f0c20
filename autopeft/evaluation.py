"""Whole-volume evaluation by sliding-window inference.

Every figure autopeft reports comes from here: the model sees each held-out short scan whole
(through MONAI's sliding-window inferer, windows of the preset's crop size) and is scored against
the long scan with ``autopeft.metrics`` (PSNR with peak 1 on [0, 1] data, 3D SSIM, NRMSE).
With mixed precision (``precision``, :mod:`autopeft.precision`) the network runs under autocast;
its prediction is cast to float32 before it is scored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.inferers import sliding_window_inference

from autopeft import metrics
from autopeft.precision import autocast

__all__ = ["evaluate", "evaluate_identity", "evaluate_subjects", "mean_scores", "predict_volume"]

METRICS: dict[str, Callable[[torch.Tensor, torch.Tensor], float]] = {
    "psnr": metrics.psnr,
    "ssim": metrics.ssim,
    "nrmse": metrics.nrmse,
}


@torch.no_grad()
def predict_volume(
    model: torch.nn.Module,
    short: torch.Tensor,
    *,
    roi_size: Sequence[int],
    overlap: float = 0.25,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> torch.Tensor:
    """Predict a whole volume.

    Args:
        model: maps ``B x 1 x d x h x w`` windows to the same shape.
        short: ``1 x D x H x W`` or ``B x 1 x D x H x W`` short scan in [0, 1].
        roi_size: window size, the preset's crop size.
        overlap: window overlap fraction. Defaults to 0.25.
        device: where the model runs. Defaults to ``cpu``.
        precision: ``fp32``, or ``bf16`` / ``fp16`` to run the network under autocast. Defaults to ``fp32``.

    Returns:
        The prediction, same shape as ``short``, in float32 on the CPU.
    """
    batched = short if short.ndim == 5 else short.unsqueeze(0)
    with autocast(precision, device):
        pred = sliding_window_inference(
            batched.to(device),
            roi_size=tuple(roi_size),
            sw_batch_size=4,
            predictor=model,
            overlap=overlap,
            mode="gaussian",
            padding_mode="constant",
        )
    pred = pred.float().cpu()  # scored in float32 whatever the network computed in
    return pred if short.ndim == 5 else pred.squeeze(0)


def _score_one(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    return {name: fn(pred.unsqueeze(0), target.unsqueeze(0)) for name, fn in METRICS.items()}


def mean_scores(rows: Sequence[dict]) -> dict[str, float]:
    """Mean of each metric over per-volume score rows (as :func:`evaluate_subjects` returns)."""
    if not rows:
        raise ValueError("`volumes` must hold at least one volume, but got none.")
    return {name: sum(row[name] for row in rows) / len(rows) for name in METRICS}


def evaluate_subjects(
    model: torch.nn.Module,
    volumes: Sequence[dict],
    *,
    roi_size: Sequence[int],
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> list[dict]:
    """PSNR / SSIM / NRMSE of ``model`` on each whole volume.

    Args:
        model: the image-to-image network (switched to eval mode here, and back afterwards).
        volumes: dicts with ``short`` and ``long`` tensors ``1 x D x H x W`` in [0, 1] (and
            ``subject``, when known).
        roi_size: sliding-window size.
        device: where the model runs.
        precision: as :func:`predict_volume`. Defaults to ``fp32``.

    Returns:
        One row per volume, in order: ``{"subject", "psnr", "ssim", "nrmse"}``.
    """
    was_training = model.training
    model.eval()
    try:
        return [
            {"subject": str(v.get("subject", index)),
             **_score_one(predict_volume(model, v["short"], roi_size=roi_size, device=device,
                                         precision=precision).clamp(0, 1), v["long"])}
            for index, v in enumerate(volumes)
        ]
    finally:
        model.train(was_training)


def evaluate(
    model: torch.nn.Module,
    volumes: Sequence[dict],
    *,
    roi_size: Sequence[int],
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> dict[str, float]:
    """Mean PSNR / SSIM / NRMSE of ``model`` over whole volumes (:func:`evaluate_subjects`)."""
    return mean_scores(evaluate_subjects(model, volumes, roi_size=roi_size, device=device, precision=precision))


def evaluate_identity(volumes: Sequence[dict]) -> dict[str, float]:
    """Scores of the identity baseline: the short scan itself taken as the prediction."""
    return mean_scores([_score_one(v["short"], v["long"]) for v in volumes])
