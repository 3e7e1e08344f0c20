"""The wall-time overhead of the cluster path against the local one, for the same trials.

The same search (``autopeft search``: cvtgan tiny, scanners 1 and 2 of a small fake data set, the
same sampler seed, ASHA and priors off so that every trial does the same work, no references
beyond No-FT, no confirmation) runs ``--runs`` times each way, alternating:

- local: the search starts its own Ray on this machine (2 trial slots);
- cluster: ``--address`` of a two-node Ray cluster on 127.0.0.1 (``tests/runner/_two_nodes.py``:
  the worker node, with 2 trial slots, in its own mount namespace, cannot read the run directory,
  the data nor the driver's cache), ``--storage-path`` a folder both read, and the trials forced
  onto the worker node.

The first run of each kind pre-trains the source models, or ships them and the scans to the
storage (kept there for the next runs, as for a user's later searches), and is left out (warm-up).
Reported: the median (and min, max) of the whole command's wall time and of the trial phase
(``slots.json``), and the ratio cluster / local. Needs root (``unshare -m``, tmpfs mounts).
Figures go to ``bench/results/cluster_overhead.json``.

    sudo python bench/cluster_overhead.py --runs 3 --trials 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "runner"))  # the two-node cluster of the tests
sys.path.insert(0, str(ROOT / "tests" / "data"))  # its fake data set

RESULTS = ROOT / "bench" / "results" / "cluster_overhead.json"


def _args(run_dir: Path, data: Path, trials: int) -> list[str]:
    values = {"--backbone": "cvtgan", "--budget": "5%", "--preset": "tiny", "--scanners": "1,2", "--epochs": "1",
              "--pretrain-epochs": "1", "--data": str(data), "--out": str(run_dir), "--cpus-per-trial": "1",
              "--device": "cpu", "--confirm": "0", "--priors": "off", "--concurrency": "2", "--trials": str(trials)}
    return [item for pair in values.items() for item in pair] + ["--no-asha", "--no-references", "--quiet"]


def _timed(command: list[str], env: dict[str, str], log: Path) -> float:
    started = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"{' '.join(command[:3])} failed (rc {code}); see {log}")
    return time.perf_counter() - started


def _phase(run_dir: Path) -> float:
    return float(json.loads((run_dir / "slots.json").read_text())[-1]["phase_seconds"])


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def main(argv: list[str] | None = None) -> int:
    from _fakes import make_dataset
    from _two_nodes import VENV_BIN, TwoNodes, usable

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="measured runs of each kind (after one warm-up). Default: 3.")
    parser.add_argument("--trials", type=int, default=4, help="trials per search. Default: 4.")
    args = parser.parse_args(argv)
    if not usable():
        print("needs root, unshare and the ray command beside this Python", file=sys.stderr)
        return 2
    nodes = TwoNodes(Path(tempfile.mkdtemp(prefix="ap-bench-", dir="/tmp")))
    try:
        nodes.start_head()
        nodes.start_worker()
        data = make_dataset(nodes.runs / "data", {"1": 16, "2": 16}, shape=(20, 18, 16), long_factor=1.5)
        wall: dict[str, list[float]] = {"local": [], "cluster": []}
        phase: dict[str, list[float]] = {"local": [], "cluster": []}
        for index in range(args.runs + 1):
            for kind in ("local", "cluster"):
                run_dir = nodes.runs / f"{kind}-{index}"
                command = [str(VENV_BIN / "autopeft"), "search", *_args(run_dir, data, args.trials)]
                if kind == "cluster":
                    command += ["--address", nodes.address, "--storage-path", str(nodes.shared / "storage"),
                                "--trial-resources", json.dumps({"autopeft_worker": 1})]
                seconds = _timed(command, nodes.env, nodes.root / f"{kind}-{index}.log")
                print(f"{kind} run {index}{' (warm-up)' if index == 0 else ''}: {seconds:.1f} s, trial phase "
                      f"{_phase(run_dir):.1f} s", flush=True)
                if index > 0:
                    wall[kind].append(seconds)
                    phase[kind].append(_phase(run_dir))
    finally:
        nodes.stop()
    result = {
        "wall_seconds": {k: _stats(v) for k, v in wall.items()},
        "trial_phase_seconds": {k: _stats(v) for k, v in phase.items()},
        "ratio_wall": statistics.median(wall["cluster"]) / statistics.median(wall["local"]),
        "ratio_trial_phase": statistics.median(phase["cluster"]) / statistics.median(phase["local"]),
        "trials": args.trials, "runs": args.runs,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "command": " ".join(["python", "bench/cluster_overhead.py", *(argv if argv is not None else sys.argv[1:])]),
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print(f"wall: local {result['wall_seconds']['local']['median']:.1f} s, cluster "
          f"{result['wall_seconds']['cluster']['median']:.1f} s (x{result['ratio_wall']:.2f}); trial phase: local "
          f"{result['trial_phase_seconds']['local']['median']:.1f} s, cluster "
          f"{result['trial_phase_seconds']['cluster']['median']:.1f} s (x{result['ratio_trial_phase']:.2f}); {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
