"""Benchmark of the built-in simulator: wall time of the default data set and its realism figures.

Each repetition simulates into a fresh directory from a fresh Python process (imports, template
loading and all), which is what `autopeft simulate` costs a user; then a second call into the same
directory measures the cache. Per-scan times per scanner come from an in-process run of a few
subjects. Prints a table and writes bench/results/simulate.json. Never asserts on time.

    .venv/bin/python bench/bench_simulate.py                 # default set (5 x 12, size 64)
    .venv/bin/python bench/bench_simulate.py --repeats 3 --scan-subjects 3
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
from pathlib import Path

_RESULTS = Path(__file__).resolve().parent / "results" / "simulate.json"
_SIMULATE = (
    "import sys; from autopeft.data.simulator import simulate; "
    "simulate(sys.argv[1], subjects=int(sys.argv[2]), size=int(sys.argv[3]), progress=False)"
)


def _timed_process(out_dir: Path, subjects: int, size: int) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", _SIMULATE, str(out_dir), str(subjects), str(size)], check=True)
    return time.perf_counter() - start


def _per_scan_seconds(size: int, subjects: int) -> dict[str, float]:
    """Median seconds per scan (six frames simulated and reconstructed) for each scanner."""
    import numpy as np

    from autopeft.data import simulator
    from autopeft.data._projector import ParallelBeamProjector
    from autopeft.data._sim_phantom import make_subject
    from autopeft.data.scanners import SCANNERS

    make_subject(np.random.default_rng(0))  # loads the template once, outside the timings
    medians = {}
    for scanner_id, profile in SCANNERS.items():
        grid = profile.at_size(size)
        projector = ParallelBeamProjector(grid.matrix[0], grid.spacing_mm[0], grid.n_views, grid.subsets)
        times = []
        for index in range(subjects):
            start = time.perf_counter()
            simulator._simulate_scan(grid, projector, np.random.SeedSequence([0, int(scanner_id), index]))
            times.append(time.perf_counter() - start)
        medians[scanner_id] = statistics.median(times)
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subjects", type=int, default=16, help="subjects per scanner")
    parser.add_argument("--size", type=int, default=64, help="in-plane matrix of scanner 1")
    parser.add_argument("--repeats", type=int, default=1, help="full simulations, each from a fresh process")
    parser.add_argument(
        "--scan-subjects", type=int, default=3, help="subjects per scanner for per-scan timings"
    )
    args = parser.parse_args()

    walls, cached, summary = [], [], None
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "sim"
            walls.append(_timed_process(out, args.subjects, args.size))
            cached.append(_timed_process(out, args.subjects, args.size))
            summary = json.loads((out / "summary.json").read_text())
            size_mb = sum(p.stat().st_size for p in out.rglob("*.nii.gz")) / 1e6
    per_scan = _per_scan_seconds(args.size, args.scan_subjects)

    print(f"simulate --subjects {args.subjects} --size {args.size} (5 scanners), {os.cpu_count()} CPUs")
    runs = ", ".join(f"{w:.1f}" for w in walls)
    median = statistics.median(walls)
    print(f"  wall time, fresh process: median {median:.1f} s over {len(walls)} run(s) [{runs}]")
    print(f"  cached second call (process start + imports): median {statistics.median(cached):.1f} s")
    print(f"  NIfTI written: {size_mb:.1f} MB")
    print("  median seconds per scan (6 frames + OSEM):", {k: round(v, 2) for k, v in per_scan.items()})
    print(
        f"\n  {'scanner':<8}{'FWHM mm':>9}{'PSNR short':>12}{'PSNR long':>11}{'gain dB':>9}"
        f"{'GM:WM long':>12}"
    )
    for scanner_id, row in summary["scanners"].items():
        print(
            f"  {scanner_id:<8}{row['resolution_fwhm_mm'][0]:>9.1f}{row['psnr_short_db']:>12.2f}"
            f"{row['psnr_long_db']:>11.2f}{row['psnr_gain_db']:>9.2f}{row['grey_white_long']:>12.2f}"
        )
    print("  " + summary["definition"])

    _RESULTS.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "simulate",
        "arguments": {"subjects": args.subjects, "size": args.size, "scanners": "1,2,3,4,5"},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "wall_s": walls,
        "wall_s_median": statistics.median(walls),
        "cached_call_s_median": statistics.median(cached),
        "per_scan_s_median": per_scan,
        "nifti_mb": round(size_mb, 2),
        "realism": summary,
    }
    _RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {_RESULTS}")


if __name__ == "__main__":
    main()
