"""MONAI pipelines that turn split records into training crops and whole evaluation volumes.

Both pipelines read NIfTI with nibabel (``LoadImaged``), put the channel first (a single-frame 4D
image becomes ``1 x D x H x W`` like a 3D one) and scale every volume on its own to [0, 1], as
PETITE normalises each reconstructed image to 0-1. Short and long scans are therefore compared in
shape, not in absolute counts: a long scan with 6x the counts of its short scan scales to the same
range.

The scale does not depend on noise: each volume is divided by the mean of its tissue, mapped to ``TISSUE_LEVEL``,
and clipped to [0, 1]. Tissue is where a 5^3 box-smoothed copy exceeds ``TISSUE_THRESHOLD`` of its
maximum: smoothing first keeps noise from deciding which voxels count. PETITE's min-max scale lets the hottest voxel set the scale; in a noisy 5-minute frame that
voxel is noise, so the short scan's tissue lands lower than the long scan's by a factor that
depends on the scanner's noise level, and a model learns that scanner-specific brightness factor
instead of the anatomy (measured: a model trained on scanner 1 brightened scanner 5 by 5% and fell
below the identity baseline there). Counting noise has zero mean, so the tissue mean of a short scan
matches its long scan's, and both land on the same scale.

Training (:func:`train_loader`) adds zero padding up to the crop size on any axis shorter than it
(``SpatialPadd``) and one random crop shared by the short and long scan of a record
(``RandSpatialCropd`` on both keys). Files are read and scaled once (``CacheDataset`` caches every
step before the random crop). Crops are reproducible: the data loader draws the transforms' seed
from a ``torch.Generator`` seeded with ``seed``, which also drives the shuffling, so no global
random state is touched.

Evaluation (:func:`eval_volumes`) returns whole scaled volumes for
``monai.inferers.sliding_window_inference`` with the training crop size as ``roi_size``; that
function pads volumes smaller than the window itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from autopeft.errors import DataError

__all__ = ["train_loader", "eval_volumes", "load_volume"]

_IMAGE_KEYS: list[str] = ["short", "long"]


def _check_records(records: Sequence[Mapping[str, Any]]) -> None:
    if len(records) == 0:
        raise ValueError("`records` must hold at least one record, but got an empty sequence.")
    for index, record in enumerate(records):
        missing = [key for key in _IMAGE_KEYS if key not in record]
        if missing:
            raise ValueError(
                f"`records[{index}]` must have the keys 'short' and 'long' (scan paths), but lacks "
                f"{', '.join(missing)}."
            )


def _check_crop_size(crop_size: Sequence[int]) -> tuple[int, int, int]:
    values = tuple(crop_size)
    if len(values) != 3 or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in values
    ):
        raise ValueError(f"`crop_size` must be three positive integers (D, H, W), but got {crop_size!r}.")
    return tuple(int(v) for v in values)  # type: ignore[return-value]


# Tissue-mean scaling (module docstring). Part of PIPELINE_VERSION: change them together.
TISSUE_THRESHOLD = 0.2
TISSUE_LEVEL = 0.3
# Bumped whenever what a model sees for a given file changes, so cached models are not reused.
PIPELINE_VERSION = 3


def tissue_scale(volume: torch.Tensor) -> torch.Tensor:
    """The factor :func:`scale_by_tissue_mean` multiplies ``volume`` by: ``TISSUE_LEVEL / mean(tissue)``
    (a 0-d tensor). Dividing a [0, 1] prediction by it returns the volume's own units."""
    volume = torch.as_tensor(volume, dtype=torch.float32)
    bad = int((~torch.isfinite(volume)).sum())
    if bad:
        raise DataError(f"the volume holds {bad} of {volume.numel()} voxels that are NaN or infinite; "
                        "replace them (e.g. with 0) before using it.")
    spatial = volume.reshape(1, 1, *volume.shape[-3:])
    side = min(5, *(n if n % 2 else n - 1 for n in spatial.shape[-3:]))  # odd, fits the volume
    smooth = torch.nn.functional.avg_pool3d(spatial, side, stride=1, padding=side // 2, count_include_pad=False)
    top = smooth.max()
    tissue = spatial[smooth > TISSUE_THRESHOLD * top]
    if top <= 0 or tissue.numel() == 0:
        raise DataError("the volume has no positive tissue to scale by (its values are all 0 or below); is it empty?")
    return TISSUE_LEVEL / tissue.mean()


def scale_by_tissue_mean(volume: torch.Tensor) -> torch.Tensor:
    """``volume / mean(tissue) * TISSUE_LEVEL`` clipped to [0, 1] (module docstring).

    Written here because MONAI's intensity transforms scale by extremes, percentiles or the
    standard deviation, all of which move with the noise level.
    """
    volume = torch.as_tensor(volume, dtype=torch.float32)
    return (volume * tissue_scale(volume)).clamp_(0.0, 1.0)


def _load_and_scale() -> list[Any]:
    """The deterministic head shared by training and evaluation: read, channel first, scale to [0, 1]."""
    from monai import transforms

    return [
        transforms.LoadImaged(keys=_IMAGE_KEYS, reader="NibabelReader", image_only=True, dtype=np.float32),
        transforms.EnsureChannelFirstd(keys=_IMAGE_KEYS),
        transforms.Lambdad(keys=_IMAGE_KEYS, func=scale_by_tissue_mean),
    ]


def train_loader(
    records: Sequence[Mapping[str, Any]],
    *,
    crop_size: Sequence[int],
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    shuffle: bool = True,
    crops_per_volume: int = 1,
) -> torch.utils.data.DataLoader:
    """A loader of random paired crops for training.

    Each epoch visits every record once (shuffled) and yields dicts with ``"short"`` and ``"long"``
    float32 tensors ``B x 1 x D x H x W`` (D, H, W = ``crop_size``) in [0, 1], cropped at the same
    place, plus the records' other keys as lists (e.g. ``"subject"``). Two loaders built with the
    same records and seed yield the same batches, epoch after epoch.

    Args:
        records: dicts with at least ``"short"`` and ``"long"`` NIfTI paths, e.g. a split from
            :func:`~autopeft.data.splits.split_scanner`.
        crop_size: crop ``D x H x W`` in voxels; volumes smaller along an axis are zero-padded.
        batch_size: crops per batch.
        seed: seeds the crops and the shuffling.
        num_workers: worker processes; 0 loads in the calling process. Defaults to 0.
        shuffle: visit records in a seeded random order each epoch. Defaults to True.
        crops_per_volume: random crops drawn from each volume per epoch (each at its own place).
            Defaults to 1.

    Returns:
        A ``monai.data.DataLoader``.

    Example:
        >>> loader = train_loader(splits["train"], crop_size=(32, 32, 32), batch_size=2, seed=0)  # doctest: +SKIP
        >>> next(iter(loader))["short"].shape  # doctest: +SKIP
        torch.Size([2, 1, 32, 32, 32])
    """
    _check_records(records)
    crop = _check_crop_size(crop_size)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, but got {batch_size!r}.")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"`num_workers` must be a non-negative integer, but got {num_workers!r}.")
    if isinstance(crops_per_volume, bool) or not isinstance(crops_per_volume, int) or crops_per_volume < 1:
        raise ValueError(f"`crops_per_volume` must be a positive integer, but got {crops_per_volume!r}.")

    from monai import data, transforms

    pipeline = transforms.Compose(
        [
            *_load_and_scale(),
            transforms.SpatialPadd(keys=_IMAGE_KEYS, spatial_size=crop, mode="constant"),
            # Dict transforms draw one crop position per call and apply it to every key.
            transforms.RandSpatialCropd(keys=_IMAGE_KEYS, roi_size=crop, random_size=False),
            # Plain tensors: metadata tracking costs time and nothing downstream reads it.
            transforms.EnsureTyped(keys=_IMAGE_KEYS, data_type="tensor", dtype=torch.float32, track_meta=False),
        ]
    )
    pipeline.set_random_state(seed=seed)
    dataset = data.CacheDataset(
        # A record listed k times gives k independent random crops per epoch.
        data=[dict(record) for record in records for _ in range(crops_per_volume)],
        transform=pipeline,
        progress=False,
        num_workers=1,
    )
    # monai's DataLoader reseeds the dataset's transforms from this generator (in the main process
    # when num_workers == 0, per worker and epoch otherwise), so crops follow `seed` alone.
    generator = torch.Generator().manual_seed(int(seed))
    return data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=generator,
    )


