"""The search on a real two-node Ray cluster on this machine (127.0.0.1 only, :mod:`_two_nodes`).

The worker node cannot read the runs folder (run directories and the data live there) nor the
driver's artifact cache; ``shared/`` is the ``--storage-path``. Only the worker node has the
``autopeft_worker`` resource each trial asks for, so every trial runs there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from _fakes import make_dataset
from _two_nodes import TwoNodes, usable
from autopeft.runs import FINISHED, INFEASIBLE, INTERRUPTED, RUNNING, TERMINAL, records

pytestmark = [pytest.mark.slow,  # two Ray nodes, training
              pytest.mark.skipif(not usable(), reason="needs root (unshare -m, mount -t tmpfs) and the ray command beside this Python")]


@pytest.fixture(scope="module")
def cluster():
    # A short folder of its own: Ray's socket paths under it must stay below 107 characters.
    nodes = TwoNodes(Path(tempfile.mkdtemp(prefix="ap-cluster-", dir="/tmp")))
    try:
        nodes.start_head()
        nodes.start_worker()
        # The default protocol (8+4 pre-training, 4+4+8 fine-tuning subjects per scanner), as the
        # command uses; under runs/, so the worker node cannot read the scans: they are shipped.
        nodes.data = make_dataset(nodes.runs / "data", {"1": 16, "2": 16}, shape=(20, 18, 16), long_factor=1.5)
        yield nodes
    finally:
        nodes.stop()
        shutil.rmtree(nodes.root, ignore_errors=True)


def _search_args(run_dir: Path, data: Path, **extra: str) -> list[str]:
    values = {"--backbone": "cvtgan", "--budget": "5%", "--preset": "tiny", "--scanners": "1,2", "--epochs": "1",
              "--pretrain-epochs": "1", "--data": str(data), "--out": str(run_dir), "--cpus-per-trial": "1",
              "--device": "cpu", "--confirm": "0", "--priors": "off", "--concurrency": "1", "--no-asha": None,
              "--no-portfolio": None, **extra}
    return [item for pair in values.items() for item in pair if item is not None]


def _wait_for(predicate, process: subprocess.Popen, log: Path, timeout: float = 300.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        if process.poll() is not None:
            raise AssertionError(f"the search ended (rc {process.returncode}) first:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out:\n{log.read_text()[-4000:]}")


def test_search_on_two_nodes_lands_in_the_run_dir_and_resumes_after_the_driver_is_killed(cluster):
    run_dir = cluster.runs / "run"
    log = cluster.root / "search-1.log"
    driver = cluster.search(*_search_args(run_dir, cluster.data, **{"--trials": "3", "--epochs": "2"}), log="search-1.log")

    def one_finished_one_running():
        rows = records(run_dir)
        return any(r["state"] == FINISHED for r in rows) and any(r["state"] == RUNNING for r in rows)

    _wait_for(one_finished_one_running, driver, log)
    driver.kill()  # the driver dies mid-trial: no clean-up of any kind
    driver.wait(timeout=30)
    before = {r["number"]: r for r in records(run_dir)}

    resumed = cluster.search("--resume", str(run_dir), log="search-2.log")
    assert resumed.wait(timeout=400) == 0, (cluster.root / "search-2.log").read_text()[-4000:]
    text = (cluster.root / "search-1.log").read_text()
    assert "2 node(s), 3 CPUs, 0 GPUs" in text and "shipped once to" in text, text[-3000:]

    after = {r["number"]: r for r in records(run_dir)}
    # Nothing lost, nothing repeated: the finished trial is kept as it was, the killed one is
    # INTERRUPTED and its plan ran again; 3 plans trained in all.
    for number, record in before.items():
        if record["state"] == FINISHED:
            assert after[number]["state"] == FINISHED and after[number]["started"] == record["started"]
        elif record["state"] == RUNNING:
            assert after[number]["state"] == INTERRUPTED
            assert any(r["params"] == record["params"] and r["state"] in TERMINAL and n > number for n, r in after.items())
    trained = [r for r in after.values() if r["state"] in TERMINAL and r["state"] != INFEASIBLE]
    assert len(trained) == 3 and sum(r["state"] == FINISHED for r in trained) >= 2
    # Every trial ran on the worker node, which cannot see the run directory: the driver wrote it all.
    worker = cluster.worker_nodes()
    assert len(worker) == 1 and all(r.get("node") == worker[0] for r in trained), [r.get("node") for r in trained]
    for r in trained:
        if r["state"] == FINISHED:
            assert len(r["pairs"]) == 2 and all(p["subjects"] for p in r["pairs"])
            assert sorted(p.name for p in (run_dir / "weights" / f"{r['number']:04d}").iterdir()) == ["1-2-fold0", "2-1-fold0"]
    for name in ("results.csv", "best_plan.yaml", "references.json", "report.html", "study.db", "summary.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "best_weights").is_dir() and (run_dir / "examples" / "slices.json").is_file()
    assert {row["label"] for row in json.loads((run_dir / "references.json").read_text())} >= {"No-FT", "Full-FT", "PETITE"}
    # The source models and the scans reached the worker through the shared storage only.
    store = cluster.shared / "autopeft-artifacts"
    assert len(list(store.glob("pretrained/*/model.safetensors"))) == 2 and list(store.glob("data/*/manifest.csv"))
    assert not list(run_dir.glob("ray"))  # Tune's files are under --storage-path, not the run directory


def test_a_worker_node_dying_mid_trial_is_retried_from_its_checkpoint_and_the_search_goes_on(cluster):
    run_dir = cluster.runs / "run-fault"
    log = cluster.root / "search-fault.log"
    # 8 epochs a pair: the node dies well inside the trial's second pair, not as it ends (No-FT
    # alone as reference keeps the driver's share short).
    driver = cluster.search(*_search_args(run_dir, cluster.data, **{"--trials": "2", "--max-failures": "1", "--epochs": "8",
                                                                  "--no-references": None}), log="search-fault.log")
    first = _wait_for(lambda: next((r for r in records(run_dir) if r["state"] == RUNNING and r["pairs_done"] == 1), None),
                      driver, log)
    raylets = cluster.processes(name="raylet/raylet", other_namespace=True)
    assert len(raylets) == 1, raylets
    # The worker node dies with its trial: its raylet and every process in its namespace (a trial's
    # worker process could otherwise outlive its raylet for a few seconds and finish the trial).
    node = os.readlink(f"/proc/{raylets[0]}/ns/mnt")
    os.kill(raylets[0], signal.SIGKILL)
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.readlink(entry / "ns" / "mnt") == node:
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
    cluster.start_worker()  # a replacement node joins; the retried trial runs there
    assert driver.wait(timeout=400) == 0, log.read_text()[-4000:]
    rows = {r["number"]: r for r in records(run_dir)}
    hit = rows[first["number"]]
    # Retried (--max-failures 1) on the new node from its checkpoint: the pair done before the node
    # died was not run again, and the trial finished.
    assert hit["state"] == FINISHED and hit.get("retries") == 1 and "retr" in hit["reason"], hit
    assert hit["pairs"][0] == first["pairs"][0] and hit["node"] != first["node"]
    trained = [r for r in rows.values() if r["state"] in TERMINAL and r["state"] != INFEASIBLE]
    assert len(trained) == 2 and any(r["state"] == FINISHED and r["number"] != first["number"] for r in trained)
    assert (run_dir / "results.csv").is_file() and (run_dir / "report.html").is_file()


def test_nodes_that_cannot_read_the_storage_or_the_scans_stop_the_search_before_any_trial(cluster):
    # Without --storage-path, Tune's storage is inside the run directory, which the worker cannot see.
    hidden = cluster.runs / "run-no-storage"
    driver = cluster.search(*_search_args(hidden, cluster.data, **{"--trials": "2"}), log="blind-1.log", storage=False)
    assert driver.wait(timeout=120) == 2
    text = (cluster.root / "blind-1.log").read_text()
    assert f"cannot read the default storage path {hidden / 'ray'}" in text and "Pass --storage-path" in text, text[-2000:]
    # A run directory both see, but scans only the driver reads, and nothing to ship them through.
    visible = cluster.shared / "run-no-data"
    driver = cluster.search(*_search_args(visible, cluster.data, **{"--trials": "2"}), log="blind-2.log", storage=False)
    assert driver.wait(timeout=120) == 2
    text = (cluster.root / "blind-2.log").read_text()
    assert f"--data {cluster.data}: Ray node" in text and "pass --storage-path" in text, text[-2000:]
    for run_dir in (hidden, visible):
        assert not (run_dir / "trials").exists() and not (run_dir / "references.json").exists()
