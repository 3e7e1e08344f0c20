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

examples:
  autopeft data --manifest data/sim/manifest.csv
  autopeft data --manifest /data/adni --scanners 1 2 3
"""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--manifest",
        "--data",
        dest="manifest",
        required=True,
        metavar="CSV_OR_DIR",
        help="the manifest CSV (columns subject,scanner,short,long), or a folder holding manifest.csv",
    )
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


def run(args: argparse.Namespace) -> int:
    from autopeft.tables import print_table
    from autopeft.data.manifest import check_scans, read_manifest, read_scanner_profiles
    from autopeft.data.splits import Protocol, scanners_in

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
    print(
        f"{which} protocol: a source needs {needs['pretrain']} subjects ({protocol.pretrain_train} train + "
        f"{protocol.pretrain_val} val), a target {needs['finetune']} ({protocol.finetune_train} train + "
        f"{protocol.finetune_val} val + {protocol.finetune_test} test); intensities are scaled to [0, 1] per volume when loaded."
    )
    return 0
