"""The ``autopeft`` command.

Each subcommand lives in its own module of this package and exposes two functions:

- ``configure(parser)``: adds its arguments (cheap: no heavy imports at module level, so that
  ``autopeft --help`` answers at once);
- ``run(args) -> int``: does the work and returns the exit status.

A subcommand is added with one module plus one line in ``_SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from autopeft import __version__
from autopeft.errors import AutopeftError

# name -> (module, one-line summary). Order is the order shown in --help.
_SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("autopeft.cli.simulate", "make the built-in multi-scanner PET data set (NIfTI + manifest)"),
    "data": ("autopeft.cli.data", "check a manifest of your own scans, or derive one from BIDS-PET (--bids)"),
    "backbones": ("autopeft.cli.backbones", "list registered backbones, their presets, sizes and sites"),
    "pretrain": ("autopeft.cli.pretrain", "pre-train a backbone on a source scanner (cached)"),
    "finetune": ("autopeft.cli.finetune", "fine-tune a pre-trained backbone on a target scanner with PEFT plans"),
    "importance": ("autopeft.cli.importance", "SH-PEFT importance of a source model's weights on a target, per site"),
    "space": ("autopeft.cli.space", "show a search space: size, trainable-%% range, sampled plans"),
    "search": ("autopeft.cli.search", "search PEFT plans under a budget with Ray Tune + Optuna"),
    "predict": ("autopeft.cli.predict", "apply a fine-tuned model (run, trained plan or bundle) to short scans"),
    "export": ("autopeft.cli.export", "export a run's recommended model as a MONAI bundle (merged weights)"),
    "report": ("autopeft.cli.report", "write a search run's self-contained HTML report"),
    "dashboard": ("autopeft.cli.dashboard", "serve a search run's Optuna study in optuna-dashboard"),
}

_EPILOG = """\
typical use:
  autopeft simulate --out data/sim          # built-in five-scanner PET data
  autopeft backbones                        # what can be fine-tuned, and where
  autopeft pretrain --backbone unetr --source 1
  autopeft finetune --backbone unetr --source 1 --target 5 --method full
  autopeft search --backbone unetr --budget 1%
  autopeft predict --model runs/unetr-... --target 5 --input scans/ --out predictions/
  autopeft export runs/unetr-... --target 5 --out bundles/unetr-1-5

Run 'autopeft COMMAND --help' for the options of one command.
"""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the epilog's line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        # "(default: None)" or "(default: False)" teaches nothing, and an option whose help
        # already explains its default ("default: the preset's") needs no second one.
        if action.required or action.default is None or action.default is False or (action.help and "default" in action.help.lower()):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autopeft",
        description="Find how to fine-tune a pre-trained 3D image-to-image network for a new "
        "scanner with a small fraction of its parameters.",
        epilog=_EPILOG,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"autopeft {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, summary) in _SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(
            name,
            help=summary,
            description=(module.__doc__ or summary).strip(),
            formatter_class=_Formatter,
        )
        module.configure(sub)
        sub.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        print("\nautopeft: interrupted; finished work is kept on disk.", file=sys.stderr)
        return 130
    except AutopeftError as err:
        print(f"autopeft {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
