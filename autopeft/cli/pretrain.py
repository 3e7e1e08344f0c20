"""Pre-train a backbone on one source scanner, or fetch it from the cache.

The model trains on the source scanner's pre-training subjects (random crops of the preset's size)
and is validated about ten times per run (and at the last epoch) on held-out subjects by
sliding-window inference over whole volumes;
the epoch with the best validation PSNR is kept. UNETR trains with an L1 loss; CVT-GAN trains
adversarially (G: BCE + 100 x L1; D sees short scan + target or fake as two channels).

The result is cached under $AUTOPEFT_CACHE (default ~/.cache/autopeft)/pretrained/, keyed by
backbone, preset, source, fold, epochs, learning rate, seed, --amp (when given) and a hash of the data
manifest. An interrupted run (Ctrl-C, a killed process) resumes from its last finished epoch when run again.

With --weights FILE_OR_DIR your own pre-trained model is imported instead: checked against the
backbone and preset (a mismatch lists the missing and unexpected names and what the file fits) and
cached by its content hash, so that finetune, importance and search --weights use the same entry.

examples:
  autopeft pretrain --backbone unetr --source 1
  autopeft pretrain --backbone cvtgan --source 3 --epochs 100 --data data/sim
  autopeft pretrain --backbone unetr --source "Biograph mCT" --weights my_unetr_state_dict.pt
"""

from __future__ import annotations

import argparse

from autopeft.cli._common import (
    add_amp_argument, add_data_argument, add_model_arguments, add_weights_argument, resolve_device, resolve_manifest,
)


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--source", required=True, help="source scanner id (e.g. 1)")
    add_data_argument(parser)
    add_weights_argument(parser)
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the preset's)")
    parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: the preset's)")
    parser.add_argument("--out", default=None, help="also copy the checkpoint (safetensors) to this directory")
    add_amp_argument(parser, what="pre-training and its validation")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    from autopeft.cli._common import add_network_arguments

    add_network_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from autopeft.pretraining import pretrained_model

    from autopeft.cli._common import resolve_backbone

    args.backbone, args.preset = resolve_backbone(args, quiet=args.quiet, on_data=True)
    manifest = resolve_manifest(args.data, progress=not args.quiet) if args.weights is None else None
    model, meta = pretrained_model(
        args.backbone,
        args.source,
        manifest_path=manifest,
        preset=args.preset,
        fold=args.fold,
        epochs=args.epochs,
        lr=args.lr,
        seed=args.seed,
        device=resolve_device(args.device),
        progress=not args.quiet,
        weights=args.weights,
        amp=args.amp,
    )
    best = meta["best"]
    if best is None:  # imported, not trained here
        from autopeft.pretraining import cache_root

        print(f"{args.backbone}/{args.preset} imported from {meta['imported_from']} (sha256 {meta['sha256'][:16]}): "
              f"every name and shape fits; cached in {cache_root() / 'pretrained'} as "
              f"imported-{args.backbone}-{args.preset}-{meta['sha256'][:16]}")
    else:
        print(
            f"{args.backbone}/{args.preset} pre-trained on scanner {args.source}: best epoch {best['epoch']} "
            f"of {meta['epochs']}, validation PSNR {best['psnr']:.3f} dB, SSIM {best['ssim']:.4f}, "
            f"NRMSE {best['nrmse']:.4f}"
        )
    if args.out:
        from autopeft._io import atomic_write_json
        from autopeft.checkpoints import save_checkpoint

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(model, out / "model.safetensors", meta)
        atomic_write_json(out / "meta.json", meta)
        print(f"checkpoint written to {out / 'model.safetensors'}")
    return 0
