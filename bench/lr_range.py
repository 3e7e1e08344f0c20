"""Which learning rate does each of PETITE's Table-1 rows want, and does the search's range hold it?

Per backbone, on the built-in simulated data (unless ``--data``), the tiny preset and the CPU
default scenario (every ordered pair of scanners 1 and 5, fold 0, evaluation seed 0), each
Table-1 row (``autopeft/plans``: LayerNorm, BitFit, LoRA, Adapters, SSF, VPT, PETITE's winner,
Full-FT) is fine-tuned at a log ladder of learning rates (``--ladder``, on the grid
{1, 3} x 10^k), with the preset's fine-tuning epochs and the fine-tuning seeds 0 .. ``--seeds`` - 1,
by the project's own recipe (``autopeft.runner.trial.run_plan`` with the plan's ``train.lr`` set).
Every run is scored on the targets' **validation** subjects only (these figures choose a
default; test subjects are never read). Per (backbone, row, rate, pair, seed): validation PSNR,
gain over No-FT (No-FT's validation PSNR on that pair) and seconds.

Decision rule, written down before any figure of this bench was seen:

1. A row's **best rate** is the ladder rate with the highest mean validation gain over No-FT
   (mean over pairs and seeds); a rate where any run outputs NaN counts as diverged and is never
   best. When the best is at an end of the row's ladder, that row's ladder is extended one grid
   step that way and the row run there, until its best is interior (at most ``--max-extend``
   steps each way; a row still at an end is reported as unresolved).
2. Per backbone, over the PEFT rows (every row but Full-FT), the search space's range becomes
   ``low`` = the largest grid rate <= min(best) / 10**0.5 and ``high`` = the smallest grid rate
   >= max(best) * 10**0.5: every row's validation optimum sits at least half a decade inside
   [low, high]. ``search_spaces/<backbone>.yaml`` and ``<backbone>-blocks.yaml`` get
   ``lr: {low, high, log: true}``.
3. Full-FT is not in the range: its best rate and its whole curve are reported apart (for a
   Full-FT reference tuned on a ladder).
4. When the PEFT rows' bests spread over more than 1.5 decades (max / min > 10**1.5), a
   per-method scale (each row's best over the geometric mean of the bests) is reported as well;
   the single range of rule 2 is still what the spaces get.

Printed per backbone: row x rate mean gain [min, max] (over pairs and seeds), each row's best
rate and whether it is interior; then the ranges. Written to ``bench/results/lr-range.json`` with
the command, the code version and the machine.

    python bench/lr_range.py                       # CPU: both backbones, tiny, pairs 1->5 and 5->1, seed 0
    python bench/lr_range.py --seeds 2             # fine-tuning seeds 0 and 1 (twice the runs)
    python bench/lr_range.py --backbones unetr --rows lora,fullft

Cost on the 2-core CPU (one torch thread, machine shared): 5-11 s a run; the default grid (2
backbones x 8 rows x 7 rates x 2 pairs x 1 seed = 224 runs) about half an hour, plus pre-training
any source model the cache lacks. Two seeds would take about an hour, so the default is one.

Interrupted? Run the same command again: every run is cached as a line of
``bench/results/lr-range/<backbone>-<preset>-<key>.jsonl`` (the key holds the evaluation: data,
source models, pairs, fold, epochs), and only the missing ones are trained.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `backbones` is a top-level package of the repository

RESULTS = ROOT / "bench" / "results" / "lr-range.json"
WORK = ROOT / "bench" / "results" / "lr-range"
ROWS = ("layernorm", "bitfit", "lora", "adapters", "ssf", "vpt", "petite", "fullft")
LADDER = "1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,1e-1"
HALF_DECADE = 10 ** 0.5
SPREAD_DECADES = 1.5


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="cvtgan,unetr", help="comma-separated backbones. Default: cvtgan,unetr.")
    parser.add_argument("--preset", default="tiny", help="backbone preset. Default: tiny.")
    parser.add_argument("--scanners", default="1,5", help="scanners; every ordered pair runs. Default: 1,5 (the CPU default).")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"Table-1 rows. Default: {','.join(ROWS)}.")
    parser.add_argument("--ladder", default=LADDER, help=f"learning rates, on the grid {{1, 3}} x 10^k. Default: {LADDER}.")
    parser.add_argument("--seeds", type=int, default=1, help="fine-tuning seeds 0 .. n-1. Default: 1.")
    parser.add_argument("--fold", type=int, default=0, help="cross-validation fold. Default: 0.")
    parser.add_argument("--seed", type=int, default=0, help="seeds the evaluation (splits, source models). Default: 0.")
    parser.add_argument("--max-extend", type=int, default=3, help="grid steps a row's ladder may grow each way. Default: 3.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads. Default: 1 (steadiest on a shared CPU).")
    parser.add_argument("--data", default=None, help="a directory with manifest.csv, or the CSV. Default: the built-in data.")
    parser.add_argument("--work", type=Path, default=WORK, help=f"cache of the runs. Default: {WORK}.")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output. Default: {RESULTS}.")
    args = parser.parse_args(argv)
    args.backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    args.scanners = [s.strip() for s in args.scanners.split(",") if s.strip()]
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        parser.error(f"--rows must be among {', '.join(ROWS)}, but got {', '.join(unknown)}.")
    try:
        args.ladder = sorted({_grid_index(float(x)) for x in args.ladder.split(",") if x.strip()})
    except ValueError as error:
        parser.error(str(error))
    if args.seeds < 1 or args.max_extend < 0 or args.threads < 1 or len(args.scanners) < 2:
        parser.error("--seeds and --threads must be at least 1, --max-extend at least 0, --scanners at least two.")
    return args


# The grid of rates: {1, 3} x 10^k, indexed 2k (1 x 10^k) and 2k + 1 (3 x 10^k) ------------------
def _grid_index(rate: float) -> int:
    exponent = math.floor(math.log10(rate) + 1e-9)
    mantissa = rate / 10 ** exponent
    for m, step in ((1.0, 0), (3.0, 1)):
        if abs(mantissa - m) < 1e-6:
            return 2 * exponent + step
    raise ValueError(f"`--ladder` rates must be 1 or 3 x 10^k, but got {rate}.")


def _grid_rate(index: int) -> float:
    return float(f"{3 if index % 2 else 1}e{index // 2}")


def _grid_floor(value: float) -> float:
    """The largest grid rate <= value."""
    index = 2 * math.floor(math.log10(value)) + 1
    while _grid_rate(index) > value * (1 + 1e-9):
        index -= 1
    return _grid_rate(index)


def _grid_ceil(value: float) -> float:
    """The smallest grid rate >= value."""
    index = 2 * math.floor(math.log10(value))
    while _grid_rate(index) < value * (1 - 1e-9):
        index += 1
    return _grid_rate(index)


# The runs --------------------------------------------------------------------------------------
def _plan(backbone: str, row: str, lr: float | None):
    """The Table-1 row's named plan, with ``train.lr`` set (None: No-FT)."""
    from autopeft.peft import Plan, load_plan

    if lr is None:
        return load_plan(f"{backbone}-noft")
    data = load_plan(f"petite-{backbone}" if row == "petite" else f"{backbone}-{row}").to_dict()
    return Plan.from_dict({**data, "train": {**data.get("train", {}), "lr": lr}})


