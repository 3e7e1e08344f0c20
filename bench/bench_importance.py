"""Cost of SH-PEFT importance against one fine-tuning run of the same preset.

For each backbone, on the built-in simulated data (or --data): the target scanner's fine-tuning
training subjects are scored once with ``autopeft.importance.importance_on_scans`` (one epoch of
crops, l2 variant), and one fine-tuning run of the preset's default length (Full-FT plan, the
same crops per volume and epochs as ``autopeft finetune``) is trained on the same subjects.
Both are timed side by side in one process, alternating, ``--reps`` times; the figure is the
ratio of the medians (the issue's goal: importance at most 10% of a fine-tuning run).

    python bench/bench_importance.py                    # tiny preset, CPU
    python bench/bench_importance.py --threads 1 --reps 3
    python bench/bench_importance.py --preset paper --device cuda

Prints a table and writes bench/results/importance.json. Figures are never asserted on.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path


def _time_finetune(model, records, preset: str, device: str, seed: int) -> float:
    from autopeft.data import train_loader
    from autopeft.train import Trainer, TrainSettings

    schedule = model.preset.finetune
    model = copy.deepcopy(model)
    model.requires_grad_(False)
    model.net.requires_grad_(True)
    loader = train_loader(records, crop_size=model.preset.crop_size, batch_size=model.preset.batch_size, seed=seed,
                          crops_per_volume=schedule.crops_per_volume)
    trainer = Trainer(model, TrainSettings(epochs=schedule.epochs, lr=schedule.lr_full), device=device)
    started = time.perf_counter()
    trainer.fit(loader)
    return time.perf_counter() - started


def _time_importance(model, records, device: str, seed: int) -> float:
    from autopeft.importance import importance_on_scans

    started = time.perf_counter()
    importance_on_scans(model, records, seed=seed, device=device)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="unetr,cvtgan")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--target", default="5")
    parser.add_argument("--data", default=None, help="manifest or its folder (default: built-in data)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/importance.json")
    args = parser.parse_args()

    import torch

    from autopeft.data import read_manifest, resolve_manifest, split_scanner
    from autopeft.backbones import build_backbone

    if args.threads:
        torch.set_num_threads(args.threads)
    manifest = read_manifest(resolve_manifest(args.data, progress=False))
    records = split_scanner(manifest, args.target, purpose="finetune", seed=args.seed)["train"]
    rows = []
    for name in args.backbones.split(","):
        torch.manual_seed(args.seed)
        model = build_backbone(name, args.preset).to(args.device)
        _time_importance(model, records[:1], args.device, args.seed)  # warm-up (caches, first-call costs)
        imp, ft = [], []
        for _ in range(args.reps):
            imp.append(_time_importance(model, records, args.device, args.seed))
            ft.append(_time_finetune(model, records, args.preset, args.device, args.seed))
        row = {"backbone": name, "preset": args.preset, "importance_s": imp, "finetune_s": ft,
               "importance_s_median": statistics.median(imp), "finetune_s_median": statistics.median(ft)}
        row["ratio"] = row["importance_s_median"] / row["finetune_s_median"]
        rows.append(row)
        print(f"{name:8s} {args.preset:6s} importance {row['importance_s_median']:7.2f} s   fine-tuning run "
              f"{row['finetune_s_median']:7.2f} s   ratio {100 * row['ratio']:.1f}%")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "importance", "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "device": args.device,
                    "threads": torch.get_num_threads()},
        "target": args.target, "train_subjects": [r["subject"] for r in records], "reps": args.reps, "rows": rows,
    }, indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
