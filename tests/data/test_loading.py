from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from _fakes import AFFINE, SHAPE, make_dataset, write_volume

from autopeft.data.loading import eval_volumes, load_volume, train_loader
from autopeft.data.manifest import read_manifest
from autopeft.errors import DataError


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    """Four subjects whose long scan is 2 x the short one (12 x 10 x 8 voxels)."""
    manifest = make_dataset(tmp_path_factory.mktemp("loading"), {"1": 4})
    frame = read_manifest(manifest)
    return [{key: row[key] for key in ("subject", "scanner", "short", "long")} for _, row in frame.iterrows()]


def _batches(loader: torch.utils.data.DataLoader, epochs: int = 1) -> list[dict]:
    return [batch for _ in range(epochs) for batch in loader]


def test_train_loader_yields_paired_unit_range_crops(records: list[dict[str, str]]) -> None:
    loader = train_loader(records, crop_size=(6, 5, 4), batch_size=2, seed=0)
    batches = _batches(loader)
    assert len(batches) == 2
    for batch in batches:
        for key in ("short", "long"):
            assert type(batch[key]) is torch.Tensor  # plain tensors, not MetaTensors
            assert batch[key].shape == (2, 1, 6, 5, 4)
            assert batch[key].dtype == torch.float32
            assert 0.0 <= float(batch[key].min()) and float(batch[key].max()) <= 1.0
        # long = 2 x short before per-volume scaling, so the same crop scales to the same values.
        torch.testing.assert_close(batch["short"], batch["long"])
        assert len(batch["subject"]) == 2
    assert sorted(s for batch in batches for s in batch["subject"]) == sorted(r["subject"] for r in records)


def test_crops_come_from_scaled_volumes_at_varying_places(records: list[dict[str, str]]) -> None:
    whole = {v["subject"]: v["short"][0] for v in eval_volumes(records)}
    offsets = set()
    for batch in _batches(train_loader(records, crop_size=(6, 5, 4), batch_size=1, seed=5), epochs=3):
        crop, volume = batch["short"][0, 0], whole[batch["subject"][0]]
        found = [
            (d, h, w)
            for d in range(SHAPE[0] - 5)
            for h in range(SHAPE[1] - 4)
            for w in range(SHAPE[2] - 3)
            if torch.equal(volume[d : d + 6, h : h + 5, w : w + 4], crop)
        ]
        assert len(found) == 1  # the crop is a window of the scaled volume
        offsets.add(found[0])
    assert len(offsets) > 1  # random, not always the same corner


def test_tissue_scale_ignores_zero_mean_noise() -> None:
    from autopeft.data.loading import scale_by_tissue_mean

    rng = np.random.default_rng(0)
    clean = np.zeros((40, 40, 40), np.float32)
    clean[10:30, 10:30, 10:30] = 1.0
    clean[15:25, 15:25, 15:25] = 3.0
    short = torch.from_numpy(rng.poisson(clean * 20).astype(np.float32))  # noisy, 20 counts per unit
    long = torch.from_numpy(rng.poisson(clean * 120).astype(np.float32))  # six times the counts
    mean_short = scale_by_tissue_mean(short)[clean > 0].mean()
    mean_long = scale_by_tissue_mean(long)[clean > 0].mean()
    assert abs(float(mean_short / mean_long) - 1) < 0.02  # same brightness whatever the noise
    top_scaled = [float(v.max() / np.quantile(v.numpy(), 0.999)) for v in (short, long)]
    assert top_scaled[0] != top_scaled[1]  # a max-based scale would have differed


def test_empty_volume_cannot_be_scaled() -> None:
    from autopeft.data.loading import scale_by_tissue_mean

    with pytest.raises(DataError, match="no positive tissue"):
        scale_by_tissue_mean(torch.zeros(8, 8, 8))


def test_several_crops_per_volume_each_epoch(records: list[dict[str, str]]) -> None:
    batches = _batches(train_loader(records, crop_size=(6, 5, 4), batch_size=1, seed=3, crops_per_volume=3))
    subjects = [batch["subject"][0] for batch in batches]
    assert sorted(subjects) == sorted(r["subject"] for r in records for _ in range(3))
    first = [batch["short"] for batch in batches if batch["subject"][0] == records[0]["subject"]]
    assert len({tuple(c.flatten()[:20].tolist()) for c in first}) > 1  # independent places


def test_same_seed_same_batches_other_seed_other_crops(records: list[dict[str, str]]) -> None:
    def run(seed: int) -> list[dict]:
        return _batches(train_loader(records, crop_size=(6, 5, 4), batch_size=2, seed=seed), epochs=2)

    torch.manual_seed(123)  # global state must not matter
    first = run(7)
    torch.manual_seed(456)
    again = run(7)
    for a, b in zip(first, again, strict=True):
        assert a["subject"] == b["subject"]
        torch.testing.assert_close(a["short"], b["short"])
    assert any(not torch.equal(a["short"], b["short"]) for a, b in zip(first[:2], first[2:]))  # epochs differ
    other = run(8)
    assert any(not torch.equal(a["short"], b["short"]) for a, b in zip(first, other))


