"""Check a manifest of your own paired scans and summarise it per scanner.

autopeft learns from pairs of scans of one subject on one scanner: a short scan (e.g. the first
5-minute frame) as input and a long scan (e.g. the mean of six frames) as target. List them in a CSV
file, manifest.csv, one row per pair:

  subject,scanner,short,long
  sub-001,1,scanner1/sub-001_short.nii.gz,scanner1/sub-001_long.nii.gz
  sub-002,1,/data/adni/002/frame1.nii.gz,/data/adni/002/mean30.nii.gz

- subject and scanner are identifiers, kept as text ("01" and "1" differ);
- short and long are NIfTI files, relative to the manifest's folder or absolute; a pair shares one
  voxel grid (same shape and affine); a single-frame 4D file is read as 3D;
- extra columns are allowed and kept; one row per (subject, scanner).

An optional scanners.json beside the manifest maps scanner id -> profile, e.g.
  {"1": {"name": "Biograph mCT", "matrix": [192, 192, 136], "spacing_mm": [1.22, 1.22, 1.22]}}
and then every scanner id in the manifest must be one of its keys.

This command reads every file (header and voxels) and stops with one message listing each problem
by manifest line, column and file: missing or unreadable files, volumes that are not 3D, NaN/Inf or
constant (e.g. all-zero) volumes, pairs whose shapes or affines differ, unknown scanner ids. On
success it prints, per scanner, the subjects, matrix, voxel spacing and intensity ranges, and
whether the scanner has enough subjects to serve as a pre-training source or a fine-tuning target.

Dynamic PET in BIDS (--bids DIR, read with pybids): every sub-*/[ses-*/]pet/*_pet.nii.gz (4D) and
its _pet.json sidecar becomes a short scan (the frames inside the --short window) and a long scan
(the duration-weighted mean of the frames inside the --long window), written as 3D NIfTI on the
scan's grid with manifest.csv and scanners.json (matrix, spacing, model name, reconstruction) in
--out; then the result is checked as above and every command takes it with --data OUT. Windows are
minutes from the start of the first frame (--from start, the default) or after injection (--from
injection, with the sidecar's InjectionStart), or frame numbers (--unit frame, 1-based, inclusive).
The scanner is the sidecar's ManufacturersModelName, or a BIDS entity (--scanner-entity rec|acq|ses).
Every problem gets its own line naming the file and the field: a 3D file, no sidecar, missing
FrameTimesStart/FrameDuration, durations that do not match the 4th dimension, frames that do not
cover a window, no scanner name.

examples:
  autopeft data --manifest data/sim/manifest.csv
  autopeft data --manifest /data/adni --scanners 1 2 3
  autopeft data --bids /data/mybids --short 0-5 --long 0-30 --out data/mybids-pairs
  autopeft data --bids /data/adni-clinica --short 30-35 --long 30-60 --from injection --out data/adni-pairs
  autopeft data --bids /data/adni-clinica --unit frame --short 1 --long 1-6 --out data/adni-pairs
"""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--manifest",
        "--data",
        dest="manifest",
        metavar="CSV_OR_DIR",
        help="the manifest CSV (columns subject,scanner,short,long), or a folder holding manifest.csv",
    )
    source.add_argument("--bids", metavar="DIR", help="a BIDS-PET dataset to derive short/long pairs from (see above)")
    parser.add_argument("--short", metavar="A-B", help="with --bids: the short scan's window, e.g. 0-5 (minutes) or 1 (--unit frame)")
    parser.add_argument("--long", metavar="A-B", help="with --bids: the long scan's window, e.g. 0-30 (minutes) or 1-6 (--unit frame)")
    parser.add_argument("--from", dest="reference", choices=("start", "injection"), default="start",
                        help="with --bids: minutes count from the first frame's start or from the injection")
    parser.add_argument("--unit", choices=("min", "frame"), default="min", help="with --bids: windows in minutes or frame numbers")
    parser.add_argument("--scanner-entity", default=None, metavar="ENTITY",
                        help="with --bids: the BIDS entity naming the scanner (e.g. rec, acq, ses) instead of ManufacturersModelName")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="with --bids: where the derived scans and manifest.csv go (default: DIR/derivatives/autopeft)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--scanners",
        nargs="+",
        default=None,
        metavar="ID",
        help="the scanner ids allowed (default: the keys of scanners.json beside the manifest, else any)",
    )
    parser.add_argument(
        "--paper-protocol",
        action="store_true",
        help="judge subject counts against PETITE's split sizes (30/15, 10/15) instead of the CPU-sized ones",
    )


