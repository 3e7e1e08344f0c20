"""SH-PEFT importance of a pre-trained source model's weights on a target scanner.

Scores every weight of the network by I = I_task + lambda * s * I_agnostic (SH-PEFT, Sec. 2.2):
l2 variant (default, the paper's best): squared gradients summed over one epoch of the target's
fine-tuning crops + squared weights; l1 variant: |accumulated gradient| + |weight|; s rescales the
second term to the first's total before lambda. Scores are aggregated per site (mean over the
site's weights, and its share of the total), written as JSON and the top sites printed: where a
PEFT method is most likely to pay off.

examples:
  autopeft importance --backbone unetr --source 1 --target 5
  autopeft importance --backbone cvtgan --source 1 --target 3 --variant l1 --lambda 0.5 --out imp.json
"""

from __future__ import annotations

import argparse

from autopeft.cli._common import add_data_argument, add_model_arguments, add_weights_argument, print_table, resolve_device, resolve_manifest


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--source", required=True, help="source scanner id the model was pre-trained on")
    parser.add_argument("--target", required=True, help="target scanner whose fine-tuning scans are scored")
    parser.add_argument("--variant", choices=("l1", "l2"), default="l2", help="SH-PEFT importance variant")
    parser.add_argument("--lambda", dest="lam", type=float, default=1.0, help="weight of the task-agnostic term")
    parser.add_argument("--top", type=int, default=10, help="how many sites to print")
    parser.add_argument("--out", default=None, help="JSON output (default: importance-<backbone>-<source>-<target>.json)")
    add_data_argument(parser)
    add_weights_argument(parser)
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="epochs of the source model")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    from autopeft.cli._common import add_network_arguments

    add_network_arguments(parser, schedule=False)


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from autopeft._io import atomic_write_json
    from autopeft.data import read_manifest, split_scanner
    from autopeft.errors import ConfigError
    from autopeft.importance import importance_on_scans, site_importance
    from autopeft.pretraining import pretrained_model

    if args.lam < 0:
        raise ConfigError(f"--lambda must be >= 0, but got {args.lam}.")
    if args.top < 1:
        raise ConfigError(f"--top must be >= 1, but got {args.top}.")
    from autopeft.cli._common import resolve_backbone

    args.backbone, args.preset = resolve_backbone(args, quiet=args.quiet, on_data=True)
    device = resolve_device(args.device)
    manifest_path = resolve_manifest(args.data, progress=not args.quiet)
    model, _ = pretrained_model(
        args.backbone, args.source, manifest_path=manifest_path, preset=args.preset, fold=args.fold,
        epochs=args.pretrain_epochs, seed=args.seed, device=device, progress=not args.quiet,
        weights=args.weights,
    )
    train = split_scanner(read_manifest(manifest_path), str(args.target), purpose="finetune", fold=args.fold,
                          seed=args.seed)["train"]
    started = time.perf_counter()
    scores = importance_on_scans(model, train, variant=args.variant, lam=args.lam, seed=args.seed, device=device)
    seconds = time.perf_counter() - started
    mean = site_importance(model, scores, reduce="mean")
    total = site_importance(model, scores, reduce="sum")
    grand = sum(float(s.sum()) for s in scores.values()) or 1.0
    sites = [
        {"site": s.name, "role": s.role, "kind": s.kind, "mean": mean[s.name], "share": total[s.name] / grand,
         "params": sum(p.numel() for p in s.module.parameters())}
        for s in model.sites()
    ]
    from autopeft._io import path_component

    # Scanner names may be any text: the default file name holds them as path components.
    names = "-".join(path_component(name) for name in (args.backbone, args.source, args.target))
    out = Path(args.out or f"importance-{names}.json")
    payload = {"backbone": args.backbone, "preset": args.preset, "source": str(args.source), "target": str(args.target),
               "fold": args.fold, "variant": args.variant, "lambda": args.lam, "seconds": seconds,
               "train_subjects": [r["subject"] for r in train], "sites": sites}
    atomic_write_json(out, payload)
    ranked = sorted(sites, key=lambda r: r["mean"], reverse=True)[: args.top]
    print(f"\nSH-PEFT importance ({args.variant}, lambda {args.lam:g}) of {args.backbone}/{args.preset} "
          f"pre-trained on scanner {args.source}, on scanner {args.target}: {seconds:.1f} s")
    print_table(
        [{**r, "mean": f"{r['mean']:.3e}", "share": f"{100 * r['share']:.1f}%", "params": f"{r['params']:,}"} for r in ranked],
        {"site": "Site", "role": "Role", "kind": "Kind", "mean": "Mean importance", "share": "Share of total",
         "params": "Params"},
    )
    print(f"written to {out}")
    return 0
