"""Fine-tuning step time and memory of every PEFT plan against Full-FT, and our Conv3d LoRA against
Hugging Face peft's.

Part 1, per backbone: every named plan of that backbone (PETITE's Table 1 rows and winner) plus an
SH-PEFT plan (1% of the weights, importance from one batch) is applied to a fresh copy of the same
model, and one fine-tuning step of ``autopeft.train.Trainer`` (forward, the backbone's loss (L1, or
BCE-adversarial + 100 L1 against the frozen discriminator for CVT-GAN), backward, gradient
clipping, AdamW) is timed: median of ``--reps`` steps after one warm-up step. Memory:

- CUDA: peak of ``torch.cuda.max_memory_allocated`` during the timed steps (measured);
- CPU (no allocator statistics): weights + gradients + AdamW's two moments for the trainable
  parameters + the activations autograd saves for backward, measured with
  ``torch.autograd.graph.saved_tensors_hooks`` (storages counted once, parameters excluded).

Each row is also given as a ratio to Full-FT of the same run.

Part 2: one ``Conv3d`` (dense, and grouped with rank divisible by the groups as peft requires)
wrapped by our ``LoraConv`` and by peft's LoRA (``get_peft_model``) with the same rank, alpha and
factor weights; forward + backward time (medians) and the largest output difference.

    python bench/bench_peft.py                         # tiny preset, CPU
    python bench/bench_peft.py --threads 1             # steadier figures on a shared CPU
    python bench/bench_peft.py --preset paper --device cuda

Needs Hugging Face peft: ``bash scripts/setup.sh --bench``. Prints tables and writes
bench/results/peft.json. Figures are never asserted on.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results" / "peft.json"
_TABLE1_ROWS = ("fullft", "layernorm", "bitfit", "lora", "adapters", "ssf", "vpt")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="backbone preset (tiny, paper). Default: tiny.")
    parser.add_argument("--backbones", default="unetr,cvtgan", help="comma-separated backbones. Default: unetr,cvtgan.")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto. Default: auto.")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (median). Default: 5.")
    parser.add_argument("--batch", type=int, default=0, help="batch size; 0 = the preset's. Default: 0.")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default. Use 1 on a shared machine. Default: 0."
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output. Default: {RESULTS}.")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps must be at least 1, but got {args.reps}.")
    if args.batch < 0:
        parser.error(f"--batch must be >= 0, but got {args.batch}.")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _saved_activation_bytes(run_forward, model: nn.Module) -> int:
    """Bytes autograd saves for backward during ``run_forward()`` (storages once, no parameters)."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_storages:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run_forward()
    return sum(seen.values())


def _state_bytes(model: nn.Module) -> int:
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weights + 3 * trainable  # + gradients + AdamW exp_avg and exp_avg_sq


