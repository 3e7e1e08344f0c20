"""Fine-tune a pre-trained backbone on a target scanner with one or more plans, and score each.

The source model comes from the pre-training cache (trained first if missing, see 'autopeft
pretrain'). Each plan is applied to a fresh copy of it, fine-tuned on the target scanner's few
fine-tuning subjects and scored on the target's held-out subjects by sliding-window inference over
whole volumes: PSNR (dB, peak 1 on [0,1] data), 3D SSIM (7^3 window) and NRMSE (RMSE / target
range), beside the identity baseline (the short scan itself taken as the prediction). Also printed:
% of the network's parameters trained, seconds per epoch and peak memory.

plans (--plan, comma-separated):
  a named plan   e.g. unetr-lora, petite-unetr, cvtgan-vpt (see autopeft/plans/), or a YAML file
  table1         every row of PETITE's Table 1 for the backbone: No-FT, Full-FT, LayerNorm, BitFit,
                 LoRA, Adapters, SSF, VPT and the PETITE winner
--method none,full is shorthand for the backbone's No-FT and Full-FT plans.

Epochs and learning rate: --epochs/--lr if given; the paper preset follows each plan's train
section (PETITE's settings); the tiny preset uses CPU-scaled defaults.

examples:
  autopeft finetune --backbone unetr --source 1 --target 5 --method none,full
  autopeft finetune --backbone cvtgan --source 1 --target 5 --plan table1
  autopeft finetune --backbone unetr --source 1 --target 5 --plan my_plan.yaml --save out/
"""

from __future__ import annotations

import argparse
import copy

from autopeft.cli._common import (
    add_data_argument,
    add_model_arguments,
    add_weights_argument,
    print_table,
    resolve_device,
    resolve_manifest,
)
from autopeft.errors import ConfigError

_METHOD_PLANS = {"none": "noft", "full": "fullft"}
# PETITE's Table 1 rows, in the paper's order.
_TABLE1 = ("noft", "fullft", "layernorm", "bitfit", "lora", "adapters", "ssf", "vpt")


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--source", required=True, help="source scanner id the model was pre-trained on")
    parser.add_argument("--target", required=True, help="target scanner id to fine-tune on")
    parser.add_argument("--method", default=None, help="shorthand plans, comma-separated: none (No-FT), full (Full-FT)")
    parser.add_argument("--plan", default=None, help="plans to run, comma-separated: names, YAML files, or table1")
    add_data_argument(parser)
    add_weights_argument(parser)
    parser.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default: see above)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: see above)")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="epochs of the source model")
    parser.add_argument("--save", default=None, metavar="DIR",
                        help="save each plan's trained part (safetensors + plan YAML) under DIR/<plan>/")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _plan_names(args: argparse.Namespace) -> list[str]:
    names: list[str] = []
    for method in filter(None, (m.strip() for m in (args.method or "").split(","))):
        if method not in _METHOD_PLANS:
            raise ConfigError(f"--method {method!r} is not known; choose from {', '.join(_METHOD_PLANS)}.")
        names.append(f"{args.backbone}-{_METHOD_PLANS[method]}")
    for entry in filter(None, (p.strip() for p in (args.plan or "").split(","))):
        if entry == "table1":
            names += [f"{args.backbone}-{row}" for row in _TABLE1] + [f"petite-{args.backbone}"]
        else:
            names.append(entry)
    return names or [f"{args.backbone}-{m}" for m in _METHOD_PLANS.values()]


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from autopeft.data import read_manifest, split_scanner
    from autopeft.finetuning import FINETUNE_DEFAULTS, finetune, plan_preparer, plan_schedule
    from autopeft.importance import importance_on_scans
    from autopeft.peft import load_plan, save_trained
    from autopeft.pretraining import pretrained_model

    if str(args.source) == str(args.target):
        raise ConfigError("--target must differ from --source: fine-tuning adapts to another scanner.")
    plans = [load_plan(name) for name in _plan_names(args)]  # fail on a bad name before training
    for plan in plans:
        if plan.backbone != args.backbone:
            raise ConfigError(f"Plan {plan.name or '?'} is for backbone {plan.backbone!r}, not {args.backbone!r}.")
    device = resolve_device(args.device)
    manifest_path = resolve_manifest(args.data, progress=not args.quiet)
    manifest = read_manifest(manifest_path)
    source_model, _ = pretrained_model(
        args.backbone, args.source, manifest_path=manifest_path, preset=args.preset, fold=args.fold,
        epochs=args.pretrain_epochs, seed=args.seed, device=device, progress=not args.quiet,
        weights=args.weights,
    )
    crops = int(FINETUNE_DEFAULTS.get(args.preset, FINETUNE_DEFAULTS["paper"]).get("crops", 1))
    rows, identity = [], None
    for plan in plans:
        importance = None
        if any(spec.method == "shpeft" for spec in plan.sites.values()):
            train = split_scanner(manifest, str(args.target), purpose="finetune", fold=args.fold, seed=args.seed)["train"]
            importance = importance_on_scans(copy.deepcopy(source_model), train, seed=args.seed, device=device)
        model = copy.deepcopy(source_model)
        epochs, lr = plan_schedule(plan, args.preset, epochs=args.epochs, lr=args.lr)
        label = plan.name or "plan"
        result = finetune(
            model, args.target, manifest=manifest, method=label, prepare=plan_preparer(plan, importance=importance),
            epochs=epochs, lr=lr, fold=args.fold, seed=args.seed, device=device, progress=not args.quiet,
            crops_per_volume=crops,
        )
        identity = result.identity
        rows.append(_row(label, "yes" if plan.bitfit else "-", f"{100 * result.fraction:.3f}%", result.metrics,
                         result.seconds_per_epoch, result.peak_memory_mb))
        if args.save and epochs > 0:
            out = Path(args.save) / label
            save_trained(model, plan, out)
    rows.insert(0, _row("Identity (input)", "-", "-", identity, 0.0, 0.0))
    print(f"\n{args.backbone}/{args.preset}: scanner {args.source} -> {args.target} (fold {args.fold}; held-out "
          f"subjects of the target; PSNR peak 1 on [0,1] data, SSIM 3D 7^3, NRMSE = RMSE / range)")
    print_table(rows, {"method": "Method", "bitfit": "BitFit", "params": "% Params", "psnr": "PSNR",
                       "ssim": "SSIM", "nrmse": "NRMSE", "epoch_s": "s/epoch", "mem": "peak MB"}, left=("method",))
    if args.save:
        print(f"trained parts saved under {args.save}/<plan>/")
    return 0


def _row(label: str, bitfit: str, params: str, metrics: dict, seconds: float, memory: float) -> dict:
    return {
        "method": label,
        "bitfit": bitfit,
        "params": params,
        "psnr": f"{metrics['psnr']:.3f}",
        "ssim": f"{metrics['ssim']:.4f}",
        "nrmse": f"{metrics['nrmse']:.4f}",
        "epoch_s": f"{seconds:.2f}" if seconds else "-",
        "mem": f"{memory:.0f}" if memory else "-",
    }
