"""Shared test set-up: nothing downloads, caches go to a temporary directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Data fixtures (tiny NIfTI scans and manifests) live in tests/data/_fakes.py.
sys.path.insert(0, str(Path(__file__).parent / "data"))
# The scripts' Python helpers (scripts/gpu_check_report.py) are not a package.
sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    # Never read or write the user's ~/.cache/autopeft from a test. Session-wide and in os.environ,
    # so that processes started by tests (Ray workers) inherit it too.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AUTOPEFT_CACHE", str(tmp_path_factory.getbasetemp() / "autopeft-cache"))
        yield


@pytest.fixture(scope="module")
def networks_env():
    """Registering a network exports it in $AUTOPEFT_NETWORKS for the processes it starts; the
    other test modules' processes should not inherit a module's networks (use it per module)."""
    from autopeft.backbones.network import NETWORKS_ENV

    saved = os.environ.get(NETWORKS_ENV)
    yield
    if saved is None:
        os.environ.pop(NETWORKS_ENV, None)
    else:
        os.environ[NETWORKS_ENV] = saved


USER_NETWORK = "autopeft_test_usernet:TinyNet"


@pytest.fixture(scope="session")
def user_network(tmp_path_factory: pytest.TempPathFactory) -> str:
    """``module.path:Class`` of a user's own network, importable here and, through $PYTHONPATH, in
    the processes started after it (Ray workers): what an installed package gives a user."""
    folder = tmp_path_factory.mktemp("user-network")
    (folder / "autopeft_test_usernet.py").write_text(
        "from torch import nn\n\n\n"
        "class TinyNet(nn.Module):\n"
        "    def __init__(self, width: int = 4) -> None:\n"
        "        super().__init__()\n"
        "        self.down = nn.Sequential(nn.Conv3d(1, width, 3, stride=2, padding=1), nn.Conv3d(width, width, 3, padding=1))\n"
        "        self.up = nn.Sequential(nn.ConvTranspose3d(width, width, 2, stride=2), nn.Conv3d(width, width, 3, padding=1))\n"
        "        self.out = nn.Conv3d(width, 1, 1)\n\n"
        "    def forward(self, x):\n"
        "        return x + self.out(self.up(self.down(x)))\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", str(folder), prepend=os.pathsep)
        patch.syspath_prepend(str(folder))
        yield USER_NETWORK


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray for one test module (2 CPUs), shut down after it."""
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"  # tests only: no token file for a throwaway local cluster
    if ray.is_initialized():  # a CLI test's in-process search leaves its Ray up; this module wants its own
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of many small forward passes: on a 2-core machine shared with
    other jobs, torch's intra-op threads oversubscribe the cores (the PEFT matrix ran 5x slower,
    measured). The previous count is restored for the rest of the suite."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
