from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _fakes import AFFINE, SHAPE, make_dataset, write_manifest, write_volume

from autopeft.data.manifest import check_scans, read_manifest, read_scanner_profiles
from autopeft.errors import DataError

HEADER = "subject,scanner,short,long"


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------- read_manifest


def test_round_trip_resolves_relative_paths_and_keeps_strings(tmp_path: Path) -> None:
    absolute_short = write_volume(tmp_path / "elsewhere" / "a_short.nii.gz", np.ones(SHAPE))
    rows = [
        {"subject": "001", "scanner": "01", "short": "s1/a.nii.gz", "long": "s1/b.nii.gz", "site": "Oslo"},
        {"subject": "002", "scanner": "1", "short": str(absolute_short), "long": "../x/c.nii.gz", "site": ""},
    ]
    manifest = write_manifest(tmp_path / "data" / "manifest.csv", rows)

    frame = read_manifest(manifest)

    assert list(frame.columns) == ["subject", "scanner", "short", "long", "site"]
    assert list(frame.index) == [2, 3]  # CSV line numbers: header is line 1
    assert list(frame["subject"]) == ["001", "002"]  # leading zeros survive: ids are strings
    assert list(frame["scanner"]) == ["01", "1"]
    assert frame.loc[2, "short"] == str(tmp_path / "data" / "s1" / "a.nii.gz")
    assert frame.loc[3, "short"] == str(absolute_short)
    assert frame.loc[3, "long"] == str(tmp_path / "x" / "c.nii.gz")
    assert all(os.path.isabs(p) for p in frame["long"])
    assert list(frame["site"]) == ["Oslo", ""]  # extra columns are kept, blanks allowed there
    assert frame.attrs["manifest"] == str(manifest)


def test_folder_means_its_manifest_and_blank_lines_keep_line_numbers(tmp_path: Path) -> None:
    _write_text(tmp_path / "manifest.csv", f"{HEADER}\n\nsub-1,A,a.nii,b.nii\n\nsub-2,A,c.nii,d.nii\n")
    frame = read_manifest(tmp_path)
    assert list(frame.index) == [3, 5]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(None, ["does not exist", "subject,scanner,short,long"], id="missing-file"),
        pytest.param("", ["is empty", "subject,scanner,short,long"], id="empty-file"),
        pytest.param(f"{HEADER}\n", ["no rows"], id="header-only"),
        pytest.param(
            "subject,short,extra\ns,a.nii,x\n",
            ["lacks the column(s) scanner, long", "'subject,short,extra'", "'subject,scanner,short,long'"],
            id="missing-columns",
        ),
        pytest.param(f"{HEADER}\ns1,A,a.nii,b.nii\ns2,A,,b2.nii\n", ["line 3", "column(s) short"], id="empty-cell"),
        pytest.param(f"{HEADER}\ns1,A,a.nii\n", ["line 2", "column(s) long"], id="short-row"),
        pytest.param(f"{HEADER}\ns1,A,a.nii,b.nii,extra\n", ["line 2 has 5 cells", "header has 4"], id="long-row"),
        pytest.param(
            f"{HEADER}\ns1,A,a.nii,b.nii\ns2,A,c.nii,d.nii\ns1,A,e.nii,f.nii\ns1,B,g.nii,h.nii\n",
            ["subject 's1' on scanner 'A' appears on lines 2, 4", "one row per subject"],
            id="duplicate-pair",
        ),
        pytest.param(f"{HEADER},scanner\ns1,A,a.nii,b.nii,B\n", ["scanner more than once"], id="repeated-column"),
    ],
)
def test_bad_manifest_is_a_data_error_naming_file_and_line(
    tmp_path: Path, text: str | None, expected: list[str]
) -> None:
    manifest = tmp_path / "manifest.csv"
    if text is not None:
        _write_text(manifest, text)
    with pytest.raises(DataError) as caught:
        read_manifest(manifest)
    message = str(caught.value)
    assert str(manifest) in message
    for fragment in expected:
        assert fragment in message


