"""Make the built-in multi-scanner 18F-FDG brain PET data set: short and long scans as NIfTI.

Five simulated scanners mirror the five ADNI scanners of PETITE (grids, resolution, sensitivity
and reconstruction; see scanners.json). Every scanner scans its own subjects, drawn from the MNI152
anatomy with their own uptake, head shape and, for some, an Alzheimer-like hypometabolism. Each
scan is six 5-minute frames with Poisson noise, reconstructed with OSEM: the short scan is the
first frame, the long scan the mean of the six, as in ADNI.

--size scales all grids at once: it is the in-plane matrix of scanner 1 over a 20 cm head field of
view (64 gives 3.1 mm voxels; native is ~164). Resolution and counts are scaled with it, so the
scanners keep their relative resolution and noise.

The output directory receives manifest.csv (subject,scanner,short,long), scanners.json and
summary.json (PSNR of short and long scans per scanner). Runs are deterministic and cached: the
same arguments return at once, and an interrupted run resumes where it stopped.

examples:
  autopeft simulate --out data/sim                       # 5 scanners x 16 subjects, ~2-4 min
  autopeft simulate --out data/tiny --size 32 --subjects 4 --scanners 1,5
  autopeft simulate --out data/simbids --bids --size 32 --subjects 16 --scanners 1,5   # as BIDS-PET

With --bids the directory is also a BIDS-PET dataset: each scan's six frames as a 4D
sub-<id>/ses-scanner<k>/pet/sub-<id>_ses-scanner<k>_trc-FDG_pet.nii.gz with a _pet.json sidecar
(FrameTimesStart 1800..3300 s, FrameDuration 300 s, ManufacturersModelName = the scanner's name,
reconstruction), dataset_description.json, participants.tsv and a .bidsignore for the files above.
"""

from __future__ import annotations

import argparse
import json
import textwrap
import time
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    """Adds the options of ``autopeft simulate``."""
    parser.add_argument(
        "--out", required=True, type=Path, metavar="DIR",
        help="output directory (new, empty, or an earlier run's)",
    )
    parser.add_argument(
        "--subjects", type=int, default=16, metavar="N",
        help="subjects per scanner (each scanner has its own)",
    )
    parser.add_argument(
        "--size", type=int, default=64, metavar="S",
        help="in-plane matrix of scanner 1; scales every scanner",
    )
    parser.add_argument("--seed", type=int, default=0, metavar="K", help="random seed")
    parser.add_argument(
        "--scanners", default="1,2,3,4,5", metavar="IDS", help="comma-separated scanner ids (1-5)"
    )
    parser.add_argument(
        "--bids", action="store_true",
        help="also write DIR as a BIDS-PET dataset: 4D frames + _pet.json sidecars, one session per scanner "
        "(then: autopeft data --bids DIR --short 0-5 --long 0-30 --out DERIVED)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _realism_table(summary: dict) -> str:
    header = (
        f"{'scanner':<8}{'name':<36}{'FWHM mm':>9}{'PSNR short':>12}{'PSNR long':>11}"
        f"{'gain dB':>9}{'GM:WM long':>12}"
    )
    lines = [header, "-" * len(header)]
    for scanner_id, row in summary["scanners"].items():
        lines.append(
            f"{scanner_id:<8}{row['name'][:35]:<36}{row['resolution_fwhm_mm'][0]:>9.1f}"
            f"{row['psnr_short_db']:>12.2f}{row['psnr_long_db']:>11.2f}{row['psnr_gain_db']:>9.2f}"
            f"{row['grey_white_long']:>12.2f}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Simulates (or finds cached) data and prints where it is and how realistic it is."""
    from autopeft.data.simulator import is_simulated, simulate

    options = dict(subjects=args.subjects, size=args.size, seed=args.seed, scanners=args.scanners, bids=args.bids)
    cached = is_simulated(args.out, **options)
    start = time.perf_counter()
    manifest = simulate(args.out, progress=not args.quiet, **options)
    elapsed = time.perf_counter() - start
    summary = json.loads((manifest.parent / "summary.json").read_text(encoding="utf-8"))
    status = "already simulated (cached)" if cached else f"simulated in {elapsed:.1f} s"
    print(f"{status}: {manifest.parent}")
    print(f"manifest: {manifest}")
    if args.bids:
        print(f"BIDS-PET dataset: {manifest.parent} (sub-*/ses-scanner<k>/pet/*_pet.nii.gz + .json; the files above are in .bidsignore)")
    print()
    print(_realism_table(summary))
    print(textwrap.fill(summary["definition"], width=100))
    return 0
