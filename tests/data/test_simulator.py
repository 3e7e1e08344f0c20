"""Tests of the built-in PET simulator, its scanners, projector and the `autopeft simulate` command.

One tiny data set (size 24, two subjects per scanner) is simulated once per module and shared.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from autopeft import cli
from autopeft.data import simulator
from autopeft.data._projector import ParallelBeamProjector, osem
from autopeft.data.scanners import HEAD_CENTRE_MM, SCANNERS, scale_factor
from autopeft.errors import ConfigError

SIZE, SUBJECTS = 24, 2


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "data"
    manifest = simulator.simulate(out, subjects=SUBJECTS, size=SIZE, seed=0, progress=False)
    assert manifest == out / "manifest.csv"
    return out


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _files(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _no_simulation(*args, **kwargs):
    raise AssertionError("a scan was simulated although the data set was complete")


# --- outputs -------------------------------------------------------------------------------------


def test_manifest_has_exact_columns_relative_paths_and_distinct_subjects(sim_dir: Path) -> None:
    with open(sim_dir / "manifest.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert header == ["subject", "scanner", "short", "long"]
    rows = _rows(sim_dir)
    assert len(rows) == len(SCANNERS) * SUBJECTS
    assert sorted({r["scanner"] for r in rows}) == ["1", "2", "3", "4", "5"]
    assert len({r["subject"] for r in rows}) == len(rows)  # each scanner scans its own people
    for row in rows:
        assert re.fullmatch(rf"s{row['scanner']}-\d{{3}}", row["subject"])
        for column in ("short", "long"):
            assert not Path(row[column]).is_absolute()
            assert (sim_dir / row[column]).is_file()
        assert row["short"] != row["long"]


def test_nifti_files_are_float32_3d_on_the_profile_grid(sim_dir: Path) -> None:
    profiles = json.loads((sim_dir / "scanners.json").read_text())
    for row in _rows(sim_dir):
        profile = profiles[row["scanner"]]
        for column in ("short", "long"):
            image = nib.load(sim_dir / row[column])
            assert image.shape == tuple(profile["matrix"])
            assert image.get_data_dtype() == np.float32
            np.testing.assert_allclose(np.diag(image.affine)[:3], profile["spacing_mm"], rtol=1e-6)
            centre = image.affine @ np.array([*((np.array(image.shape) - 1) / 2.0), 1.0])
            np.testing.assert_allclose(centre[:3], HEAD_CENTRE_MM, atol=1e-4)
            data = np.asarray(image.dataobj)
            assert np.isfinite(data).all() and data.min() >= 0.0 and data.max() > 0.0


def test_scanners_json_describes_simulated_and_native_grids(sim_dir: Path) -> None:
    profiles = json.loads((sim_dir / "scanners.json").read_text())
    assert list(profiles) == ["1", "2", "3", "4", "5"]
    factor = scale_factor(SIZE)
    for scanner_id, profile in profiles.items():
        for field in ("name", "matrix", "spacing_mm", "fwhm_mm", "counts_per_frame", "recon", "assumptions"):
            assert field in profile, f"scanners.json[{scanner_id}] lacks {field}"
        native = SCANNERS[scanner_id]
        assert profile["native"]["matrix"] == list(native.matrix)
        np.testing.assert_allclose(profile["spacing_mm"], np.array(native.spacing_mm) * factor, rtol=1e-5)
        # FWHM scales with spacing, so resolution in voxels stays the native one.
        np.testing.assert_allclose(
            np.array(profile["fwhm_mm"]) / profile["spacing_mm"],
            np.array(native.fwhm_mm) / native.spacing_mm,
            rtol=1e-3,
        )
        assert profile["recon"]["iterations"] >= 1 and profile["recon"]["subsets"] >= 1
    assert profiles["1"]["matrix"][:2] == [SIZE, SIZE]
    spacing = {k: p["spacing_mm"] for k, p in profiles.items()}
    assert spacing["3"][0] == min(s[0] for s in spacing.values())  # finest in-plane ...
    assert spacing["3"][2] > spacing["3"][0] * 1.9  # ... with thick slices
    assert spacing["5"][0] == max(s[0] for s in spacing.values())
    resolution = {k: p["resolution_fwhm_mm"][0] for k, p in profiles.items()}
    assert resolution["5"] == max(resolution.values())


# --- physics -------------------------------------------------------------------------------------


def test_long_scan_beats_short_scan_by_a_realistic_margin(sim_dir: Path) -> None:
    summary = _summary(sim_dir)
    for scanner_id, row in summary["scanners"].items():
        gain = row["psnr_long_db"] - row["psnr_short_db"]
        # Six frames: noise std falls by sqrt(6), i.e. up to 7.8 dB.
        assert 4.0 < gain < 10.0, f"scanner {scanner_id}: long beats short by {gain:.2f} dB"
    for row in _rows(sim_dir):
        short = np.asarray(nib.load(sim_dir / row["short"]).dataobj)
        long = np.asarray(nib.load(sim_dir / row["long"]).dataobj)
        # Noise lives in the high frequencies: the long scan has less Laplacian energy (only a
        # little less behind the heaviest post-filters, hence the modest margin).
        assert np.mean(ndimage.laplace(short) ** 2) > 1.1 * np.mean(ndimage.laplace(long) ** 2)
        # Both estimate the same activity: means agree within a few percent.
        assert abs(short.mean() / long.mean() - 1.0) < 0.05


def _relative_gradient_per_mm(image: nib.Nifti1Image) -> float:
    data = np.asarray(image.dataobj, dtype=np.float64)
    gradients = np.gradient(data, *np.diag(image.affine)[:3])
    magnitude = np.sqrt(sum(g**2 for g in gradients))
    return float(magnitude.mean() / data.mean())


def test_lower_resolution_scanner_gives_smoother_images(sim_dir: Path) -> None:
    rows = _rows(sim_dir)
    sharpness = {
        scanner_id: np.mean(
            [
                _relative_gradient_per_mm(nib.load(sim_dir / r["long"]))
                for r in rows
                if r["scanner"] == scanner_id
            ]
        )
        for scanner_id in ("1", "5")
    }
    assert sharpness["5"] < 0.8 * sharpness["1"]


def test_grey_matter_is_hotter_than_white_matter(sim_dir: Path) -> None:
    for scanner_id, row in _summary(sim_dir)["scanners"].items():
        # The phantom's grey:white uptake is 4 (times a regional factor near 1).
        assert 2.5 < row["grey_white_reference"] < 6.0, scanner_id
        assert 2.0 < row["grey_white_long"] < 7.0, scanner_id


def test_grey_white_estimator_recovers_a_known_ratio() -> None:
    rng = np.random.default_rng(0)
    grey, white, other = (rng.uniform(0, 1, (6, 7, 8)).astype(np.float32) for _ in range(3))
    image = 8.0 * grey + 2.0 * white + 1.0 * other
    assert simulator._grey_white_uptake(image, [grey, white, other]) == pytest.approx(4.0, rel=1e-5)


def test_projector_back_projection_is_the_exact_adjoint() -> None:
    projector = ParallelBeamProjector(n_pixels=12, pixel_mm=2.0, n_views=18, n_subsets=3)
    rng = np.random.default_rng(1)
    image = rng.uniform(size=(144, 4)).astype(np.float32)
    sinogram = rng.uniform(size=(projector.n_subsets * projector.rows_per_subset, 4)).astype(np.float32)
    lhs = float(np.sum(projector.forward(image) * sinogram))
    rhs = float(np.sum(image * projector.back(sinogram)))
    assert lhs == pytest.approx(rhs, rel=1e-5)
    # Line integrals in mm: every view of a uniform slice integrates its area in mm^2 / bin width.
    views = projector.forward(np.ones((144, 1), np.float32)).reshape(18, projector.n_bins).sum(axis=1)
    np.testing.assert_allclose(views, 144 * 2.0, rtol=1e-5)


def test_osem_recovers_a_noise_free_object() -> None:
    projector = ParallelBeamProjector(n_pixels=16, pixel_mm=1.0, n_views=24, n_subsets=4)
    yy, xx = np.mgrid[:16, :16]
    # Smooth, off-centre object: the projector's own ~1-pixel blur does not matter.
    blob = 3.0 * np.exp(-((xx - 7.5) ** 2 + (yy - 6.5) ** 2) / 18.0) + 0.5
    truth = blob.astype(np.float32).reshape(256, 1, 1)
    weights = np.full((projector.n_subsets * projector.rows_per_subset, 1), 50.0, np.float32)
    background = np.array([1.0], np.float32)
    counts = weights[:, None, :] * projector.forward(truth.reshape(256, 1))[:, None, :] + background
    image = osem(projector, counts.astype(np.float32), weights, np.ones(1), background, iterations=30)
    error = np.abs(image[:, 0, 0] - truth[:, 0, 0]).mean() / truth.mean()
    assert error < 0.01


# --- determinism, cache, resume ------------------------------------------------------------------


def test_same_arguments_give_identical_bytes(sim_dir: Path, tmp_path: Path) -> None:
    again = simulator.simulate(tmp_path / "again", subjects=SUBJECTS, size=SIZE, seed=0, progress=False)
    assert _files(again.parent) == _files(sim_dir)


def test_other_seed_gives_other_data(sim_dir: Path, tmp_path: Path) -> None:
    other = simulator.simulate(
        tmp_path / "other", subjects=1, size=SIZE, seed=1, scanners="5", progress=False
    )
    path = "scanner5/s5-001_long.nii.gz"
    assert (other.parent / path).read_bytes() != (sim_dir / path).read_bytes()


def test_second_call_returns_cached_data_without_rewriting(
    sim_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = {p: p.stat().st_mtime_ns for p in sim_dir.rglob("*")}
    monkeypatch.setattr(simulator, "_simulate_scan", _no_simulation)
    assert simulator.is_simulated(sim_dir, subjects=SUBJECTS, size=SIZE, seed=0)
    manifest = simulator.simulate(sim_dir, subjects=SUBJECTS, size=SIZE, seed=0, progress=False)
    assert manifest == sim_dir / "manifest.csv"
    assert {p: p.stat().st_mtime_ns for p in sim_dir.rglob("*")} == before


def test_interrupted_run_resumes_and_matches_an_uninterrupted_one(
    sim_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "resumed"
    real = simulator._simulate_scan
    calls = {"n": 0}

    def interrupt_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(simulator, "_simulate_scan", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        simulator.simulate(out, subjects=SUBJECTS, size=SIZE, scanners="4,5", progress=False)
    assert not (out / "manifest.csv").exists()
    assert not simulator.is_simulated(out, subjects=SUBJECTS, size=SIZE, scanners="4,5")

    redone = []

    def count_calls(*args, **kwargs):
        redone.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(simulator, "_simulate_scan", count_calls)
    simulator.simulate(out, subjects=SUBJECTS, size=SIZE, scanners="4,5", progress=False)
    assert len(redone) == 2  # only the scans not finished before the interrupt
    for row in _rows(out):
        for column in ("short", "long"):
            # Seeds depend on (seed, scanner, subject) only: same bytes as the five-scanner run.
            assert (out / row[column]).read_bytes() == (sim_dir / row[column]).read_bytes()
    assert not list(out.rglob(".partial-*"))

    # A scan deleted from a finished set is noticed and only that scan is redone.
    (out / "scanner5/s5-002_long.nii.gz").unlink()
    redone.clear()
    simulator.simulate(out, subjects=SUBJECTS, size=SIZE, scanners="4,5", progress=False)
    assert len(redone) == 1
    path = "scanner5/s5-002_long.nii.gz"
    assert (out / path).read_bytes() == (sim_dir / path).read_bytes()


def test_builtin_data_lives_in_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOPEFT_CACHE", str(tmp_path / "cache"))
    manifest = simulator.builtin_data(subjects=1, size=16, progress=False)
    assert manifest.parent.parent == tmp_path / "cache"
    assert re.fullmatch(r"sim-[0-9a-f]{12}", manifest.parent.name)
    assert len(_rows(manifest.parent)) == 5
    monkeypatch.setattr(simulator, "_simulate_scan", _no_simulation)
    assert simulator.builtin_data(subjects=1, size=16, progress=False) == manifest


# --- bad arguments -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scanners": "1,7"}, r"scanners.*1, 2, 3, 4, 5.*1,7"),
        ({"scanners": ""}, r"scanners"),
        ({"size": 8}, r"`size` must be .* 16 to 192"),
        ({"size": 500}, r"`size`"),
        ({"subjects": 0}, r"`subjects` must be"),
        ({"seed": -1}, r"`seed` must be"),
    ],
)
def test_bad_arguments_are_rejected(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        simulator.simulate(tmp_path / "x", **{"subjects": 1, "size": 16, "progress": False, **kwargs})
    assert not (tmp_path / "x").exists()


def test_other_arguments_into_an_existing_simulation_are_refused(sim_dir: Path) -> None:
    with pytest.raises(ConfigError, match="other arguments"):
        simulator.simulate(sim_dir, subjects=SUBJECTS, size=SIZE, seed=3, progress=False)


def test_a_foreign_non_empty_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        simulator.simulate(tmp_path, subjects=1, size=16, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_profile_scaling_keeps_relative_resolution() -> None:
    coarse, fine = SCANNERS["5"].at_size(64), SCANNERS["3"].at_size(64)
    assert coarse.resolution_fwhm_mm[0] > fine.resolution_fwhm_mm[0]
    assert SCANNERS["1"].at_size(64).matrix == (64, 64, 53)
    with pytest.raises(ValueError, match="`size` must be at least"):
        SCANNERS["1"].at_size(4)


# --- command line --------------------------------------------------------------------------------


@pytest.fixture()
def simulate_command_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # Keep this test about `simulate`: other subcommands are tested in their own files.
    monkeypatch.setattr(cli, "_SUBCOMMANDS", {"simulate": cli._SUBCOMMANDS["simulate"]})


def test_cli_reports_cached_data_and_the_realism_table(
    sim_dir: Path, simulate_command_only: None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["simulate", "--out", str(sim_dir), "--subjects", str(SUBJECTS), "--size", str(SIZE), "--quiet"]
    status = cli.main(argv)
    out = capsys.readouterr().out
    assert status == 0
    assert "cached" in out and str(sim_dir / "manifest.csv") in out
    for scanner_id in "12345":
        assert re.search(rf"^{scanner_id}\s+\S.*\d+\.\d\d\s*$", out, flags=re.MULTILINE)


def test_cli_rejects_an_unknown_scanner(
    tmp_path: Path, simulate_command_only: None, capsys: pytest.CaptureFixture[str]
) -> None:
    status = cli.main(["simulate", "--out", str(tmp_path / "x"), "--scanners", "1,9"])
    assert status == 2
    assert "1, 2, 3, 4, 5" in capsys.readouterr().err