def test_volumes_smaller_than_the_crop_are_zero_padded(records: list[dict[str, str]]) -> None:
    batch = next(iter(train_loader(records, crop_size=(16, 10, 8), batch_size=4, seed=0, shuffle=False)))
    assert batch["short"].shape == (4, 1, 16, 10, 8)
    # The 12 voxels along D sit somewhere inside the 16: exactly 4 slices of zero padding remain.
    scaled = eval_volumes(records)[0]["short"][0]
    crop = batch["short"][0, 0]
    start = next(d for d in range(5) if torch.equal(crop[d : d + 12], scaled))
    assert float(crop[:start].abs().sum()) == 0.0 and float(crop[start + 12 :].abs().sum()) == 0.0


def test_single_frame_4d_scans_load_as_3d(tmp_path: Path, records: list[dict[str, str]]) -> None:
    voxels, affine = load_volume(records[0]["long"])
    four_d = write_volume(tmp_path / "four_d.nii.gz", voxels[..., None], affine)
    record = {**records[0], "long": str(four_d)}
    volume = eval_volumes([record])[0]
    assert volume["long"].shape == (1, *SHAPE)
    batch = next(iter(train_loader([record], crop_size=(4, 4, 4), batch_size=1, seed=0)))
    assert batch["long"].shape == (1, 1, 4, 4, 4)


def test_eval_volumes_are_whole_scaled_and_keep_metadata(records: list[dict[str, str]]) -> None:
    volumes = eval_volumes(records[:2])
    assert [v["subject"] for v in volumes] == [r["subject"] for r in records[:2]]
    for volume, record in zip(volumes, records):
        raw, _ = load_volume(record["short"])
        # Tissue (box-smoothed 5^3 above 20% of its max) scaled to a mean of 0.3, clipped to [0, 1].
        from scipy.ndimage import uniform_filter

        counts = uniform_filter(np.ones_like(raw), 5, mode="constant")
        smooth = uniform_filter(raw, 5, mode="constant") / counts
        tissue = raw[smooth > 0.2 * smooth.max()]
        expected = np.clip(raw * (0.3 / tissue.mean()), 0.0, 1.0)
        assert volume["short"].shape == (1, *SHAPE)
        np.testing.assert_allclose(volume["short"][0].numpy(), expected, atol=1e-5)
        torch.testing.assert_close(volume["short"], volume["long"])
        assert volume["short_path"] == record["short"] and volume["scanner"] == "1"
        np.testing.assert_allclose(volume["affine"], nib.load(record["short"]).affine)


def test_load_volume_reads_raw_values(records: list[dict[str, str]]) -> None:
    voxels, affine = load_volume(records[0]["long"])
    short, _ = load_volume(records[0]["short"])
    assert voxels.shape == SHAPE and voxels.dtype == np.float32
    np.testing.assert_allclose(voxels, 2 * short, rtol=1e-6)
    np.testing.assert_allclose(affine, AFFINE)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "does not exist"),
        ("garbage", "cannot be read as NIfTI"),
        ("two-frames", r"has shape \(12, 10, 8, 2\)"),
    ],
)
def test_load_volume_errors(tmp_path: Path, kind: str, message: str) -> None:
    path = tmp_path / "scan.nii.gz"
    if kind == "garbage":
        path.write_bytes(b"\x00" * 400)
    elif kind == "two-frames":
        write_volume(path, np.ones((*SHAPE, 2)))
    with pytest.raises(DataError, match=message):
        load_volume(path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"crop_size": (4, 4)}, "`crop_size` must be three positive integers"),
        ({"crop_size": (4, 0, 4)}, "`crop_size` must be three positive integers"),
        ({"batch_size": 0}, "`batch_size` must be a positive integer"),
        ({"num_workers": -1}, "`num_workers` must be a non-negative integer"),
        ({"crops_per_volume": 0}, "`crops_per_volume` must be a positive integer"),
    ],
)
def test_train_loader_rejects_bad_arguments(records: list[dict[str, str]], kwargs: dict, message: str) -> None:
    arguments = {"crop_size": (4, 4, 4), "batch_size": 1, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        train_loader(records, **arguments)


def test_records_must_name_both_scans() -> None:
    with pytest.raises(ValueError, match="`records` must hold at least one record"):
        eval_volumes([])
    with pytest.raises(ValueError, match=r"`records\[0\]` must have the keys 'short' and 'long'.*lacks long"):
        train_loader([{"short": "a.nii"}], crop_size=(4, 4, 4), batch_size=1, seed=0)
