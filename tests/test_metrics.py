from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from autopeft.metrics import nrmse, psnr, ssim

# ---------------------------------------------------------------- independent references (numpy/scipy)


def _ref_psnr(pred: np.ndarray, target: np.ndarray, data_range: float = 1.0) -> float:
    return float(10 * np.log10(data_range**2 / np.mean((pred - target) ** 2)))


def _ref_ssim(
    pred: np.ndarray,
    target: np.ndarray,
    win: int = 7,
    k1: float = 0.01,
    k2: float = 0.03,
    data_range: float | None = None,
) -> float:
    """Wang et al. SSIM with scipy's uniform filter, population variances, valid region only."""
    x, y = pred.astype(np.float64), target.astype(np.float64)
    peak = float(y.max()) if data_range is None else data_range
    c1, c2 = (k1 * peak) ** 2, (k2 * peak) ** 2

    def mean(a: np.ndarray) -> np.ndarray:
        return ndimage.uniform_filter(a, size=win)

    mx, my = mean(x), mean(y)
    vx, vy, cxy = mean(x * x) - mx * mx, mean(y * y) - my * my, mean(x * y) - mx * my
    index = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    half = win // 2
    valid = tuple(slice(half, size - half) for size in x.shape)  # windows wholly inside the volume
    return float(index[valid].mean())


def _ref_nrmse(pred: np.ndarray, target: np.ndarray) -> float:
    return float(np.sqrt(np.mean((pred - target) ** 2)) / (target.max() - target.min()))


def _pair(
    seed: int, shape: tuple[int, ...] = (2, 1, 12, 11, 10), noise: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    target = torch.rand(shape, generator=generator)
    pred = (target + noise * torch.randn(shape, generator=generator)).clamp(0, 1)
    return pred, target


# ---------------------------------------------------------------- agreement with the references


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_independent_references_per_volume_then_batch_mean(seed: int) -> None:
    pred, target = _pair(seed)
    p, t = pred.numpy().astype(np.float64), target.numpy().astype(np.float64)
    assert psnr(pred, target) == pytest.approx(np.mean([_ref_psnr(p[i, 0], t[i, 0]) for i in range(2)]), abs=1e-4)
    assert ssim(pred, target) == pytest.approx(np.mean([_ref_ssim(p[i, 0], t[i, 0]) for i in range(2)]), abs=1e-5)
    assert nrmse(pred, target) == pytest.approx(np.mean([_ref_nrmse(p[i, 0], t[i, 0]) for i in range(2)]), rel=1e-6)


def test_ssim_uses_each_targets_own_maximum_as_data_range() -> None:
    # Low contrast, where the stability constants (and so the data range) weigh on the result.
    generator = torch.Generator().manual_seed(4)
    target = 0.5 + 0.02 * torch.rand(2, 1, 10, 10, 10, generator=generator)
    target[1] *= 3.0  # a different peak for the second volume
    pred = target + 0.01 * torch.randn(2, 1, 10, 10, 10, generator=generator)
    p, t = pred.numpy().astype(np.float64), target.numpy().astype(np.float64)
    expected = np.mean([_ref_ssim(p[i, 0], t[i, 0], data_range=float(t[i, 0].max())) for i in range(2)])
    # MONAI computes in float32; variances this small next to means this large lose ~1e-4 to it.
    assert ssim(pred, target) == pytest.approx(expected, abs=5e-4)
    explicit = np.mean([_ref_ssim(p[i, 0], t[i, 0], data_range=1.0) for i in range(2)])
    assert ssim(pred, target, data_range=1.0) == pytest.approx(explicit, abs=5e-4)
    assert abs(explicit - expected) > 1e-2  # the two conventions really differ here


def test_ssim_window_and_constants_are_honoured() -> None:
    pred, target = _pair(5, shape=(1, 1, 11, 11, 11))
    p, t = pred[0, 0].double().numpy(), target[0, 0].double().numpy()
    expected = _ref_ssim(p, t, win=5, k1=0.02, k2=0.05)
    assert ssim(pred, target, win_size=5, k1=0.02, k2=0.05) == pytest.approx(expected, abs=1e-5)
    assert ssim(pred, target, win_size=5) != pytest.approx(ssim(pred, target), abs=1e-4)


def test_psnr_data_range_and_known_value() -> None:
    target = torch.zeros(1, 1, 8, 8, 8)
    assert psnr(target + 0.1, target) == pytest.approx(20.0, abs=1e-4)  # 10 log10(1 / 0.01)
    assert psnr(target + 0.1, target, data_range=10.0) == pytest.approx(40.0, abs=1e-4)


def test_nrmse_known_value() -> None:
    target = torch.linspace(0.0, 2.0, 125).reshape(5, 5, 5)
    assert nrmse(target + 0.5, target) == pytest.approx(0.25)  # RMSE 0.5 over range 2


# ---------------------------------------------------------------- identical inputs


@pytest.mark.parametrize("shape", [(9, 8, 7), (1, 9, 8, 7), (3, 1, 9, 8, 7)])
def test_identical_volumes_are_perfect_in_every_accepted_shape(shape: tuple[int, ...]) -> None:
    volume = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    assert psnr(volume, volume) == math.inf
    assert ssim(volume, volume) == pytest.approx(1.0, abs=1e-6)
    assert nrmse(volume, volume) == 0.0


def test_one_volume_without_batch_axes_equals_the_batched_call() -> None:
    pred, target = _pair(6, shape=(1, 1, 9, 9, 9))
    for metric in (psnr, ssim, nrmse):
        assert metric(pred[0, 0], target[0, 0]) == pytest.approx(metric(pred, target))
        assert metric(pred[0], target[0]) == pytest.approx(metric(pred, target))


def test_worse_prediction_scores_worse() -> None:
    target = _pair(7)[1]
    slightly, badly = _pair(7, noise=0.02)[0], _pair(7, noise=0.3)[0]
    assert psnr(slightly, target) > psnr(badly, target)
    assert ssim(slightly, target) > ssim(badly, target)
    assert nrmse(slightly, target) < nrmse(badly, target)


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: psnr(torch.rand(8, 8, 8), torch.rand(8, 8, 9)), "must have the same shape"),
        (lambda: psnr(torch.rand(2, 2, 8, 8, 8), torch.rand(2, 2, 8, 8, 8)), r"must be B x 1 x D x H x W"),
        (lambda: nrmse(torch.rand(8, 8), torch.rand(8, 8)), r"must be B x 1 x D x H x W"),
        (lambda: psnr(np.zeros((8, 8, 8)), torch.rand(8, 8, 8)), "must be torch tensors"),
        (lambda: psnr(torch.rand(8, 8, 8), torch.rand(8, 8, 8), data_range=0), "`data_range` must be positive"),
        (lambda: ssim(torch.rand(8, 8, 6), torch.rand(8, 8, 6)), "at least `win_size` \\(7\\)"),
        (lambda: ssim(torch.rand(8, 8, 8), torch.zeros(8, 8, 8)), "pass `data_range` explicitly"),
        (lambda: ssim(torch.rand(8, 8, 8), torch.rand(8, 8, 8), win_size=1), "`win_size` must be an integer"),
        (lambda: nrmse(torch.rand(8, 8, 8), torch.ones(8, 8, 8)), "must not hold a constant volume"),
    ],
)
def test_bad_arguments_raise_value_error(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
