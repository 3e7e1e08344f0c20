"""BIDS-PET in and out: simulate --bids, data --bids (pybids), and one clear error per problem."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from autopeft.cli import main
from autopeft.data import read_manifest, simulate
from autopeft.data.bids import derive_pairs, parse_window, write_dataset_files, write_pet_scan
from autopeft.errors import ConfigError, DataError

AFFINE = np.diag([2.0, 2.0, 2.5, 1.0])


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sim-bids") / "sim"
    simulate(out, subjects=2, size=16, scanners="1,2", bids=True, progress=False)
    return out


def _sidecar(**changes) -> dict:
    sidecar = {"ManufacturersModelName": "HRRT", "Manufacturer": "Siemens", "InjectionStart": 0,
               "FrameTimesStart": [1800, 2100, 2400], "FrameDuration": [300, 300, 300], "ReconMethodName": "OP-OSEM"}
    sidecar.update(changes)
    return {k: v for k, v in sidecar.items() if v is not None}


def _dataset(root: Path, scans: dict[str, tuple[np.ndarray, dict | None]]) -> Path:
    """A BIDS-PET dataset with one scan per subject label: (voxels, sidecar or None for none)."""
    write_dataset_files(root, name="test", participants=list(scans), readme="test")
    for label, (voxels, sidecar) in scans.items():
        rel = f"sub-{label}/pet/sub-{label}_trc-FDG_pet.nii.gz"
        write_pet_scan(root, rel, voxels, AFFINE, sidecar or {}, 300.0)
        if sidecar is None:
            (root / rel.replace(".nii.gz", ".json")).unlink()
    return root


def _frames(n: int = 3, shape=(6, 5, 4)) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.random((*shape, n)) + 0.5).astype(np.float32) * np.arange(1, n + 1, dtype=np.float32)


def test_simulated_bids_has_a_valid_layout_one_session_per_scanner(simulated):
    from bids_validator import BIDSValidator

    ignored = [line.rstrip("/*").rstrip("*") for line in (simulated / ".bidsignore").read_text().split()]
    files = [p for p in simulated.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(simulated).parts)]
    bids_files = [p for p in files if not any(str(p.relative_to(simulated)).startswith(i) for i in ignored)]
    validator = BIDSValidator()
    invalid = [str(p.relative_to(simulated)) for p in bids_files if not validator.is_bids("/" + str(p.relative_to(simulated)))]
    assert not invalid
    pets = sorted(p.relative_to(simulated).as_posix() for p in bids_files if p.name.endswith("_pet.nii.gz"))
    assert len(pets) == 4 and all("/ses-scanner" in p for p in pets)
    image = nib.load(simulated / pets[0])
    assert image.ndim == 4 and image.shape[3] == 6
    sidecar = json.loads((simulated / pets[0].replace(".nii.gz", ".json")).read_text())
    assert sidecar["FrameDuration"] == [300.0] * 6 and sidecar["FrameTimesStart"][0] == 1800.0
    assert sidecar["ManufacturersModelName"] == "Siemens Biograph mCT class"


def test_derived_pairs_equal_the_simulators_own_short_and_long_scans(simulated, tmp_path, capsys):
    assert main(["data", "--bids", str(simulated), "--short", "0-5", "--long", "0-30", "--out", str(tmp_path / "d"), "--quiet"]) == 0
    assert "all files OK" in capsys.readouterr().out
    derived = read_manifest(tmp_path / "d")
    own = read_manifest(simulated)
    assert sorted(set(derived["scanner"])) == ["Siemens Biograph TruePoint class", "Siemens Biograph mCT class"]
    profiles = json.loads((tmp_path / "d" / "scanners.json").read_text())
    assert profiles["Siemens Biograph mCT class"]["matrix"] == [16, 16, 13]
    assert profiles["Siemens Biograph mCT class"]["recon"]["ReconMethodName"].startswith("OSEM")
    for row in derived.itertuples():
        twin = own[own["subject"] == "s" + row.subject[len("sub-s"):][0] + "-" + row.subject[len("sub-s") + 1:]].iloc[0]
        for column in ("short", "long"):
            mine, theirs = nib.load(getattr(row, column)), nib.load(twin[column])
            np.testing.assert_allclose(mine.get_fdata(), theirs.get_fdata(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(mine.affine, theirs.affine)
    # ADNI-style: after injection (frames 30-60 min), or by frame numbers: the same scans.
    derive_pairs(simulated, tmp_path / "inj", short=parse_window("30-35"), long=parse_window("30-60"),
                 reference="injection", progress=False)
    derive_pairs(simulated, tmp_path / "frames", short=parse_window("1", unit="frame"),
                 long=parse_window("1-6", unit="frame"), progress=False)
    for other in ("inj", "frames"):
        for a, b in zip(read_manifest(tmp_path / "d").itertuples(), read_manifest(tmp_path / other).itertuples()):
            assert np.array_equal(nib.load(a.long).get_fdata(), nib.load(b.long).get_fdata())


def test_the_long_scan_is_the_duration_weighted_mean_of_the_frames_in_its_window(tmp_path):
    frames = _frames(3)
    sidecar = _sidecar(FrameTimesStart=[0, 60, 180], FrameDuration=[60, 120, 300])
    root = _dataset(tmp_path / "bids", {"01": (frames, sidecar)})
    derive_pairs(root, tmp_path / "out", short=parse_window("0-1"), long=parse_window("0-8"), progress=False)
    row = read_manifest(tmp_path / "out").iloc[0]
    expected = (frames * np.array([60, 120, 300], dtype=np.float32)).sum(axis=3) / 480
    np.testing.assert_allclose(nib.load(row["long"]).get_fdata(), expected, rtol=1e-6)
    np.testing.assert_allclose(nib.load(row["short"]).get_fdata(), frames[..., 0])
    assert row["scanner"] == "HRRT" and row["subject"] == "sub-01"
    image = nib.load(row["short"])
    assert image.shape == (6, 5, 4) and np.allclose(image.affine, AFFINE)


@pytest.mark.parametrize(
    "scan, expected",
    [
        ((np.ones((6, 5, 4), np.float32), _sidecar()), r"sub-01_trc-FDG_pet.nii.gz: is 3D .* 4th dimension"),
        ((_frames(3), None), r"sub-01_trc-FDG_pet.nii.gz: no sidecar \(sub-01_trc-FDG_pet.json\)"),
        ((_frames(3), _sidecar(FrameDuration=[300, 300])), r"FrameDuration has 2 entries but the image has 3 frames"),
        ((_frames(3), _sidecar(FrameTimesStart=None)), r"sidecar field FrameTimesStart is missing"),
        ((_frames(3), _sidecar(FrameDuration=["5 min", 1, 2])), r"FrameDuration must be a list of numbers"),
        ((_frames(3), _sidecar(ManufacturersModelName=None)), r"ManufacturersModelName is missing"),
        ((_frames(3), _sidecar(FrameTimesStart=[0, 400, 700])), r"long window: .*cover only 0-[\d.]+ min with gaps"),
    ],
    ids=["3d", "no-sidecar", "durations-vs-4th-dim", "no-frame-starts", "bad-durations", "no-model-name", "gap"],
)
def test_each_problem_gets_its_own_message_naming_file_and_field(tmp_path, scan, expected):
    root = _dataset(tmp_path / "bids", {"01": scan})
    with pytest.raises(DataError, match=expected):
        derive_pairs(root, tmp_path / "out", short=parse_window("0-5"), long=parse_window("0-15"), progress=False)


def test_frames_not_covering_a_window_and_missing_injection_time_are_named(tmp_path):
    root = _dataset(tmp_path / "bids", {"01": (_frames(3), _sidecar(InjectionStart=None)),
                                        "02": (_frames(3), _sidecar())})
    with pytest.raises(DataError) as info:
        derive_pairs(root, tmp_path / "out", short=parse_window("0-5"), long=parse_window("0-30"), progress=False)
    text = str(info.value)  # both files' problems, one line each
    assert "2 problem(s)" in text and "sub-01" in text and "sub-02" in text and "cover only 0-15 min" in text
    with pytest.raises(DataError, match="sub-01_trc-FDG_pet.nii.gz: sidecar field InjectionStart is missing"):
        derive_pairs(root, tmp_path / "out", short=parse_window("30-35"), long=parse_window("30-45"),
                     reference="injection", progress=False)
    with pytest.raises(DataError, match="asks for frames 1-4 but the scan has 3 frame"):
        derive_pairs(root, tmp_path / "out", short=parse_window("1", unit="frame"), long=parse_window("1-4", unit="frame"),
                     progress=False)


def test_the_scanner_can_come_from_a_bids_entity(tmp_path):
    root = tmp_path / "bids"
    write_dataset_files(root, name="t", participants=["01"], readme="t")
    for rec in ("mct", "hrrt"):
        write_pet_scan(root, f"sub-01/pet/sub-01_trc-FDG_rec-{rec}_pet.nii.gz", _frames(3), AFFINE, _sidecar(), 300.0)
    with pytest.raises(DataError, match="appears on lines|has no BIDS entity"):
        derive_pairs(root, tmp_path / "out", short=parse_window("0-5"), long=parse_window("0-15"),
                     scanner_entity="acq", progress=False)
    derive_pairs(root, tmp_path / "out", short=parse_window("0-5"), long=parse_window("0-15"), scanner_entity="rec",
                 progress=False)
    assert sorted(read_manifest(tmp_path / "out")["scanner"]) == ["hrrt", "mct"]
    # Without the entity both scans are scanner HRRT: one subject twice, told apart by reconstruction.
    derive_pairs(root, tmp_path / "out2", short=parse_window("0-5"), long=parse_window("0-15"), progress=False)
    assert sorted(read_manifest(tmp_path / "out2")["subject"]) == ["sub-01_rec-hrrt", "sub-01_rec-mct"]


def test_bad_windows_and_options_are_config_errors(tmp_path):
    for text, unit in (("5-0", "min"), ("abc", "min"), ("5", "min"), ("0-2", "frame"), ("2.5", "frame")):
        with pytest.raises(ConfigError):
            parse_window(text, unit=unit)
    assert main(["data", "--bids", str(tmp_path), "--short", "0-5"]) == 2  # no --long
    assert main(["data", "--manifest", str(tmp_path), "--short", "0-5"]) == 2  # --short without --bids


def test_the_arguments_and_durations_are_checked_before_anything_is_written(tmp_path):
    windows = {"short": parse_window("0-5"), "long": parse_window("0-15"), "progress": False}
    with pytest.raises(DataError, match="no dataset_description.json"):
        derive_pairs(tmp_path, tmp_path / "out", **windows)
    root = _dataset(tmp_path / "bids", {"01": (_frames(3), _sidecar(FrameDuration=[300, 0, 300]))})
    with pytest.raises(ConfigError, match=r"--out .* is the BIDS dataset itself"):
        derive_pairs(root, root, **windows)
    with pytest.raises(ConfigError, match="--from must be"):
        derive_pairs(root, tmp_path / "out", reference="scan", **windows)
    with pytest.raises(DataError, match=r"FrameDuration must be positive, but is \[300.0, 0.0, 300.0\]"):
        derive_pairs(root, tmp_path / "out", **windows)
    assert not (tmp_path / "out").exists()
