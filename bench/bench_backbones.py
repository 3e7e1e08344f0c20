"""Training-step time and peak memory of each backbone x preset.

One training step is what pre-training does per batch: forward, the backbone's loss, backward and
an AdamW step. For L1 backbones (UNETR) that is one network; for CVT-GAN it is a discriminator step
(0.5 * (BCE(D(x, y), 1) + BCE(D(x, G(x)), 0))) followed by a generator step (BCE(D(x, G(x)), 1) +
100 * L1), both with BCE-with-logits.

Every configuration runs in a fresh subprocess, so that its peak resident memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own; on CUDA the peak of
``torch.cuda.max_memory_allocated`` is reported too. Times are medians over ``--steps`` steps after
``--warmup`` discarded ones. Prints a table and writes bench/results/backbones.json.

    python bench/bench_backbones.py                          # tiny and paper presets on CPU
    python bench/bench_backbones.py --presets tiny --steps 20
    python bench/bench_backbones.py --device cuda --amp      # paper batch 6 on a GPU, bf16 autocast

On CPU the paper presets default to batch 1 and 3 steps (a UNETR paper step takes seconds there);
elsewhere the preset's batch size is used unless ``--batch`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "backbones.json"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="unetr,cvtgan", help="comma-separated backbone names")
    parser.add_argument("--presets", default="tiny,paper", help="comma-separated preset names")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 10, 3 for paper on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="discarded steps (default: 2, 1 for paper on CPU)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: preset's; 1 for paper on CPU)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", nargs=2, metavar=("BACKBONE", "PRESET"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _defaults(args: argparse.Namespace, preset: str, preset_batch: int) -> tuple[int, int, int]:
    heavy = args.device == "cpu" and preset == "paper"
    steps = args.steps if args.steps is not None else (3 if heavy else 10)
    warmup = args.warmup if args.warmup is not None else (1 if heavy else 2)
    batch = args.batch if args.batch is not None else (1 if heavy else preset_batch)
    return steps, warmup, batch


def _worker(args: argparse.Namespace) -> dict:
    """Runs in its own process: build, train for warmup + steps, report one configuration."""
    import torch

    from autopeft.backbones import build_backbone

    name, preset_name = args.worker
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_backbone(name, preset_name).to(device).train()
    steps, warmup, batch = _defaults(args, preset_name, model.preset.batch_size)
    shape = (batch, 1, *model.preset.crop_size)
    short_scan = torch.rand(shape, device=device)
    long_scan = (short_scan + 0.1 * torch.rand(shape, device=device)).clamp(0, 1)
    generator_optimizer = torch.optim.AdamW(model.net.parameters(), lr=1e-4)
    discriminator = model.discriminator
    discriminator_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=1e-4) if discriminator else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.amp else nullcontext()

    def step() -> None:  # the backbone's own losses, as autopeft.train.Trainer steps them
        with autocast:
            fake = model(short_scan)
        if discriminator is not None:
            with autocast:
                d_loss = model.discriminator_loss(short_scan, long_scan, fake.detach())
            discriminator_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            discriminator_optimizer.step()
        with autocast:
            g_loss = model.generator_loss(short_scan, long_scan, fake.float())
        generator_optimizer.zero_grad(set_to_none=True)
        g_loss.backward()
        generator_optimizer.step()

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    rss_after_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    seconds = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    count = lambda module: sum(p.numel() for p in module.parameters()) if module is not None else 0  # noqa: E731
    return {
        "backbone": name,
        "preset": preset_name,
        "device": args.device,
        "amp": args.amp,
        "batch_size": batch,
        "crop_size": list(model.preset.crop_size),
        "net_parameters": count(model.net),
        "discriminator_parameters": count(discriminator),
        "warmup_steps": warmup,
        "step_seconds": seconds,
        "median_step_s": statistics.median(seconds),
        "min_step_s": min(seconds),
        "samples_per_s": batch / statistics.median(seconds),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_build_mib": rss_after_build,
        "cuda_peak_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
        "torch_threads": torch.get_num_threads(),
    }


def _run_fresh(args: argparse.Namespace, backbone: str, preset: str) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", backbone, preset, "--device", args.device]
    for flag in ("steps", "warmup", "batch", "threads"):
        if getattr(args, flag) is not None:
            command += [f"--{flag}", str(getattr(args, flag))]
    if args.amp:
        command.append("--amp")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"backbone": backbone, "preset": preset, "device": args.device, "error": done.stderr.strip()[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _print_table(results: list[dict]) -> None:
    header = f"{'backbone':<9} {'preset':<7} {'device':<6} {'batch':>5} {'median step s':>14} {'samples/s':>10} " \
             f"{'peak RSS MiB':>13} {'CUDA peak MiB':>14}"
    print(header)
    print("-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{r['backbone']:<9} {r['preset']:<7} {r['device']:<6} failed: {r['error'].splitlines()[-1]}")
            continue
        cuda = f"{r['cuda_peak_allocated_mib']:.0f}" if r["cuda_peak_allocated_mib"] is not None else "-"
        print(
            f"{r['backbone']:<9} {r['preset']:<7} {r['device']:<6} {r['batch_size']:>5} {r['median_step_s']:>14.3f} "
            f"{r['samples_per_s']:>10.2f} {r['peak_rss_mib']:>13.0f} {cuda:>14}"
        )


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0
    import torch

    results = [
        _run_fresh(args, backbone, preset)
        for backbone in args.backbones.split(",")
        for preset in args.presets.split(",")
    ]
    _print_table(results)
    report = {
        "benchmark": "backbones: training step (forward + loss + backward + AdamW; GAN: D step + G step)",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "cuda_device": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
