"""Shared test set-up: nothing downloads, caches go to a temporary directory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Data fixtures (tiny NIfTI scans and manifests) live in tests/data/_fakes.py.
sys.path.insert(0, str(Path(__file__).parent / "data"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Never read or write the user's ~/.cache/autopeft from a test.
    monkeypatch.setenv("AUTOPEFT_CACHE", str(tmp_path_factory.getbasetemp() / "autopeft-cache"))