# ---------------------------------------------------------------- scanner profiles


def test_scanner_profiles_are_read_from_beside_the_manifest(tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path, {"1": 1, "2": 1}, profiles=True)
    assert read_scanner_profiles(manifest) == {
        "1": {"name": "Scanner 1", "matrix": list(SHAPE)},
        "2": {"name": "Scanner 2", "matrix": list(SHAPE)},
    }
    (tmp_path / "scanners.json").unlink()
    assert read_scanner_profiles(manifest) is None


@pytest.mark.parametrize("text", ["{not json", '["1", "2"]', '{"1": 3}'])
def test_bad_scanner_profiles_are_a_data_error(tmp_path: Path, text: str) -> None:
    _write_text(tmp_path / "scanners.json", text)
    with pytest.raises(DataError, match="scanners.json"):
        read_scanner_profiles(tmp_path / "manifest.csv")


# ---------------------------------------------------------------- check_scans


def test_check_scans_summarises_good_data(tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path, {"1": 2, "2": 1}, profiles=True)
    summaries = check_scans(manifest)
    assert [(s.line, s.scanner) for s in summaries] == [(2, "1"), (3, "1"), (4, "2")]
    first = summaries[0]
    assert first.shape == SHAPE
    assert first.spacing_mm == pytest.approx((2.0, 2.0, 2.5))
    assert first.long_range[1] == pytest.approx(2 * first.short_range[1])  # long = 2 x short in the fakes
    assert 0.1 <= first.short_range[0] < first.short_range[1] <= 1.1


def test_single_frame_4d_scan_is_accepted_as_3d(tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path, {"1": 1})
    long_path = Path(read_manifest(manifest).iloc[0]["long"])
    voxels = np.asarray(nib.load(long_path).dataobj)
    write_volume(long_path, voxels[..., None])
    assert check_scans(manifest)[0].shape == SHAPE


def _break_long(transform: Callable[[np.ndarray], np.ndarray], affine: np.ndarray = AFFINE) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        voxels = np.asarray(nib.load(path).dataobj, dtype=np.float32)
        write_volume(path, transform(voxels), affine)

    return apply


def _delete(path: Path) -> None:
    path.unlink()


def _garble(path: Path) -> None:
    path.write_bytes(gzip.compress(b"this is not a NIfTI header" * 20))


def _nan(voxels: np.ndarray) -> np.ndarray:
    voxels = voxels.copy()
    voxels[1, 2, 3] = np.nan
    return voxels


def _inf(voxels: np.ndarray) -> np.ndarray:
    voxels = voxels.copy()
    voxels[0, 0, 0] = np.inf
    return voxels


_SHIFTED = AFFINE.copy()
_SHIFTED[0, 3] += 1.0

# Each case damages the long scan of the 2nd row (CSV line 3) and names what the message must say.
_BAD_SCANS = {
    "missing-file": (_delete, ["column long", "does not exist"]),
    "unreadable-file": (_garble, ["column long", "cannot be read as NIfTI"]),
    "not-3d": (_break_long(lambda v: np.stack([v, v], axis=-1)), ["column long", "is 4D", "3D volume is needed"]),
    "2d": (_break_long(lambda v: v[..., 0]), ["column long", "is 2D"]),
    "nan-voxels": (_break_long(_nan), ["column long", "1 NaN/Inf voxel(s)"]),
    "inf-voxels": (_break_long(_inf), ["column long", "1 NaN/Inf voxel(s)"]),
    "all-zero": (_break_long(np.zeros_like), ["column long", "all voxels are zero"]),
    "constant": (_break_long(lambda v: np.full_like(v, 3.0)), ["column long", "all voxels equal 3"]),
    "shape-mismatch": (_break_long(lambda v: v[:-1]), ["has shape (12, 10, 8)", "has shape (11, 10, 8)"]),
    "affine-mismatch": (_break_long(lambda v: v, _SHIFTED), ["different affines"]),
}


