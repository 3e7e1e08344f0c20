"""Write a search run's report: one self-contained HTML file that opens offline.

The report (RUN_DIR/report.html by default) holds the results table in PETITE's Table 1 layout
(No-FT, Full-FT, PETITE's plan, the Pareto plans and the best plan), the optimisation history,
the Pareto front of PSNR against % trainable parameters, Optuna's parameter importances, PSNR per
scanner pair, example slices of the best plan (short scan, long scan, predictions, error maps),
every trial with its state (finished, stopped early, failed, over budget), and the settings and
package versions. 'autopeft search' writes it at the end of every search and when one is
interrupted; run this command to rewrite it, e.g. after resuming or while a search still runs.

examples:
  autopeft report runs/unetr-20250101-120000
  autopeft report runs/unetr-20250101-120000 --out /tmp/unetr.html --no-slices
"""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the folder 'autopeft search' wrote (its --out)")
    parser.add_argument("--out", default=None, help="where to write the HTML file (default: RUN_DIR/report.html)")
    parser.add_argument("--no-slices", action="store_true",
                        help="leave out the example slices (drawn from the examples/ the search kept)")


def run(args: argparse.Namespace) -> int:
    from autopeft.report import write_report

    path = write_report(args.run_dir, out=args.out, slices=not args.no_slices)
    print(f"report: {path}")
    return 0
