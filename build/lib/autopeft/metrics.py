"""Image-quality metrics for 3D PET volumes: PSNR, SSIM and NRMSE, with PETITE's conventions.

All three take a prediction and a target of the same shape, ``B x 1 x D x H x W`` (also
``1 x D x H x W`` or ``D x H x W`` for one volume), compute the metric per volume over the whole
volume (no brain mask) and return the mean over the batch as a Python float. Metric conventions
differ between papers, so state these definitions beside any figure:

- **PSNR** = 10 log10(data_range^2 / MSE) with ``data_range = 1`` (the peak of data scaled to
  [0, 1]). Identical volumes give ``inf``. Computed by ``monai.metrics.PSNRMetric``.
- **SSIM** (Wang et al. 2004) fully in 3D: local means, variances and covariance over a uniform
  7 x 7 x 7 window, constants ``C1 = (0.01 L)^2`` and ``C2 = (0.03 L)^2`` with ``L`` the target's
  maximum (per volume), averaged over every position where the window fits inside the volume
  ("valid" region). Identical volumes give 1. Computed by ``monai.metrics.SSIMMetric`` with a
  uniform kernel. MONAI uses population (biased) variances; PETITE's code multiplied them by
  49/48, so its SSIM can differ from ours in about the third decimal. MONAI computes in float32,
  which costs up to ~1e-4 on low-contrast volumes far from zero (~1e-7 on typical ones).
- **NRMSE** = RMSE / (target.max - target.min), per volume. Identical volumes give 0. MONAI has no
  NRMSE, so it is written here by hand (two lines on top of the mean squared error).
"""

from __future__ import annotations

import torch

__all__ = ["psnr", "ssim", "nrmse"]


def _as_batch(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns both as float32 ``B x 1 x D x H x W``, accepting one volume without batch/channel axes."""
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise ValueError(
            f"`pred` and `target` must be torch tensors, but got {type(pred).__name__} and {type(target).__name__}."
        )
    if pred.shape != target.shape:
        raise ValueError(
            f"`pred` and `target` must have the same shape, but got {tuple(pred.shape)} and {tuple(target.shape)}."
        )
    if pred.ndim == 3:
        pred, target = pred[None, None], target[None, None]
    elif pred.ndim == 4:
        pred, target = pred[None], target[None]
    if pred.ndim != 5 or pred.shape[1] != 1:
        raise ValueError(
            "`pred` must be B x 1 x D x H x W, 1 x D x H x W or D x H x W, but got shape "
            f"{tuple(pred.shape)}."
        )
    return pred.detach().float(), target.detach().float()


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, averaged over the batch.

    Args:
        pred: predicted volumes ``B x 1 x D x H x W`` (or one volume ``1 x D x H x W`` / ``D x H x W``).
        target: reference volumes, same shape.
        data_range: the peak value; 1 for data scaled to [0, 1]. Defaults to 1.0.

    Returns:
        Mean PSNR; ``inf`` if any volume is reproduced exactly.

    Example:
        >>> target = torch.zeros(1, 1, 8, 8, 8)
        >>> round(psnr(target + 0.1, target), 3)
        20.0
    """
    if not data_range > 0:
        raise ValueError(f"`data_range` must be positive, but got {data_range}.")
    from monai.metrics import PSNRMetric

    pred, target = _as_batch(pred, target)
    per_volume = PSNRMetric(max_val=float(data_range), reduction="none")(pred, target)
    return float(per_volume.mean())


def ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    data_range: float | None = None,
    win_size: int = 7,
    k1: float = 0.01,
    k2: float = 0.03,
) -> float:
    """Structural similarity computed fully in 3D, averaged over the batch.

    Args:
        pred: predicted volumes ``B x 1 x D x H x W`` (or one volume ``1 x D x H x W`` / ``D x H x W``).
        target: reference volumes, same shape; every spatial size must be at least ``win_size``.
        data_range: the ``L`` of the stability constants. Defaults to each target volume's maximum
            (PETITE's convention).
        win_size: edge of the cubic uniform window. Defaults to 7.
        k1: luminance constant factor. Defaults to 0.01.
        k2: contrast constant factor. Defaults to 0.03.

    Returns:
        Mean SSIM, 1 for identical volumes.

    Example:
        >>> volume = torch.rand(1, 1, 9, 9, 9)
        >>> round(ssim(volume, volume), 6)
        1.0
    """
    if isinstance(win_size, bool) or not isinstance(win_size, int) or win_size < 2:
        raise ValueError(f"`win_size` must be an integer of at least 2, but got {win_size!r}.")
    if data_range is not None and not data_range > 0:
        raise ValueError(f"`data_range` must be positive, but got {data_range}.")
    pred, target = _as_batch(pred, target)
    if min(target.shape[2:]) < win_size:
        raise ValueError(
            f"every spatial size of `target` must be at least `win_size` ({win_size}), but got shape "
            f"{tuple(target.shape)}."
        )
    from monai.metrics import SSIMMetric

    values = []
    for pred_volume, target_volume in zip(pred, target):
        peak = float(target_volume.max()) if data_range is None else float(data_range)
        if not peak > 0:
            raise ValueError(
                f"`data_range` defaults to the target's maximum, which must be positive, but got {peak}; "
                "pass `data_range` explicitly."
            )
        metric = SSIMMetric(spatial_dims=3, data_range=peak, kernel_type="uniform", win_size=win_size, k1=k1, k2=k2)
        values.append(float(metric(pred_volume[None], target_volume[None]).mean()))
    return sum(values) / len(values)


def nrmse(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Root-mean-square error divided by the target's range, averaged over the batch.

    Args:
        pred: predicted volumes ``B x 1 x D x H x W`` (or one volume ``1 x D x H x W`` / ``D x H x W``).
        target: reference volumes, same shape; none may be constant.

    Returns:
        Mean NRMSE, 0 for identical volumes.

    Example:
        >>> target = torch.linspace(0, 1, 64).reshape(1, 1, 4, 4, 4)
        >>> round(nrmse(target + 0.5, target), 6)
        0.5
    """
    pred, target = _as_batch(pred, target)
    # Written by hand: MONAI has no NRMSE. Float64 keeps the mean exact enough for tiny errors.
    flat_pred, flat_target = pred.flatten(1).double(), target.flatten(1).double()
    rmse = (flat_pred - flat_target).pow(2).mean(dim=1).sqrt()
    spread = flat_target.amax(dim=1) - flat_target.amin(dim=1)
    if bool((spread <= 0).any()):
        raise ValueError("`target` must not hold a constant volume, because NRMSE divides by its range (max - min).")
    return float((rmse / spread).mean())
