"""Fine-tune a pre-trained backbone on a target scanner with one or more plans, and score each.

The source model comes from the pre-training cache (trained first if missing, see 'autopeft
pretrain'). Each plan is applied to a fresh copy of it, fine-tuned on the target scanner's few
fine-tuning subjects by the same recipe a search's trials use, and scored on the target's
validation subjects (--split val, the default: compare and choose plans there) or, when asked,
its test subjects (--split test: once a choice is made; choosing on them makes their score
optimistic) by sliding-window inference over whole volumes: PSNR (dB, peak 1 on [0,1] data),
3D SSIM (7^3 window) and NRMSE (RMSE / target range), beside the identity baseline (the short scan
itself taken as the prediction). Also printed: % of the network's parameters trained, seconds per
epoch and peak memory.

plans (--plan, comma-separated):
  a named plan   e.g. unetr-lora, petite-unetr, cvtgan-vpt (see autopeft/plans/), or a YAML file
  table1         every row of PETITE's Table 1 for the backbone: No-FT, Full-FT, LayerNorm, BitFit,
                 LoRA, Adapters, SSF, VPT and the PETITE winner
--method none,full is shorthand for the backbone's No-FT and Full-FT plans.

Epochs and learning rate: --epochs/--lr if given, else the plan's train section (a search's plans
carry theirs), else the preset's schedule (paper: PETITE's 200 UNETR / 150 CVT-GAN epochs, lr 1e-3
PEFT, 1e-4 Full-FT; tiny: CPU-scaled). SH-PEFT plans use the plan's train.shpeft_lambda.

A plan from a search (RUN_DIR/best_plan.yaml, RUN_DIR/pareto/*.yaml) brings the run's settings
with it: its data, preset, subject counts and source-model epochs are read from RUN_DIR/run.json.
With the run's --fold and --seed it reproduces the trial's validation scores; its mixed precision (--amp)
comes from run.json too unless --amp or --no-amp is given.

examples:
  autopeft finetune --backbone unetr --source 1 --target 5 --method none,full
  autopeft finetune --backbone cvtgan --source 1 --target 5 --plan table1
  autopeft finetune --backbone unetr --source 1 --target 5 --plan my_plan.yaml --save out/
  autopeft finetune --backbone cvtgan --source 1 --target 5 --plan runs/cvtgan-20260101-120000/best_plan.yaml --split test
  autopeft finetune --backbone monai:BasicUNet --net-args '{"features": [8, 8, 16, 16, 32, 8]}' --source 1 --target 5 \
      --plan my_basicunet_plan.yaml
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from autopeft.cli._common import (
    add_amp_argument,
    add_data_argument,
    add_model_arguments,
    add_weights_argument,
    print_table,
    resolve_device,
    resolve_manifest,
)
from autopeft.errors import ConfigError

_METHOD_PLANS = {"none": "noft", "full": "fullft"}


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.set_defaults(preset=None)  # None: the plan's search run decides, else tiny
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
    parser.add_argument("--split", default="val", choices=("val", "test"),
                        help="held-out subjects to score: val (those plans are compared and chosen on), or test "
                             "(only for a plan already chosen) (default: val)")
    add_amp_argument(parser, what="fine-tuning, scoring and a missing source model's pre-training", from_run=True)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    from autopeft.cli._common import add_network_arguments

    add_network_arguments(parser)


def _plan_names(args: argparse.Namespace) -> list[str]:
    names: list[str] = []
    for method in filter(None, (m.strip() for m in (args.method or "").split(","))):
        if method not in _METHOD_PLANS:
            raise ConfigError(f"--method {method!r} is not known; choose from {', '.join(_METHOD_PLANS)}.")
        names.append(f"{args.backbone}-{_METHOD_PLANS[method]}")
    for entry in filter(None, (p.strip() for p in (args.plan or "").split(","))):
        if entry == "table1":
            from autopeft.search.portfolio import TABLE1_ROWS  # here, not at the top: keeps --help fast

            # PETITE's Table 1 in the paper's order: the references, the single-method rows, the winner.
            names += [f"{args.backbone}-{row}" for row in ("noft", "fullft", *TABLE1_ROWS)] + [f"petite-{args.backbone}"]
        else:
            names.append(entry)
    return names or [f"{args.backbone}-{m}" for m in _METHOD_PLANS.values()]


def _run_settings(plan_paths: list[str]) -> dict:
    """The settings of the search a plan file comes from (``RUN_DIR/run.json`` beside or above it)."""
    for entry in plan_paths:
        path = Path(entry)
        if not path.is_file():
            continue
        for folder in (path.parent, path.parent.parent):
            meta = folder / "run.json"
            if meta.is_file():
                return {**json.loads(meta.read_text(encoding="utf-8"))["config"], "run_dir": str(folder)}
    return {}


def run(args: argparse.Namespace) -> int:
    from autopeft._io import path_component, path_inside
    from autopeft.data import Protocol
    from autopeft.finetuning import FinetuneJob, finetune_plan, source_model
    from autopeft.peft import load_plan, save_trained

    if str(args.source) == str(args.target):
        raise ConfigError("--target must differ from --source: fine-tuning adapts to another scanner.")
    from autopeft.cli._common import resolve_backbone
    from autopeft.backbones.network import is_network_spec, load_run_network

    from_run = _run_settings(args.plan.split(",") if args.plan else [])
    if from_run and is_network_spec(args.backbone) and from_run.get("backbone") == args.backbone:
        load_run_network(from_run["run_dir"])  # the search's own network configuration
    else:
        args.backbone, args.preset = resolve_backbone(args, quiet=args.quiet, on_data=True)
    names = _plan_names(args)
    plans = [load_plan(name) for name in names]  # fail on a bad name before training
    for plan in plans:
        if plan.backbone != args.backbone:
            raise ConfigError(f"Plan {plan.name or '?'} is for backbone {plan.backbone!r}, not {args.backbone!r}.")
    found = _run_settings(names)
    if found and not args.quiet:
        print(f"settings of the search in {found['run_dir']} (run.json): data, preset, subject counts, source-model epochs, "
              "mixed precision")
    preset = args.preset or found.get("preset") or "tiny"
    data = args.data if args.data is not None else found.get("data")
    pretrain_epochs = args.pretrain_epochs if args.pretrain_epochs is not None else found.get("pretrain_epochs")
    protocol = Protocol.from_settings(found.get("protocol"))
    amp = args.amp if args.amp is not None else bool(found.get("amp", False))
    device = resolve_device(args.device)
    manifest_path = resolve_manifest(data, progress=not args.quiet)
    job = FinetuneJob(
        backbone=args.backbone, preset=preset, manifest_path=str(manifest_path), source=str(args.source),
        target=str(args.target), fold=args.fold, seed=args.seed, protocol=protocol,
        pretrain_epochs=pretrain_epochs, device=device, weights=args.weights, amp=amp,
    )
    source = source_model(job, progress=not args.quiet)
    rows, identity = [], None
    for plan in plans:
        label = plan.name or "plan"
        model, result = finetune_plan(plan, job, splits=(args.split,), epochs=args.epochs, lr=args.lr, source=source,
                                      progress=not args.quiet)
        identity = result.identity
        rows.append(_row(label, "yes" if plan.bitfit else "-", f"{100 * result.fraction:.3f}%", result.metrics,
                         result.seconds_per_epoch, result.peak_memory_mb))
        if args.save and result.history:
            # A plan's name comes from its YAML file: a path component inside --save.
            folder = path_inside(args.save, Path(args.save) / path_component(label), what="--save's trained-plan folder")
            save_trained(model, plan, folder, info={"plan": label, "source": str(args.source), "target": str(args.target),
                                                    "fold": args.fold})
    rows.insert(0, _row("Identity (input)", "-", "-", identity, 0.0, 0.0))
    split = {"test": "test", "val": "validation"}[args.split]
    print(f"\n{args.backbone}/{preset}: scanner {args.source} -> {args.target} (fold {args.fold}, seed {args.seed}; {split} "
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
