"""How much do a search's validation scores flatter its answer, and how noisy is one plan's score?

On the built-in simulated data (unless ``--data``), with the search as users run it:

1. ``--searches`` searches (``autopeft.runner.run_search`` with the search's defaults: the baseline
   portfolio, Ray Tune + Optuna TPE + ASHA on the epoch rung, the importance prior's guide,
   references with Full-FT lr-tuned, the confirmation on test subjects over the default folds),
   each with its own evaluation seed ``--seed + i`` (splits, subjects, source models, references
   and confirmation: replications, not one evaluation seen five times); from each:
   - the selection bias: validation PSNR of the recommended plan minus its confirmed test PSNR,
     raw and relative to PETITE's plan (a fixed plan nobody selected, trained by the same recipe:
     its own validation-minus-test gap is what the subjects alone explain);
   - the recommended plan against PETITE's plan (as published), lr-tuned Full-FT and the best
     Table-1 row with its learning rate tuned, on test: paired difference, 95% CI (folds, then
     subjects), Wilcoxon p (from the confirmation);
2. the noise of one plan's score: PETITE's plan (fixed before any run) fine-tuned on every fold x
   fine-tuning seed and scored on test subjects: the standard deviation of its mean PSNR across
   seeds (within a fold; median over folds) and across folds (of the seed means).

Figures are printed and written to ``bench/results/heldout.json``, with the machine and command.
Medians over searches come with their min and max.

    python bench/heldout.py --quick            # CPU: cvtgan tiny, scanners 1,5, 5 searches x 16 trials
    python bench/heldout.py --backbone unetr --searches 5 --trials 24 --noise-folds 3 --noise-seeds 3
    python bench/heldout.py --preset paper --scanners 1,2,3,4,5 --trials 64          # GPU

Interrupted? Run the same command again: finished searches and runs are kept in the work folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `backbones` is a top-level package of the repository

RESULTS = ROOT / "bench" / "results" / "heldout.json"
WORK = ROOT / "bench" / "results" / "heldout"
QUICK = {"backbone": "cvtgan", "scanners": "1,5", "searches": 5, "trials": 16, "noise_folds": 3, "noise_seeds": 3}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=None, help="unetr or cvtgan. Default: cvtgan.")
    parser.add_argument("--preset", default=None, help="backbone preset. Default: tiny on a CPU, paper on a GPU.")
    parser.add_argument("--budget", default="1%", help="parameter budget of the searches. Default: 1%%.")
    parser.add_argument("--scanners", default=None, help="comma-separated scanner ids. Default: 1,5 on a CPU, all on a GPU.")
    parser.add_argument("--searches", type=int, default=None,
                        help="searches, each with its own evaluation seed --seed + i. Default: 5.")
    parser.add_argument("--trials", type=int, default=None, help="plans trained per search, the portfolio's included. Default: 16.")
    parser.add_argument("--confirm", type=int, default=3, help="plans each search confirms on test subjects. Default: 3.")
    parser.add_argument("--confirm-seeds", type=int, default=2, help="fine-tuning seeds of each confirmation. Default: 2.")
    parser.add_argument("--noise-folds", type=int, default=None, help="folds of the noise study. Default: 3.")
    parser.add_argument("--noise-seeds", type=int, default=None, help="fine-tuning seeds per fold of the noise study. Default: 3.")
    parser.add_argument("--seed", type=int, default=0, help="the first search's evaluation seed (splits, source models). Default: 0.")
    parser.add_argument("--concurrency", type=int, default=None, help="trials at once. Default: what the CPUs allow.")
    parser.add_argument("--data", default=None, help="a directory with manifest.csv, or the CSV. Default: the built-in data.")
    parser.add_argument("--quick", action="store_true", help=f"the CPU configuration: {QUICK} unless given.")
    parser.add_argument("--work", type=Path, default=WORK, help=f"runs are kept here. Default: {WORK}.")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output. Default: {RESULTS}.")
    args = parser.parse_args(argv)
    for name, value in QUICK.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("searches", "trials", "noise_folds", "noise_seeds", "confirm", "confirm_seeds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, but got {getattr(args, name)}.")
    return args


def _spread(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _search(args: argparse.Namespace, seed: int, run_dir: Path) -> dict[str, Any]:
    from autopeft.report import SearchOutputs
    from autopeft.runner import run_search
    from autopeft.search.config import SearchConfig

    summary_path = run_dir / "summary.json"
    if summary_path.is_file() and "confirmation" in json.loads(summary_path.read_text()):
        print(f"search with evaluation seed {seed}: reusing {run_dir}", flush=True)
    elif (run_dir / "run.json").is_file():
        run_search(resume_dir=run_dir, outputs=SearchOutputs())
    else:
        run_search(SearchConfig(
            backbone=args.backbone, budget=args.budget, preset=args.preset, trials=args.trials, seed=seed,
            out=str(run_dir), data=args.data, concurrency=args.concurrency,
            scanners=[s.strip() for s in args.scanners.split(",")] if args.scanners else None,
            confirm=args.confirm, confirm_seeds=args.confirm_seeds,
        ), outputs=SearchOutputs())
    summary = json.loads(summary_path.read_text())
    confirmation = summary["confirmation"]
    plans = {p["label"]: p for p in confirmation["plans"]}
    recommended, petite = confirmation["recommended"], plans.get("PETITE")
    gap = recommended["val"]["psnr"] - recommended["test"]["psnr"]["mean"]
    control = petite["val"]["psnr"] - petite["test"]["psnr"]["mean"] if petite and petite.get("val") else None
    baseline = confirmation.get("baseline") or {}
    return {
        "seed": seed, "run_dir": str(run_dir), "recommended": recommended["number"],
        "folds": confirmation["folds"], "confirm_seeds": confirmation["seeds"],
        "baseline": {"number": baseline.get("number"), "plan": baseline.get("portfolio")},
        "recommended_is_baseline": baseline.get("number") == recommended["number"],
        "beat_baseline_on_validation": (summary.get("baseline") or {}).get("beat"),
        "vs_baseline": recommended.get("vs_baseline", {}).get("psnr"),
        "params_pct": 100 * recommended["fraction"], "val_psnr": recommended["val"]["psnr"],
        "test_psnr": recommended["test"]["psnr"], "bias_db": gap, "petite_gap_db": control,
        "bias_vs_petite_db": None if control is None else gap - control,
        "vs_petite": recommended.get("vs_PETITE", {}).get("psnr"), "vs_full_ft": recommended.get("vs_Full-FT", {}).get("psnr"),
        "finished": summary["finished"], "trials": summary["trials"],
    }


def _noise(args: argparse.Namespace, run_dir: Path, work: Path) -> dict[str, Any]:
    """PETITE's plan on every fold x seed, on test subjects, from the first search's settings."""
    from autopeft.data import resolve_manifest
    from autopeft.runner._cluster import task_options
    from autopeft.runner._sources import prepare_sources
    from autopeft.search.config import SearchConfig
    from autopeft.runner.references import reference_plans
    from autopeft.runner.trial import run_plan, running_means, scores_to_json, setup_from_config

    meta = json.loads((run_dir / "run.json").read_text())
    config = SearchConfig(**meta["config"])
    setup = setup_from_config({**meta["config"], "folds": args.noise_folds},
                              manifest_path=resolve_manifest(config.data, progress=False), run_dir=run_dir, threads=1)
    prepare_sources(config, setup, options=task_options(config), progress=True)
    plan = dict(reference_plans(config.backbone, setup.preset, setup.epochs))["PETITE"]
    runs = []
    for fold in range(args.noise_folds):
        for seed in range(config.seed, config.seed + args.noise_seeds):
            path = work / "noise" / f"petite-fold{fold}-seed{seed}.json"
            if not path.is_file():
                print(f"noise: PETITE's plan, fold {fold}, fine-tuning seed {seed}", flush=True)
                scores = run_plan(replace(setup, folds=(fold,)), plan, split="test", train_seed=seed)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"fold": fold, "seed": seed, **running_means(scores), "pairs": scores_to_json(scores)}))
            runs.append(json.loads(path.read_text()))
    by_fold = {fold: [r["psnr"] for r in runs if r["fold"] == fold] for fold in range(args.noise_folds)}
    seed_sd = [statistics.stdev(values) for values in by_fold.values() if len(values) > 1]
    fold_means = [statistics.mean(values) for values in by_fold.values()]
    return {"plan": "PETITE", "split": "test", "folds": args.noise_folds, "seeds": args.noise_seeds,
            "psnr": {f"fold{r['fold']}-seed{r['seed']}": r["psnr"] for r in runs},
            "seed_sd_db": _spread(seed_sd), "fold_sd_db": statistics.stdev(fold_means) if len(fold_means) > 1 else None,
            "fold_means_db": fold_means}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    import torch

    started = time.time()
    work = args.work.expanduser().resolve() / f"{args.backbone}-{args.preset or 'auto'}-b{args.budget.rstrip('%')}-t{args.trials}"
    searches = [_search(args, seed, work / f"search-e{seed}") for seed in range(args.seed, args.seed + args.searches)]
    noise = _noise(args, work / f"search-e{args.seed}", work)

    def beats(key: str) -> dict[str, Any]:
        diffs = [s[key] for s in searches if s[key]]
        return {"mean_db": _spread([d["mean"] for d in diffs]), "beats": sum(d["mean"] > 0 for d in diffs),
                "beats_with_ci_above_0": sum(d["ci"][0] > 0 for d in diffs), "loses_with_ci_below_0": sum(d["ci"][1] < 0 for d in diffs),
                "of": len(diffs), "runs": diffs}

    result = {
        "benchmark": "heldout", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "command": "python bench/heldout.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "searches": searches,
        "selection_bias_db": _spread([s["bias_db"] for s in searches]),
        "selection_bias_vs_petite_db": _spread([s["bias_vs_petite_db"] for s in searches if s["bias_vs_petite_db"] is not None]),
        "recommended_vs_petite": beats("vs_petite"), "recommended_vs_full_ft": beats("vs_full_ft"),
        "recommended_vs_baseline": beats("vs_baseline"),
        "recommended_is_baseline": sum(s["recommended_is_baseline"] for s in searches),
        "noise": noise, "seconds": time.time() - started,
    }
    _print(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\nwritten {args.out}")
    return result


def _f(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _print(result: dict[str, Any]) -> None:
    print(f"\n{'seed':>4} {'#':>4} {'% par':>6} {'val':>8} {'test [95% CI]':>26} {'val-test':>8} {'PETITE gap':>10} "
          f"{'vs PETITE [CI]':>24} {'vs Full-FT [CI]':>24} {'vs Table-1 row [CI]':>24}")
    for s in result["searches"]:
        test = s["test_psnr"]

        def diff(d):
            return "-" if not d else f"{d['mean']:+.3f} [{d['ci'][0]:+.3f},{d['ci'][1]:+.3f}]"

        print(f"{s['seed']:>4} {s['recommended']:>4} {s['params_pct']:>6.3f} {s['val_psnr']:>8.3f} "
              f"{test['mean']:>8.3f} [{test['ci'][0]:.3f}, {test['ci'][1]:.3f}] {s['bias_db']:>+8.3f} "
              f"{_f(s['petite_gap_db'], '+.3f'):>10} {diff(s['vs_petite']):>24} {diff(s['vs_full_ft']):>24} "
              f"{diff(s['vs_baseline']) if not s['recommended_is_baseline'] else 'is the row':>24}")
    for key, label in (("selection_bias_db", "selection bias (val - test of the recommended plan)"),
                       ("selection_bias_vs_petite_db", "selection bias relative to PETITE's own val - test gap")):
        v = result[key]
        print(f"{label}: median {_f(v['median'], '+.3f')} dB (min {_f(v['min'], '+.3f')}, max {_f(v['max'], '+.3f')}, "
              f"{v['n']} searches)")
    for key, label in (("recommended_vs_petite", "PETITE as published"), ("recommended_vs_full_ft", "Full-FT (lr tuned)"),
                       ("recommended_vs_baseline", "the best Table-1 row (lr tuned)")):
        v = result[key]
        print(f"recommended vs {label} on test: beats it in {v['beats']}/{v['of']} (CI above 0 in {v['beats_with_ci_above_0']}, "
              f"below 0 in {v['loses_with_ci_below_0']}); median difference {_f(v['mean_db']['median'], '+.3f')} dB")
    n = result["noise"]
    print(f"the recommended plan was the best Table-1 row itself in {result['recommended_is_baseline']}/{len(result['searches'])} searches")
    print(f"noise of one plan (PETITE's, test): seed-to-seed SD {_f(n['seed_sd_db']['median'])} dB (median over "
          f"{n['folds']} folds, min {_f(n['seed_sd_db']['min'])}, max {_f(n['seed_sd_db']['max'])}); fold-to-fold SD "
          f"{_f(n['fold_sd_db'])} dB over {n['seeds']} seeds each")


if __name__ == "__main__":
    main()