def _plan_key(plan) -> str:
    return hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


class Cache:
    """Every run as one JSON line, keyed by (plan, source, target, seed); appended as it comes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[tuple, dict[str, Any]] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by an interruption
                    continue
                self.rows[self.key(row)] = row

    @staticmethod
    def key(row: dict[str, Any]) -> tuple:
        return row["plan_key"], row["source"], row["target"], row["seed"]

    def get(self, plan, source: str, target: str, seed: int) -> dict[str, Any] | None:
        return self.rows.get((_plan_key(plan), source, target, seed))

    def add(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows[self.key(row)] = row


def _run(setup, cache: Cache, row: str, lr: float | None, pair: tuple[str, str], seed: int) -> dict[str, Any]:
    """One (row, rate, pair, seed) on validation subjects, from the cache or trained now."""
    from autopeft.runner.trial import run_plan

    plan = _plan(setup.backbone, row, lr)
    source, target = pair
    done = cache.get(plan, source, target, seed)
    if done is not None:
        return done
    started = time.perf_counter()
    try:
        score = run_plan(replace(setup, pairs=(pair,)), plan, split="val", train_seed=seed)[0]
        result = {"psnr": score.psnr, "ssim": score.ssim, "nrmse": score.nrmse, "seconds": score.seconds}
    except FloatingPointError as error:  # diverged: the fine-tuned model outputs NaN
        result = {"psnr": None, "ssim": None, "nrmse": None, "seconds": time.perf_counter() - started, "error": str(error)}
    entry = {"row": row, "lr": lr, "plan_key": _plan_key(plan), "source": source, "target": target,
             "fold": setup.folds[0], "seed": seed, "split": "val", **result}
    cache.add(entry)
    shown = "diverged (NaN)" if entry["psnr"] is None else f"PSNR {entry['psnr']:.3f}"
    print(f"  {setup.backbone} {row:9s} lr {lr if lr is not None else 0:<7g} {source}->{target} seed {seed}: "
          f"{shown}, {entry['seconds']:.1f} s", flush=True)
    return entry


def _cell(runs: list[dict[str, Any]], no_ft: dict[tuple[str, str], float]) -> dict[str, Any]:
    """Mean, min and max gain over No-FT of one (row, rate) over its pairs and seeds."""
    diverged = any(r["psnr"] is None for r in runs)
    gains = [r["psnr"] - no_ft[(r["source"], r["target"])] for r in runs if r["psnr"] is not None]
    return {"gain": None if diverged or not gains else statistics.mean(gains),
            "gain_min": min(gains) if gains else None, "gain_max": max(gains) if gains else None,
            "psnr": statistics.mean(r["psnr"] for r in runs if r["psnr"] is not None) if gains else None,
            "seconds": statistics.mean(r["seconds"] for r in runs), "diverged": diverged,
            "runs": [{k: r[k] for k in ("source", "target", "seed", "psnr", "seconds")}
                     | {"gain": None if r["psnr"] is None else r["psnr"] - no_ft[(r["source"], r["target"])]} for r in runs]}


def _row(setup, cache: Cache, row: str, args: argparse.Namespace, no_ft: dict[tuple[str, str], float]) -> dict[str, Any]:
    """A row over its ladder, extended one grid step at a time while its best sits at an end."""
    ladder = list(args.ladder)
    seeds = list(range(args.seeds))
    low_limit, high_limit = ladder[0] - args.max_extend, ladder[-1] + args.max_extend
    while True:
        curve = {}
        for index in ladder:
            lr = _grid_rate(index)
            curve[index] = _cell([_run(setup, cache, row, lr, pair, seed) for pair in setup.pairs for seed in seeds], no_ft)
        scored = [i for i in ladder if curve[i]["gain"] is not None]
        best = max(scored, key=lambda i: curve[i]["gain"]) if scored else None
        if best == ladder[0] and ladder[0] > low_limit:
            ladder.insert(0, ladder[0] - 1)
        elif best == ladder[-1] and ladder[-1] < high_limit:
            ladder.append(ladder[-1] + 1)
        else:
            break
    return {"row": row, "plan": _plan(setup.backbone, row, None if best is None else _grid_rate(best)).name,
            "best_lr": None if best is None else _grid_rate(best),
            "interior": best is not None and ladder[0] < best < ladder[-1],
            "extended": [_grid_rate(i) for i in ladder if i not in args.ladder],
            "curve": {f"{_grid_rate(i):g}": curve[i] for i in ladder}}


def _decide(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Rules 2 and 4 of the docstring over the PEFT rows."""
    peft = {name: r for name, r in rows.items() if name != "fullft" and r["best_lr"] is not None}
    if not peft:
        return {}
    bests = {name: r["best_lr"] for name, r in peft.items()}
    low, high = _grid_floor(min(bests.values()) / HALF_DECADE), _grid_ceil(max(bests.values()) * HALF_DECADE)
    spread = math.log10(max(bests.values()) / min(bests.values()))
    decision = {"low": low, "high": high, "rows": sorted(peft), "spread_decades": spread,
                "unresolved": sorted(name for name, r in peft.items() if not r["interior"])}
    if spread > SPREAD_DECADES:
        centre = math.exp(statistics.mean(math.log(v) for v in bests.values()))
        decision["per_method_scale"] = {name: v / centre for name, v in bests.items()}
        decision["per_method_centre"] = centre
    return decision


