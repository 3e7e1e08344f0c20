"""Export a search's recommended model for one target scanner as a MONAI bundle.

The recommended plan's trained parts (RUN_DIR/weights/<N>/ of summary.json's confirmed
recommendation #N, else RUN_DIR/best_weights/; on the run's source model) are merged
into plain weights: LoRA, SSF and SH-PEFT fold into the layers they adapt; BitFit, LayerNorm and
Full-FT already live in them. The merged model's outputs are checked against the unmerged one's on
a held-out scan of the target (printed). Methods that are not linear (VPT, adapters) cannot be
folded in: their sites stay as modules and the export says which.

The bundle (--out):
  configs/metadata.json    network_data_format, versions, the plan, % trained, and where the run
                           confirmed the plan, the test PSNR +- CI of this source -> target pair
                           over the target's test subjects (confirmation.csv)
  configs/inference.json   network_def (autopeft.bundle.bundle_network), sliding-window inferer
  models/model.safetensors
  docs/README.md

MONAI's own tools take it offline:
  python -m monai.bundle verify_net_in_out network_def --meta_file OUT/configs/metadata.json \\
      --config_file OUT/configs/inference.json
and 'autopeft predict --model OUT' applies it.

examples:
  autopeft export runs/unetr-20250101-120000 --target 5 --out bundles/unetr-1-5
  autopeft export runs/cvtgan-20250101-120000 --target "Biograph mCT" --source HRRT --out bundles/mct
"""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a search's run directory (its --out)")
    parser.add_argument("--target", default=None, help="target scanner (needed when the run fine-tuned several)")
    parser.add_argument("--source", default=None, help="source scanner, when the run has several for --target")
    parser.add_argument("--out", required=True, metavar="DIR", help="the bundle folder (new, empty, or an earlier export)")


def run(args: argparse.Namespace) -> int:
    from autopeft.bundle import export_run

    done = export_run(args.run_dir, args.out, target=args.target, source=args.source)
    print(f"{done['name']}: {done['trained_percent']:.3f}% of the parameters trained")
    if done["unmerged"]:
        print(f"not merged (not linear, kept as modules): {', '.join(done['unmerged'])}; the rest is merged")
    else:
        print("merged into plain weights")
    print(f"check: merged outputs equal the unmerged model's on {done['test_volume']} "
          f"(max |diff| {done['merge_diff']:.2e}); the bundle rebuilt by monai.bundle.ConfigParser gives the "
          f"run's outputs (max |diff| {done['parser_diff']:.2e})")
    if done["test_psnr"]:
        print(f"confirmed test PSNR {done['test_psnr_text']} recorded in configs/metadata.json")
    else:
        print("the run has no confirmed test PSNR for this model (confirmation.csv); metadata leaves it out")
    print(f"bundle: {done['out']}\n  verify: python -m monai.bundle verify_net_in_out network_def "
          f"--meta_file {done['out']}/configs/metadata.json --config_file {done['out']}/configs/inference.json")
    return 0