@pytest.mark.parametrize("case", sorted(_BAD_SCANS))
def test_bad_scan_is_a_data_error_naming_manifest_line_and_file(tmp_path: Path, case: str) -> None:
    manifest = make_dataset(tmp_path, {"1": 3})
    long_path = Path(read_manifest(manifest).loc[3, "long"])
    damage, expected = _BAD_SCANS[case]
    damage(long_path)
    with pytest.raises(DataError) as caught:
        check_scans(manifest)
    message = str(caught.value)
    assert str(manifest.resolve()) in message
    assert "line 3" in message and "line 2" not in message and "line 4" not in message
    assert str(long_path) in message
    assert "1 problem(s)" in message
    for fragment in expected:
        assert fragment in message


def test_unknown_scanner_given_explicitly(tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path, {"1": 1, "7": 1})
    check_scans(manifest)  # no scanners.json and no list: any id is fine
    expected = r"line 3, column scanner: unknown scanner '7' \(known in the scanners given: 1, 2\)"
    with pytest.raises(DataError, match=expected):
        check_scans(manifest, scanners=[1, 2])


def test_unknown_scanner_from_scanners_json(tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path, {"1": 1, "7": 1}, profiles=True)
    profiles = json.loads((tmp_path / "scanners.json").read_text())
    del profiles["7"]
    (tmp_path / "scanners.json").write_text(json.dumps(profiles))
    with pytest.raises(DataError, match=r"line 3, column scanner: unknown scanner '7' \(known in .*scanners.json: 1\)"):
        check_scans(manifest)


def test_every_problem_is_reported_not_only_the_first(tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path, {"1": 3})
    frame = read_manifest(manifest)
    Path(frame.loc[2, "short"]).unlink()
    _break_long(np.zeros_like)(Path(frame.loc[4, "long"]))
    with pytest.raises(DataError) as caught:
        check_scans(frame)
    message = str(caught.value)
    assert "2 problem(s)" in message
    assert "line 2, column short" in message and "line 4, column long" in message


def test_check_scans_rejects_bad_worker_count(tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path, {"1": 1})
    with pytest.raises(ValueError, match="`max_workers` must be a positive integer"):
        check_scans(manifest, max_workers=0)


# ---------------------------------------------------------------- `autopeft data`


def _run_cli(argv: list[str]) -> int:
    import argparse

    from autopeft.cli import data as command

    parser = argparse.ArgumentParser(prog="autopeft data")
    command.configure(parser)
    return command.run(parser.parse_args(argv))


def test_cli_prints_a_per_scanner_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = make_dataset(tmp_path, {"10": 16, "2": 3}, profiles=True)
    assert _run_cli(["--manifest", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "19 scan pairs on 2 scanners, all files OK" in out
    lines = out.splitlines()
    header = next(line for line in lines if "subjects" in line)
    assert header.split()[:3] == ["scanner", "name", "subjects"]
    rows = [line.split() for line in lines[lines.index(header) + 1 :][:2]]
    assert rows[0][:5] == ["2", "Scanner", "2", "3", "12x10x8"]  # natural order: 2 before 10
    assert rows[0][5] == "2x2x2.5" and " ".join(rows[0][-3:]) == "too few subjects"
    assert rows[1][:4] == ["10", "Scanner", "10", "16"] and rows[1][-2:] == ["source,", "target"]


def test_cli_reports_bad_input_as_data_error(tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path, {"1": 2})
    with pytest.raises(DataError, match="unknown scanner '1'"):
        _run_cli(["--data", str(tmp_path), "--scanners", "3", "4"])
    Path(read_manifest(manifest).loc[2, "short"]).unlink()
    with pytest.raises(DataError, match="line 2, column short"):
        _run_cli(["--manifest", str(manifest)])