def _fine_tuning_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The loss ``autopeft.train.Trainer`` minimises in fine-tuning (for the activation count)."""
    return model.generator_loss(batch["short"], batch["long"], model(batch["short"]))


def _time_plan(base: nn.Module, plan, batch: dict, device: torch.device, reps: int, scores) -> dict:
    from autopeft.peft import apply_plan, count_trainable, trainable_fraction
    from autopeft.train import Trainer, TrainSettings

    model = apply_plan(copy.deepcopy(base), plan, importance=scores)
    row = {"plan": plan.name, "trainable": count_trainable(model), "fraction": trainable_fraction(model)}
    if row["trainable"] == 0:
        return {**row, "step_s": None, "memory_bytes": None}
    trainer = Trainer(model, TrainSettings(epochs=1, lr=1e-3), device=device)
    trainer.step(batch)  # warm-up (allocations, cuDNN autotuning)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        trainer.step(batch)
        _sync(device)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        memory, how = torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    else:
        model.train()
        activations = _saved_activation_bytes(lambda: _fine_tuning_loss(model, batch), model)
        memory, how = _state_bytes(model) + activations, "weights + grads + AdamW states + saved activations"
    return {**row, "step_s": statistics.median(times), "step_s_all": times, "memory_bytes": memory, "memory_method": how}


def _bench_backbone(name: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    from autopeft.backbones import build_backbone

    from autopeft.importance import compute_importance
    from autopeft.peft import Plan, load_plan

    torch.manual_seed(0)
    base = build_backbone(name, args.preset).to(device)
    batch_size = args.batch or base.preset.batch_size
    short = torch.rand(batch_size, 1, *base.preset.crop_size, device=device)
    batch = {"short": short, "long": (short * 1.2).clamp(0, 1)}
    scores = compute_importance(base, [batch], lambda m, b: (m(b["short"]) - b["long"]).abs().mean())
    plans = [load_plan(f"{name}-{row}") for row in _TABLE1_ROWS] + [load_plan(f"petite-{name}")]
    plans.append(Plan.from_dict({"name": f"{name}-shpeft-1%", "backbone": name, "sites": {"*": {"method": "shpeft", "fraction": 0.01}}}))
    rows = [_time_plan(base, plan, batch, device, args.reps, scores) for plan in plans]
    full = rows[0]
    for row in rows:
        row["backbone"] = name
        row["batch"] = batch_size
        if row["step_s"] is not None:
            row["step_ratio_vs_full"] = row["step_s"] / full["step_s"]
            row["memory_ratio_vs_full"] = row["memory_bytes"] / full["memory_bytes"]
    return rows


def _bench_hf_conv(args: argparse.Namespace, device: torch.device) -> list[dict]:
    import peft

    from autopeft.peft.lora_layers import LoraConv

    channels, side, batch = (32, 16, 2) if args.preset == "tiny" else (64, 32, 6)
    rank, alpha = 8, 16
    rows = []
    for groups in (1, 4):
        torch.manual_seed(0)
        conv = nn.Conv3d(channels, channels, 3, padding=1, groups=groups).to(device)
        hf = peft.get_peft_model(
            nn.Sequential(OrderedDict(conv=copy.deepcopy(conv))),
            peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["conv"]),
        )
        hf_layer = hf.base_model.model.conv
        ours = LoraConv(copy.deepcopy(conv), rank=rank, alpha=alpha).to(device)
        ours.base_layer.requires_grad_(False)
        with torch.no_grad():
            hf_layer.lora_B["default"].weight.normal_(0, 0.1)
            if groups == 1:
                # Same factors: peft's A is dense (in -> r); so is ours when groups == 1.
                ours.lora_A.weight.copy_(hf_layer.lora_A["default"].weight)
                ours.lora_B.weight.copy_(hf_layer.lora_B["default"].weight)
        x = torch.randn(batch, channels, side, side, side, device=device)
        timings = {}
        for label, layer in (("ours", ours), ("hf_peft", hf_layer)):
            def step(layer=layer):
                layer(x).square().mean().backward()

            step()
            times = []
            for _ in range(max(args.reps, 5)):
                _sync(device)
                start = time.perf_counter()
                step()
                _sync(device)
                times.append(time.perf_counter() - start)
            timings[label] = statistics.median(times)
        with torch.no_grad():
            difference = float((ours(x) - hf_layer(x)).abs().max()) if groups == 1 else None
        rows.append(
            {
                "layer": f"Conv3d({channels}, {channels}, 3, groups={groups})",
                "input": [batch, channels, side, side, side],
                "rank": rank,
                "ours_s": timings["ours"],
                "hf_peft_s": timings["hf_peft"],
                "ratio_ours_over_hf": timings["ours"] / timings["hf_peft"],
                "trainable_ours": sum(p.numel() for p in ours.lora_parameters()),
                "trainable_hf": sum(p.numel() for n, p in hf_layer.named_parameters() if "lora_" in n),
                "max_abs_output_difference": difference,
                "mergeable_ours": True,
                "mergeable_hf": groups == 1,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:  # checked first: part 2 needs it, and part 1 takes minutes
        import peft  # noqa: F401
    except ImportError:
        sys.exit("bench_peft.py compares against Hugging Face peft, which is not installed: "
                 "run `bash scripts/setup.sh --bench` (or `pip install -e '.[bench]'`).")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    backbones = [b for b in args.backbones.split(",") if b]
    rows = [row for name in backbones for row in _bench_backbone(name, args, device)]
    print(f"PEFT fine-tuning step, preset {args.preset}, {device}, median of {args.reps}:")
    print(f"{'backbone':8} {'plan':22} {'trainable':>10} {'%':>8} {'step s':>8} {'x full':>7} {'memory MB':>10} {'x full':>7}")
    for row in rows:
        step = "-" if row["step_s"] is None else f"{row['step_s']:.3f}"
        memory = "-" if row["memory_bytes"] is None else f"{row['memory_bytes'] / 2**20:.1f}"
        ratios = (row.get("step_ratio_vs_full"), row.get("memory_ratio_vs_full"))
        r1, r2 = ("-" if r is None else f"{r:.2f}" for r in ratios)
        print(f"{row['backbone']:8} {row['plan']:22} {row['trainable']:>10} {100 * row['fraction']:>7.3f}% {step:>8} {r1:>7} {memory:>10} {r2:>7}")
    conv_rows = _bench_hf_conv(args, device)
    print("\nLoRA on one Conv3d, forward + backward (median):")
    for row in conv_rows:
        print(
            f"  {row['layer']}: ours {row['ours_s'] * 1e3:.2f} ms, peft {row['hf_peft_s'] * 1e3:.2f} ms, "
            f"ratio {row['ratio_ours_over_hf']:.2f}; trainable {row['trainable_ours']} vs {row['trainable_hf']}; "
            f"max |diff| {row['max_abs_output_difference']}; mergeable ours/peft: {row['mergeable_ours']}/{row['mergeable_hf']}"
        )
    import peft

    result = {
        "benchmark": "peft",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "preset": args.preset,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "threads": torch.get_num_threads(),
        "reps": args.reps,
        "plans": rows,
        "lora_conv3d_vs_hf_peft": conv_rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
