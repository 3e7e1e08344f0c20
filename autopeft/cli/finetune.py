"""Fine-tune a pre-trained backbone on a target scanner and score it.

The source model comes from the pre-training cache (trained first if missing, see 'autopeft
pretrain'). It is fine-tuned on the target scanner's few fine-tuning subjects and scored on the
target's held-out subjects by sliding-window inference over whole volumes: PSNR (dB, peak 1 on
[0,1] data), 3D SSIM (7^3 window) and NRMSE (RMSE / target range), beside the identity baseline
(the short scan itself taken as the prediction).

methods:
  none   No-FT: the source model as it is
  full   Full-FT: every parameter of the network trains

Several methods can be compared in one run: --method none,full

examples:
  autopeft finetune --backbone unetr --source 1 --target 5 --method none,full
"""

from __future__ import annotations

import argparse
import copy

from autopeft.cli._common import (
    add_data_argument,
    add_model_arguments,
    print_table,
    resolve_device,
    resolve_manifest,
)
from autopeft.errors import ConfigError

_METHODS = ("none", "full")


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--source", required=True, help="source scanner id the model was pre-trained on")
    parser.add_argument("--target", required=True, help="target scanner id to fine-tune on")
    parser.add_argument("--method", default="none,full", help=f"comma-separated, from: {', '.join(_METHODS)}")
    add_data_argument(parser)
    parser.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default: the preset's)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the preset's)")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="epochs of the source model")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _prepare_full(model) -> tuple[int, int]:
    from autopeft.finetuning import count_parameters

    model.requires_grad_(False)
    model.net.requires_grad_(True)
    return count_parameters(model.net)


def _prepare_none(model) -> tuple[int, int]:
    from autopeft.finetuning import count_parameters

    model.requires_grad_(False)
    return count_parameters(model.net)


def run(args: argparse.Namespace) -> int:
    from autopeft.data import read_manifest
    from autopeft.finetuning import FINETUNE_DEFAULTS, finetune
    from autopeft.pretraining import pretrained_model

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    for method in methods:
        if method not in _METHODS:
            raise ConfigError(f"--method {method!r} is not known; choose from {', '.join(_METHODS)}.")
    if str(args.source) == str(args.target):
        raise ConfigError("--target must differ from --source: fine-tuning adapts to another scanner.")
    device = resolve_device(args.device)
    manifest_path = resolve_manifest(args.data, progress=not args.quiet)
    manifest = read_manifest(manifest_path)
    source_model, _ = pretrained_model(
        args.backbone, args.source, manifest_path=manifest_path, preset=args.preset, fold=args.fold,
        epochs=args.pretrain_epochs, seed=args.seed, device=device, progress=not args.quiet,
    )
    defaults = FINETUNE_DEFAULTS.get(args.preset, FINETUNE_DEFAULTS["paper"])
    rows, identity = [], None
    for method in methods:
        model = copy.deepcopy(source_model)
        epochs = 0 if method == "none" else (args.epochs if args.epochs is not None else int(defaults["epochs"]))
        lr = args.lr if args.lr is not None else defaults["lr_full"]
        result = finetune(
            model, args.target, manifest=manifest, method=method,
            prepare=_prepare_none if method == "none" else _prepare_full,
            epochs=epochs, lr=lr, fold=args.fold, seed=args.seed, device=device, progress=not args.quiet,
            crops_per_volume=int(defaults.get("crops", 1)),
        )
        identity = result.identity
        rows.append(_row({"none": "No-FT", "full": "Full-FT"}[method], result.fraction, result.metrics,
                         result.seconds_per_epoch, result.peak_memory_mb))
    rows.insert(0, _row("Identity (input)", 0.0, identity, 0.0, 0.0))
    print(f"\n{args.backbone}/{args.preset}: scanner {args.source} -> {args.target} (fold {args.fold}, "
          f"held-out subjects of the target; PSNR peak 1 on [0,1] data)")
    print_table(rows, {"method": "Method", "params": "% Params", "psnr": "PSNR", "ssim": "SSIM",
                       "nrmse": "NRMSE", "epoch_s": "s/epoch", "mem": "peak MB"})
    return 0


def _row(label: str, fraction: float, metrics: dict, seconds: float, memory: float) -> dict:
    return {
        "method": label,
        "params": f"{100 * fraction:.2f}%" if label != "Identity (input)" else "-",
        "psnr": f"{metrics['psnr']:.3f}",
        "ssim": f"{metrics['ssim']:.4f}",
        "nrmse": f"{metrics['nrmse']:.4f}",
        "epoch_s": f"{seconds:.2f}" if seconds else "-",
        "mem": f"{memory:.0f}" if memory else "-",
    }