def _span(values: list[tuple[float, ...]], fmt: str) -> str:
    """One value if all rows agree, else 'a | b | ...' listing the distinct ones."""
    distinct = sorted(set(values))
    return " | ".join("x".join(format(v, fmt) for v in value) for value in distinct)


def _derive(args: argparse.Namespace):
    from autopeft.data.bids import derive_pairs, parse_window
    from autopeft.errors import ConfigError

    if not args.short or not args.long:
        raise ConfigError("--bids needs --short and --long windows, e.g. --short 0-5 --long 0-30 (minutes).")
    short = parse_window(args.short, unit=args.unit, option="--short")
    long = parse_window(args.long, unit=args.unit, option="--long")
    out = Path(args.out) if args.out else Path(args.bids) / "derivatives" / "autopeft"
    manifest = derive_pairs(args.bids, out, short=short, long=long, reference=args.reference,
                            scanner_entity=args.scanner_entity, progress=not args.quiet)
    origin = "from the first frame's start" if args.reference == "start" else "after injection"
    print(f"derived from {args.bids}: short = {short}, long = {long} ({origin}); written to {manifest.parent}")
    return manifest


def run(args: argparse.Namespace) -> int:
    from autopeft.tables import print_table
    from autopeft.data.manifest import check_scans, read_manifest, read_scanner_profiles
    from autopeft.data.splits import Protocol, scanners_in

    if args.bids is not None:
        args.manifest = str(_derive(args))
    elif args.short or args.long or args.out:
        from autopeft.errors import ConfigError

        raise ConfigError("--short, --long and --out go with --bids DIR (a BIDS-PET dataset to derive pairs from).")
    frame = read_manifest(args.manifest)
    summaries = check_scans(frame, scanners=args.scanners)
    profiles = read_scanner_profiles(frame.attrs["manifest"]) or {}
    protocol = Protocol.paper() if args.paper_protocol else Protocol()
    needs = {purpose: protocol.needed(purpose) for purpose in ("pretrain", "finetune")}

    rows = []
    for scanner in scanners_in(frame):
        mine = [summary for summary in summaries if summary.scanner == scanner]
        subjects = len({summary.subject for summary in mine})
        roles = [
            role for role, purpose in (("source", "pretrain"), ("target", "finetune")) if subjects >= needs[purpose]
        ]
        rows.append(
            {
                "scanner": scanner,
                "name": str(profiles.get(scanner, {}).get("name", "")),
                "subjects": subjects,
                "matrix": _span([summary.shape for summary in mine], "d"),
                "spacing": _span([summary.spacing_mm for summary in mine], ".4g"),
                "short": f"{min(s.short_range[0] for s in mine):.4g} .. {max(s.short_range[1] for s in mine):.4g}",
                "long": f"{min(s.long_range[0] for s in mine):.4g} .. {max(s.long_range[1] for s in mine):.4g}",
                "roles": ", ".join(roles) or "too few subjects",
            }
        )
    print(f"{frame.attrs['manifest']}: {len(summaries)} scan pairs on {len(rows)} scanners, all files OK")
    columns = {"scanner": "scanner", "name": "name"} if profiles else {"scanner": "scanner"}
    print_table(
        rows,
        {
            **columns,
            "subjects": "subjects",
            "matrix": "matrix (voxels)",
            "spacing": "spacing (mm)",
            "short": "short range",
            "long": "long range",
            "roles": "usable as",
        },
    )
    which = "paper" if args.paper_protocol else "CPU-sized"
    if args.bids is not None:
        print(f"use it with --data {Path(args.manifest).parent}")
    print(
        f"{which} protocol: a source needs {needs['pretrain']} subjects ({protocol.pretrain_train} train + "
        f"{protocol.pretrain_val} val), a target {needs['finetune']} ({protocol.finetune_train} train + "
        f"{protocol.finetune_val} val + {protocol.finetune_test} test); intensities are scaled to [0, 1] per volume when loaded."
    )
    return 0