def _source_keys(setup) -> list[str]:
    """The cache key of every source model of ``setup`` (pre-training the missing ones)."""
    from autopeft.pretraining import SourceSpec
    from autopeft.runner.trial import source_model

    keys = []
    for source, fold in setup.sources:
        _, meta = source_model(setup, source, fold, progress=True)
        keys.append(SourceSpec.from_metadata(meta).key())
    return keys


def _git_version() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _backbone(args: argparse.Namespace, backbone: str, manifest_path: str) -> dict[str, Any]:
    from autopeft.data import read_manifest
    from autopeft.pretraining import manifest_digest
    from autopeft.runner.trial import setup_from_config
    from autopeft.backbones import build_backbone

    epochs = build_backbone(backbone, args.preset).preset.finetune.epochs  # the preset's, unchanged
    setup = setup_from_config({"backbone": backbone, "preset": args.preset, "scanners": args.scanners, "epochs": epochs,
                               "seed": args.seed, "folds": 1}, manifest_path=manifest_path, threads=args.threads)
    setup = replace(setup, folds=(args.fold,))
    evaluation = {"backbone": backbone, "preset": args.preset, "pairs": setup.pairs, "fold": args.fold, "seed": args.seed,
                  "epochs": epochs, "data": manifest_digest(read_manifest(manifest_path)), "sources": _source_keys(setup)}
    key = hashlib.sha256(json.dumps(evaluation, sort_keys=True).encode()).hexdigest()[:12]
    cache = Cache(args.work.expanduser().resolve() / f"{backbone}-{args.preset}-{key}.jsonl")
    print(f"\n{backbone}/{args.preset}: pairs {', '.join(f'{s}->{t}' for s, t in setup.pairs)}, fold {args.fold}, "
          f"{epochs} epochs, seeds 0..{args.seeds - 1}, validation subjects; cache {cache.path}", flush=True)
    no_ft = {pair: _run(setup, cache, "noft", None, pair, 0)["psnr"] for pair in setup.pairs}
    rows = {row: _row(setup, cache, row, args, no_ft) for row in args.rows}
    # Training time of every run shown, cached or not (the wall time of a resumed bench counts only the new ones).
    run_seconds = sum(run["seconds"] for r in rows.values() for c in r["curve"].values() for run in c["runs"])
    return {"evaluation": evaluation, "cache": str(cache.path), "no_ft_psnr": {f"{s}->{t}": v for (s, t), v in no_ft.items()},
            "rows": rows, "range": _decide(rows), "full_ft": rows.get("fullft"), "run_seconds": run_seconds}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    import torch

    from autopeft.data import resolve_manifest

    torch.set_num_threads(args.threads)
    started = time.time()
    manifest_path = str(resolve_manifest(args.data, progress=True))
    backbones = {backbone: _backbone(args, backbone, manifest_path) for backbone in args.backbones}
    result = {
        "benchmark": "lr-range", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/lr_range.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "code_version": _git_version(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": args.threads},
        "settings": {"backbones": args.backbones, "preset": args.preset, "scanners": args.scanners, "rows": args.rows,
                     "ladder": [_grid_rate(i) for i in args.ladder], "seeds": list(range(args.seeds)), "fold": args.fold,
                     "seed": args.seed, "max_extend": args.max_extend, "split": "val", "data": args.data or "built-in"},
        "rule": ("best rate per row: highest mean validation gain over No-FT on the ladder (extended until interior); "
                 "range per backbone over the PEFT rows: [grid floor of min(best) / 10**0.5, grid ceil of "
                 "max(best) * 10**0.5] on the grid {1, 3} x 10^k; Full-FT reported apart; per-method scale when the "
                 "bests spread over more than 1.5 decades"),
        "backbones": backbones, "seconds": time.time() - started,
    }
    _print(result)
    from autopeft._io import atomic_write_json

    atomic_write_json(args.out, result, default=str)
    print(f"\nwritten {args.out}")
    return result


def _f(value: float | None, spec: str = "+.2f") -> str:
    return "-" if value is None else format(value, spec)


def _print(result: dict[str, Any]) -> None:
    for backbone, b in result["backbones"].items():
        rates = sorted({float(lr) for r in b["rows"].values() for lr in r["curve"]})
        print(f"\n{backbone}: mean validation gain over No-FT in dB [min, max over pairs and seeds]; "
              f"No-FT PSNR {', '.join(f'{k} {v:.3f}' for k, v in b['no_ft_psnr'].items())}")
        print(f"{'row':10s}" + "".join(f"{lr:>20g}" for lr in rates) + f"{'best':>8s}  interior")
        for name, r in b["rows"].items():
            cells = []
            for lr in rates:
                c = r["curve"].get(f"{lr:g}")
                text = "" if c is None else ("NaN" if c["diverged"] else
                                             f"{_f(c['gain'])} [{_f(c['gain_min'])},{_f(c['gain_max'])}]")
                cells.append(f"{text:>20s}")
            print(f"{name:10s}" + "".join(cells) + f"{_f(r['best_lr'], 'g'):>8s}  {'yes' if r['interior'] else 'NO'}")
        d = b["range"]
        if d:
            print(f"range over the PEFT rows: [{d['low']:g}, {d['high']:g}] (bests spread {d['spread_decades']:.2f} decades"
                  + (f"; unresolved: {', '.join(d['unresolved'])}" if d["unresolved"] else "") + ")")
            if "per_method_scale" in d:
                print("per-method scale (best / geometric mean " + f"{d['per_method_centre']:.2g}): "
                      + ", ".join(f"{k} x{v:.2g}" for k, v in d["per_method_scale"].items()))
        if b["full_ft"]:
            f = b["full_ft"]
            print(f"Full-FT: best {_f(f['best_lr'], 'g')} ({'interior' if f['interior'] else 'at an end'}); curve "
                  + ", ".join(f"{lr} {_f(c['gain'])}" for lr, c in f["curve"].items()))
    runs = sum(b["run_seconds"] for b in result["backbones"].values())
    print(f"\nwall time {result['seconds'] / 60:.1f} min (this invocation); fine-tuning time of every run shown "
          f"{runs / 60:.1f} min")


if __name__ == "__main__":
    main()
