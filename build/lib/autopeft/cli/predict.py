"""Apply a fine-tuned model to short scans: one NIfTI out per scan, in the input's units and grid.

--model is a search's run directory (the recommended plan's trained parts for --target: the
confirmed recommendation's weights/<N>/, else best_weights/; on the run's source model from the
cache), a trained-plan folder (finetune --save, a run's best_weights/
entry; outside a run, pass the pre-trained model it came from with --weights), or a MONAI bundle
written by 'autopeft export'. --input is a NIfTI file, a folder of them, or a manifest.csv (then
only the rows of the model's target scanner, and their long scans are used for scores).

Each short scan is scaled to [0, 1] exactly as in training (times 0.3 / its tissue mean, clipped),
predicted by MONAI's sliding-window inference (windows of the preset's crop, Gaussian blending),
clipped to [0, 1] as the evaluation scores it, and divided by the same factor: the output is in the
input's units, on its grid, with its affine and header, as OUT/<name>_pred.nii.gz (<name>: the
input's file name, or the manifest's subject; a name other than letters, digits, '.', '_' and '-'
gets a readable stem and a short hash, and predictions.json keeps it as it is). An input is never
overwritten. With long scans (a manifest) it prints PSNR / SSIM / NRMSE per scan, computed as the
search's evaluation does.

examples:
  autopeft predict --model runs/unetr-20250101-120000 --target 5 --input new_scans/ --out predictions/
  autopeft predict --model runs/unetr-20250101-120000 --target 5 --input data/sim/manifest.csv --out pred/
  autopeft predict --model bundles/unetr-1-5 --input sub-01_short.nii.gz --out pred/ --device cuda
"""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="RUN_DIR|TRAINED_DIR|BUNDLE", help="what to predict with (see above)")
    parser.add_argument("--input", required=True, metavar="FILE|DIR|manifest.csv", help="the short scans (see above)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    parser.add_argument("--target", default=None, help="target scanner of the model (needed when a run fine-tuned several)")
    parser.add_argument("--source", default=None, help="source scanner, when a run has several for --target")
    from autopeft.cli._common import add_weights_argument

    add_weights_argument(parser)
    parser.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from autopeft.cli._common import print_table, resolve_device
    from autopeft.errors import ConfigError
    from autopeft.inference import predict_scans, scan_inputs
    from autopeft.model_loading import load_model

    if not 0.0 <= args.overlap < 1.0:
        raise ConfigError(f"--overlap must be in [0, 1), but got {args.overlap}.")
    device = resolve_device(args.device)
    loaded = load_model(args.model, target=args.target, source=args.source, weights=args.weights)
    scans = scan_inputs(args.input, target=loaded.target or args.target)
    print(f"model: {loaded.backbone}/{loaded.preset} from {loaded.origin}; {len(scans)} scan(s) on {device}, "
          f"windows {'x'.join(map(str, loaded.roi_size))}")
    results = predict_scans(loaded, scans, args.out, device=device, overlap=args.overlap, progress=not args.quiet)
    scored = [r for r in results if "psnr" in r]
    if scored:
        rows = [{"input": r["input"], "psnr": f"{r['psnr']:.3f}", "identity": f"{r['identity_psnr']:.3f}",
                 "ssim": f"{r['ssim']:.4f}", "nrmse": f"{r['nrmse']:.4f}"} for r in scored]
        n = len(scored)
        rows.append({"input": f"mean of {n}", "psnr": f"{sum(r['psnr'] for r in scored) / n:.3f}",
                     "identity": f"{sum(r['identity_psnr'] for r in scored) / n:.3f}",
                     "ssim": f"{sum(r['ssim'] for r in scored) / n:.4f}", "nrmse": f"{sum(r['nrmse'] for r in scored) / n:.4f}"})
        print("against the long scans (PSNR peak 1 on [0,1] data, as the evaluation; identity = the short scan itself):")
        print_table(rows, {"input": "short scan", "psnr": "PSNR", "identity": "PSNR input", "ssim": "SSIM", "nrmse": "NRMSE"},
                    left=("input",))
    from pathlib import Path

    from autopeft._io import atomic_write_json

    atomic_write_json(Path(args.out) / "predictions.json", results)
    print(f"{len(results)} prediction(s) written to {args.out} (list: {Path(args.out) / 'predictions.json'})")
    return 0
