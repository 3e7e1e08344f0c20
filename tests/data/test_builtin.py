"""resolve_manifest: the manifest --data names (a folder or the CSV), or a clear error."""

from __future__ import annotations

import pytest

from autopeft.data import resolve_manifest
from autopeft.errors import DataError


def test_data_names_a_folder_or_the_csv(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("subject,scanner,short,long\n", encoding="utf-8")
    assert resolve_manifest(tmp_path) == manifest.resolve()
    assert resolve_manifest(manifest) == manifest.resolve()


def test_data_without_a_manifest_says_how_to_fix_it(tmp_path):
    with pytest.raises(DataError, match=r"--data .*no manifest found at .*manifest\.csv.*leave --data out"):
        resolve_manifest(tmp_path)
