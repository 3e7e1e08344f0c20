"""Shared test set-up: nothing downloads, caches go to a temporary directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Data fixtures (tiny NIfTI scans and manifests) live in tests/data/_fakes.py.
sys.path.insert(0, str(Path(__file__).parent / "data"))


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    # Never read or write the user's ~/.cache/autopeft from a test. Session-wide and in os.environ,
    # so that processes started by tests (Ray workers) inherit it too.
    previous = os.environ.get("AUTOPEFT_CACHE")
    os.environ["AUTOPEFT_CACHE"] = str(tmp_path_factory.getbasetemp() / "autopeft-cache")
    yield
    if previous is None:
        os.environ.pop("AUTOPEFT_CACHE", None)
    else:
        os.environ["AUTOPEFT_CACHE"] = previous


@pytest.fixture(scope="module")
def networks_env():
    """Registering a network exports it in $AUTOPEFT_NETWORKS for the processes it starts; the
    other test modules' processes should not inherit a module's networks (use it per module)."""
    from backbones.network import NETWORKS_ENV

    saved = os.environ.get(NETWORKS_ENV)
    yield
    if saved is None:
        os.environ.pop(NETWORKS_ENV, None)
    else:
        os.environ[NETWORKS_ENV] = saved