def eval_volumes(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Whole volumes for evaluation, scaled like the training crops.

    Args:
        records: dicts with at least ``"short"`` and ``"long"`` NIfTI paths.

    Returns:
        One dict per record, in order: its other keys unchanged, ``"short"`` and ``"long"`` as float32
        tensors ``1 x D x H x W`` in [0, 1], ``"short_path"``/``"long_path"`` (the input paths) and
        ``"affine"`` (4 x 4 numpy voxel-to-world matrix of the short scan, for saving predictions).

    Example:
        >>> from monai.inferers import sliding_window_inference
        >>> volume = eval_volumes(splits["test"])[0]  # doctest: +SKIP
        >>> pred = sliding_window_inference(volume["short"][None], (32, 32, 32), 4, model)  # doctest: +SKIP
    """
    _check_records(records)
    from monai import transforms

    pipeline = transforms.Compose(_load_and_scale())
    volumes: list[dict[str, Any]] = []
    for record in records:
        loaded = pipeline(dict(record))
        affine = np.asarray(loaded["short"].affine, dtype=np.float64)
        volume = {key: value for key, value in record.items() if key not in _IMAGE_KEYS}
        volume.update(
            short=loaded["short"].as_tensor().float(),
            long=loaded["long"].as_tensor().float(),
            short_path=str(record["short"]),
            long_path=str(record["long"]),
            affine=affine,
        )
        volumes.append(volume)
    return volumes


def load_volume(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Reads one NIfTI volume as it is stored (no scaling).

    Args:
        path: a NIfTI file; a 4D image with a single frame is squeezed to 3D.

    Returns:
        The voxels as a float32 array ``D x H x W`` and the 4 x 4 affine.

    Raises:
        DataError: the file is missing, unreadable or not 3D.
    """
    import nibabel as nib

    if not os.path.isfile(path):
        raise DataError(f"scan {path} does not exist. Check the path (relative paths are read from {os.getcwd()}).")
    try:
        image = nib.load(os.fspath(path))
        voxels = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as err:  # noqa: BLE001 - report any reader failure with its cause
        raise DataError(f"scan {path} cannot be read as NIfTI ({type(err).__name__}: {err}).") from err
    if voxels.ndim == 4 and voxels.shape[3] == 1:
        voxels = voxels[..., 0]
    if voxels.ndim != 3:
        raise DataError(f"scan {path} has shape {voxels.shape}; a 3D volume (D x H x W) is needed.")
    return voxels, np.asarray(image.affine, dtype=np.float64)
