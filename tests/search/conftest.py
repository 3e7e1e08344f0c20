"""Shared fixtures of the search tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Shared helpers of the search tests (_two_nodes.py) sit beside them.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray for one test module (2 CPUs), shut down after it."""
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"  # tests only: no token file for a throwaway local cluster
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
