"""Does the search rediscover PETITE's best Mix-PEFT plan for less than PETITE's exhaustive grid?

Four searches over the same evaluation (built-in simulated data unless ``--data``; the same scanner
pairs, fold(s), fine-tuning epochs, seed, held-out subjects and cached source models):

1. PETITE's exhaustive grid (``search_spaces/petite-grid.yaml``, 21 Mix-PEFT plans), every plan on
   every pair; computed once and cached per plan (and per pair) in the work folder, so an
   interrupted run resumes and later runs reuse it;
2. the engine (``autopeft.search.run_search``: Ray Tune + Optuna TPE + ASHA) with SH-PEFT priors
   (warm start with the best-scored plans);
3. the same engine without priors;
4. random search (Optuna's RandomSampler, no priors; ASHA as in 2 and 3).

Cost = fine-tuning pair-epochs: for each trained trial, the pairs it ran times its epochs (trials
that ASHA stopped early count the pairs they ran; plans over the budget never train and cost 0).
The priors' own cost (two gradient passes over one epoch of each pair's fine-tuning batches: the
SH-PEFT importance at lambda 0 and 1, no optimizer step) is reported beside it, not inside it.
Every choice is made on validation subjects (the grid's best, each run's best so far); whether an
engine run *reaches* the grid's best is judged on test subjects: the grid's best plan and each
plan that becomes an engine run's best so far (by validation, among FINISHED trials; plans outside
the grid count) are re-run from scratch with ``--confirm-seeds`` fine-tuning seeds and scored on
the targets' test subjects. The run reaches the grid's best when its best-so-far plan's test mean
is within the tolerance of the grid best's test mean; the tolerance is the larger of
``--tolerance`` (0.05 dB) and the measured noise (the standard deviation over seeds of the grid
best's test mean). Its cost to reach is the cost of every trial that ended up to and including the
one that made that plan best so far (in order of ending). The goal: at most ``--goal`` (20%) of the
grid's full cost.

Reported (printed, and written to ``bench/results/rediscovery.json``): the grid's best plan and
cost; per engine run, the cost to reach (pair-epochs and share of the grid's cost), the trials it
took, the best plan it found (PSNR, % of parameters, whether it beats the grid); and the Spearman
correlation between the SH-PEFT prior score and the final PSNR over all plans trained on every
pair (grid and engine runs; and over the grid alone). With ``--repeats R`` each engine variant runs
R times with sampler seeds seed, seed+1, ... (the evaluation stays the same) and medians are given.

PSNR: peak 1 on [0, 1]-scaled volumes, mean over pairs of the targets' validation subjects (as
``autopeft search`` trials) or test subjects (confirmed); comparable only within one run of this script.

    python bench/rediscovery.py --quick                     # 2 scanners, 4 epochs, 8 trials (CPU minutes)
    python bench/rediscovery.py --scanners 1,5 --epochs 20 --trials 16 --repeats 3
    python bench/rediscovery.py --preset paper --scanners 1,2,3,4,5 --trials 64 --repeats 3   # GPU

Interrupted? Run the same command again: finished grid pairs and finished trials are kept.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `backbones` is a top-level package of the repository

RESULTS = ROOT / "bench" / "results" / "rediscovery.json"
WORK = ROOT / "bench" / "results" / "rediscovery"
VARIANTS: dict[str, dict[str, Any]] = {
    "priors": {"sampler": "tpe", "priors": True},
    "no-priors": {"sampler": "tpe", "priors": False},
    "random": {"sampler": "random", "priors": False},
}
QUICK = {"scanners": "1,5", "epochs": 4, "trials": 8}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="unetr", help="unetr or cvtgan. Default: unetr.")
    parser.add_argument("--preset", default=None, help="backbone preset. Default: tiny on a CPU, paper on a GPU.")
    parser.add_argument("--device", default=None, help="cpu or cuda. Default: cuda if available.")
    parser.add_argument("--scanners", default=None, help="comma-separated scanner ids; every ordered pair is used. Default: 1,5 on a CPU, all five on a GPU.")
    parser.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs per pair. Default: the preset's (tiny 20, paper 150).")
    parser.add_argument("--trials", type=int, default=None, help="trials per engine run. Default: 16 on a CPU, 64 on a GPU.")
    parser.add_argument("--budget", default="grid", help="parameter budget of the engine runs (1%%, 250k, ...); 'grid' = the "
                        "largest plan of the grid, so every grid plan is feasible. Default: grid.")
    parser.add_argument("--folds", type=int, default=1, help="cross-validation folds per pair. Default: 1.")
    parser.add_argument("--seed", type=int, default=0, help="seeds the evaluation (splits, crops, initialisation). Default: 0.")
    parser.add_argument("--repeats", type=int, default=1, help="engine runs per variant, with sampler seeds seed, seed+1, ... Default: 1.")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"engine variants to run, from {', '.join(VARIANTS)}. Default: all.")
    parser.add_argument("--concurrency", type=int, default=1, help="engine trials at once. 1 keeps the cost order exact "
                        "(with more, trials are ordered by when they end). Default: 1.")
    parser.add_argument("--no-asha", action="store_true", help="let every engine trial run all its pairs.")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="epochs of the source models. Default: the preset's.")
    parser.add_argument("--data", default=None, help="a directory with manifest.csv, or the CSV. Default: the built-in simulated data.")
    parser.add_argument("--tolerance", type=float, default=0.05, help="dB below the grid best's test PSNR that counts as reaching "
                        "it, at least; the measured noise is used when larger. Default: 0.05.")
    parser.add_argument("--confirm-seeds", type=int, default=3, help="fine-tuning seeds of each confirmation on test subjects "
                        "(also the noise estimate). Default: 3.")
    parser.add_argument("--goal", type=float, default=0.2, help="the target share of the grid's cost. Default: 0.2.")
    parser.add_argument("--quick", action="store_true", help=f"a small configuration for a CPU: {QUICK} unless given.")
    parser.add_argument("--work", type=Path, default=WORK, help=f"cache of the grid and the engine runs. Default: {WORK}.")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output. Default: {RESULTS}.")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    if args.trials is not None and args.trials < 1:
        parser.error(f"--trials must be at least 1, but got {args.trials}.")
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be at least 1, but got {args.epochs}.")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, but got {args.repeats}.")
    if args.tolerance < 0 or not 0 < args.goal <= 1:
        parser.error("--tolerance must be >= 0 and --goal in (0, 1].")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants must be among {', '.join(VARIANTS)}, but got {', '.join(unknown)}.")
    return args


# The grid ----------------------------------------------------------------------------------------
def _write_json(path: Path, data: Any) -> None:
    """Atomically (temporary file + ``os.replace``): an interruption never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)


def _run_grid(setup, plans: list, counter, grid_dir: Path) -> list[dict[str, Any]]:
    """Every grid plan on every pair of ``setup``; one JSON per plan in ``grid_dir``, updated after
    each pair, so that a rerun skips the plans and pairs already done."""
    from autopeft.search.trial import run_plan, running_means, scores_from_json, scores_to_json

    rows = []
    for index, plan in enumerate(plans):
        path = grid_dir / f"{index:02d}-{plan.name}.json"
        row = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        units = len(setup.units)
        if row is None or row["plan"] != plan.to_dict():
            count = counter.count(plan)
            row = {"name": plan.name, "plan": plan.to_dict(), "trainable": count.trainable, "fraction": count.fraction,
                   "epochs": int(plan.train.get("epochs", setup.epochs)), "pairs_total": units, "pairs": [], "seconds": 0.0}
        if len(row["pairs"]) < units:
            started = time.perf_counter()
            done_before = len(row["pairs"])

            def report(metrics: dict[str, Any], _row=row, _path=path, _t0=started, _before=row["seconds"]) -> None:
                _row.update(pairs=metrics["pairs"], seconds=_before + time.perf_counter() - _t0)
                _write_json(_path, _row)

            print(f"grid {index + 1:2d}/{len(plans)} {plan.name}: {units - done_before} pair(s) to fine-tune", flush=True)
            run_plan(setup, plan, report=report, skip=done_before, previous=scores_from_json(row["pairs"]))
        scores = scores_from_json(row["pairs"])
        epochs = int(plan.train.get("epochs", setup.epochs))  # as run_plan trains it
        row.update(running_means(scores), pairs_done=len(scores), cost=len(scores) * epochs, pairs=scores_to_json(scores))
        _write_json(path, row)
        rows.append(row)
    return rows


# The engine runs ---------------------------------------------------------------------------------
def _engine_run(args: argparse.Namespace, settings: dict[str, Any], variant: str, sampler_seed: int, run_dir: Path) -> Path:
    """One engine run in ``run_dir``: reused when complete, resumed when interrupted."""
    from autopeft.search.engine import SearchConfig, run_search
    from autopeft.runs import TERMINAL, records

    if (run_dir / "run.json").is_file():
        done = sum(r.get("state") in TERMINAL for r in records(run_dir))
        if done >= args.trials and (run_dir / "summary.json").is_file():
            print(f"engine {variant} (sampler seed {sampler_seed}): reusing {run_dir}", flush=True)
            return run_dir
        print(f"engine {variant} (sampler seed {sampler_seed}): resuming {run_dir} ({done} of {args.trials} trials done)", flush=True)
        return run_search(resume_dir=run_dir, trials=args.trials)
    config = SearchConfig(
        backbone=args.backbone, budget=settings["budget"], preset=settings["preset"], scanners=settings["scanners"],
        trials=args.trials, epochs=settings["epochs"], folds=args.folds, seed=args.seed, sampler_seed=sampler_seed,
        out=str(run_dir), data=args.data, pretrain_epochs=args.pretrain_epochs, references=False, confirm=0,
        asha=not args.no_asha, device=settings["device"], cpus_per_trial=1.0, concurrency=args.concurrency,
        **VARIANTS[variant],
    )
    print(f"engine {variant} (sampler seed {sampler_seed}): {args.trials} trials in {run_dir}", flush=True)
    return run_search(config)


def _trial_rows(run_dir: Path, trials: int, epochs: int) -> list[dict[str, Any]]:
    """The run's first ``trials`` trained plans (by number; as ``--trials`` counts them, the
    over-budget draws among them kept at cost 0) in the order they ended, with their cost."""
    from autopeft.runs import INFEASIBLE, records

    rows, trained = [], 0
    for r in sorted(records(run_dir), key=lambda r: r["number"]):
        if trained == trials:
            break
        if r.get("state") != "RUNNING":
            rows.append(r)
            trained += r.get("state") != INFEASIBLE
    for r in rows:
        plan_epochs = int((r.get("plan") or {}).get("train", {}).get("epochs", epochs))
        r["cost"] = int(r.get("pairs_done") or 0) * plan_epochs  # INFEASIBLE: 0 pairs done, 0 cost
        r["ended"] = float(r.get("started") or 0.0) + float(r.get("seconds") or 0.0)
    return sorted(rows, key=lambda r: (r["ended"], r["number"]))


def _confirmed(setup, plan: dict[str, Any], seeds: list[int], folder: Path) -> dict[str, Any]:
    """``plan`` re-run from scratch with each fine-tuning seed, scored on test subjects (cached)."""
    from autopeft.peft import Plan
    from autopeft.search.trial import run_plan, running_means

    key = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:12]
    path = folder / f"{key}.json"
    done = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"plan": plan, "seeds": {}}
    for seed in seeds:
        if str(seed) not in done["seeds"]:
            done["seeds"][str(seed)] = running_means(run_plan(setup, Plan.from_dict(plan), split="test", train_seed=seed))["psnr"]
            _write_json(path, done)
    values = [done["seeds"][str(seed)] for seed in seeds]
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "seeds": values}


def _summarise_engine(rows: list[dict[str, Any]], confirm, target: float, grid_best_test: float, grid_cost: int,
                      goal: float) -> dict[str, Any]:
    """Cost to reach the grid's best on test: each plan that becomes best so far by validation is
    confirmed on test (``confirm(plan) -> {"mean", ...}``) until one reaches ``target``."""
    cost, reached, best, confirmed_plans = 0, None, None, 0
    for position, r in enumerate(rows, start=1):
        cost += r["cost"]
        if r["state"] != "FINISHED" or r["psnr"] is None or (best is not None and r["psnr"] <= best["psnr"]):
            continue
        best = r
        if reached is None:
            test = confirm(r["plan"])
            confirmed_plans += 1
            if test["mean"] >= target:
                reached = {"cost": cost, "share": cost / grid_cost, "trials": position, "trial": r["number"], "test": test}
    states: dict[str, int] = {}
    for r in rows:
        states[r["state"]] = states.get(r["state"], 0) + 1
    best_test = confirm(best["plan"]) if best is not None else None
    return {
        "total_cost": cost, "total_share": cost / grid_cost, "trials": len(rows), "states": states,
        "reached": reached is not None, "cost_to_reach": reached["cost"] if reached else None,
        "share_to_reach": reached["share"] if reached else None, "trials_to_reach": reached["trials"] if reached else None,
        "plans_confirmed": confirmed_plans, "meets_goal": bool(reached and reached["share"] <= goal),
        "best": None if best is None else {
            "trial": best["number"], "val_psnr": best["psnr"], "test_psnr": best_test["mean"], "test_sd": best_test["sd"],
            "params_pct": 100 * best["fraction"], "plan": best["plan"], "beats_grid_on_test": best_test["mean"] > grid_best_test,
            "gap_test_db": best_test["mean"] - grid_best_test},
    }


# Priors and the whole bench ------------------------------------------------------------------------
def _settings(args: argparse.Namespace) -> dict[str, Any]:
    from autopeft.search.engine import SearchConfig, resolve_defaults

    resolved = resolve_defaults(SearchConfig(
        backbone=args.backbone, budget="100%", preset=args.preset, device=args.device, epochs=args.epochs, trials=args.trials,
        scanners=[s.strip() for s in args.scanners.split(",") if s.strip()] if args.scanners else None))
    args.trials = resolved.trials
    return {"preset": resolved.preset, "device": resolved.device, "scanners": [str(s) for s in resolved.scanners],
            "epochs": int(resolved.epochs)}


def _source_keys(setup, *, progress: bool = False) -> list[str]:
    """The cache key of every source model of ``setup`` (pre-training the missing ones)."""
    from autopeft.pretraining import SourceSpec
    from autopeft.search.trial import source_model

    keys = []
    for fold in setup.folds:
        for source in sorted({s for s, _ in setup.pairs}):
            _, meta = source_model(setup, source, fold, progress=progress)
            keys.append(SourceSpec(**{k: meta[k] for k in SourceSpec.__dataclass_fields__}).key())
    return keys


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    import torch

    from autopeft.cli._common import resolve_manifest
    from autopeft.data import read_manifest
    from autopeft.peft import Plan
    from autopeft.pretraining import manifest_digest
    from autopeft.search.budget import PlanCounter
    from autopeft.search.grid import grid_plans
    from autopeft.search.priors import PlanPrior, spearman
    from autopeft.search.trial import TrialSetup
    from backbones import build_backbone

    torch.set_num_threads(1)  # one thread per trial, the engine's trials included: steadier on a shared CPU
    wall_start = time.time()
    settings = _settings(args)
    manifest_path = str(resolve_manifest(args.data, progress=True))
    lr = build_backbone(args.backbone, settings["preset"]).preset.finetune.lr_peft
    plans = grid_plans(args.backbone, train={"lr": lr, "epochs": settings["epochs"]})
    template = build_backbone(args.backbone, settings["preset"])
    counter = PlanCounter(template)
    if args.budget == "grid":
        settings["budget"] = str(max(counter.count(p).trainable for p in plans))
    else:
        settings["budget"] = args.budget
    scanners = settings["scanners"]
    setup = TrialSetup(backbone=args.backbone, preset=settings["preset"], manifest_path=manifest_path,
                       pairs=tuple((s, t) for s in scanners for t in scanners if s != t), folds=tuple(range(args.folds)),
                       epochs=settings["epochs"], seed=args.seed, pretrain_epochs=args.pretrain_epochs,
                       device=settings["device"], threads=1, run_dir="")
    sources = _source_keys(setup, progress=True)  # pre-trains missing source models, once, here
    # Everything that changes a score is in the key (the source models' cache keys carry the data
    # and its pipeline version): a different evaluation gets a different folder, never stale results.
    evaluation = {"backbone": args.backbone, **{k: settings[k] for k in ("preset", "device", "scanners", "epochs")},
                  "folds": args.folds, "seed": args.seed, "pretrain_epochs": args.pretrain_epochs, "lr": lr,
                  "data": manifest_digest(read_manifest(manifest_path)), "sources": sources}
    key = hashlib.sha256(json.dumps(evaluation, sort_keys=True).encode()).hexdigest()[:12]
    work = args.work.expanduser().resolve() / f"{args.backbone}-{settings['preset']}-{key}"
    _write_json(work / "evaluation.json", evaluation)
    print(f"rediscovery: {args.backbone}/{settings['preset']} on {settings['device']}, {len(setup.units)} pair(s) "
          f"({', '.join(f'{s}->{t}' for s, t in setup.pairs)}) x {args.folds} fold(s), {settings['epochs']} epochs; "
          f"budget {settings['budget']} params; work folder {work}", flush=True)

    # 1. the grid (cached per plan and pair)
    phase = time.time()
    grid = _run_grid(setup, plans, counter, work / "grid")
    grid_seconds = time.time() - phase
    grid_cost = sum(r["cost"] for r in grid)
    grid_best = max(grid, key=lambda r: r["psnr"])  # chosen on validation, as a user of the grid would
    seeds = [args.seed + i for i in range(args.confirm_seeds)]
    confirm = lambda plan_dict: _confirmed(setup, plan_dict, seeds, work / "confirmed")  # noqa: E731
    grid_best_test = confirm(grid_best["plan"])
    tolerance = max(args.tolerance, grid_best_test["sd"])
    target = grid_best_test["mean"] - tolerance
    cost_to_grid_best = sum(r["cost"] for r in grid[: grid.index(grid_best) + 1])
    # No-FT (the source model as is, 0 epochs) puts the PSNRs in context: it costs no pair-epoch.
    no_ft = _run_grid(setup, [Plan.from_dict({"name": "no-ft", "backbone": args.backbone, "train": {"lr": lr, "epochs": 0}})],
                      counter, work / "reference")[0]

    # 2-4. the engine runs
    runs: dict[str, list[dict[str, Any]]] = {}
    engine_seconds: dict[str, float] = {}
    for variant in args.variants:
        for repeat in range(args.repeats):
            sampler_seed = args.seed + repeat
            run_dir = work / (f"engine-{variant}-b{settings['budget']}-s{sampler_seed}" + ("-noasha" if args.no_asha else ""))
            phase = time.time()
            _engine_run(args, settings, variant, sampler_seed, run_dir)
            engine_seconds[f"{variant}/{sampler_seed}"] = time.time() - phase
            rows = _trial_rows(run_dir, args.trials, settings["epochs"])
            summary = _summarise_engine(rows, confirm, target, grid_best_test["mean"], grid_cost, args.goal)
            runs.setdefault(variant, []).append({"sampler_seed": sampler_seed, "run_dir": str(run_dir), **summary, "_rows": rows})

    # Engine trials run in fresh Ray workers that import the code as it is then: if the source
    # models' key changed meanwhile (code or data edited during the run), they scored on another
    # evaluation. Said loudly rather than compared silently.
    changed = _source_keys(setup) != sources
    if changed:
        print("WARNING: the source models' cache key changed during this run (code or data edited meanwhile): "
              "engine trials may have used other source models than the grid; run again.", flush=True)

    # Prior score vs final PSNR over every plan trained on every pair (one set of site weights).
    prior_model = PlanPrior.for_setup(setup, template, counter)
    prior_of = lambda plan_dict: prior_model.score(Plan.from_dict(plan_dict))  # noqa: E731
    grid_points = [(prior_of(r["plan"]), r["psnr"]) for r in grid]
    engine_points = [(prior_of(r["plan"]), r["psnr"]) for variant_runs in runs.values() for run in variant_runs
                     for r in run["_rows"] if r["state"] == "FINISHED" and r["psnr"] is not None]
    points = grid_points + engine_points
    correlation = {"all": spearman([p for p, _ in points], [q for _, q in points]), "n_all": len(points),
                   "grid": spearman([p for p, _ in grid_points], [q for _, q in grid_points]), "n_grid": len(grid_points)}

    variants_out = {}
    for variant, variant_runs in runs.items():
        for run in variant_runs:
            run.pop("_rows")
        shares = [run["share_to_reach"] for run in variant_runs if run["reached"]]
        variants_out[variant] = {
            "runs": variant_runs, "reached": f"{len(shares)}/{len(variant_runs)}",
            "median_share_to_reach": _median(shares), "median_cost_to_reach": _median([r["cost_to_reach"] for r in variant_runs if r["reached"]]),
            "median_best_test_psnr": _median([r["best"]["test_psnr"] for r in variant_runs if r["best"]]),
            "meets_goal": f"{sum(r['meets_goal'] for r in variant_runs)}/{len(variant_runs)}",
        }
    result = {
        "benchmark": "rediscovery", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads_per_trial": 1, "device": settings["device"]},
        "command": "python bench/rediscovery.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "evaluation": evaluation, "evaluation_changed_during_run": changed, "budget_params": int(settings["budget"]) if settings["budget"].isdigit() else settings["budget"],
        "trials_per_run": args.trials, "repeats": args.repeats, "concurrency": args.concurrency, "asha": not args.no_asha,
        "tolerance_db": tolerance, "tolerance_floor_db": args.tolerance, "noise_sd_db": grid_best_test["sd"],
        "confirm_seeds": seeds, "goal_share": args.goal,
        "psnr_definition": "peak 1 on [0,1]-scaled volumes; mean over pairs of the targets' validation (val) or test subjects",
        "cost_unit": "fine-tuning pair-epochs (pairs run x epochs, summed over trained trials)",
        "prior_overhead_pair_epochs": 2 * len(setup.units),
        "no_ft": {"psnr": no_ft["psnr"], "ssim": no_ft["ssim"], "pairs": [p["psnr"] for p in no_ft["pairs"]]},
        "grid": {"plans": len(grid), "cost": grid_cost, "cost_to_its_best_in_file_order": cost_to_grid_best,
                 "best": {"name": grid_best["name"], "val_psnr": grid_best["psnr"], "test_psnr": grid_best_test["mean"],
                          "test_sd": grid_best_test["sd"], "test_seeds": grid_best_test["seeds"],
                          "params_pct": 100 * grid_best["fraction"]},
                 "rows": [{k: r[k] for k in ("name", "psnr", "ssim", "nrmse", "fraction", "cost", "seconds")} | {"prior": p}
                          for r, (p, _) in zip(grid, grid_points)]},
        "engine": variants_out,
        "spearman_prior_vs_psnr": correlation,
        "seconds": {"grid_this_session": grid_seconds, "engine_this_session": engine_seconds, "total": time.time() - wall_start},
    }
    _print(result)
    _write_json(args.out.expanduser().resolve(), result)
    print(f"\nwritten {args.out}")
    return result


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _print(result: dict[str, Any]) -> None:
    grid = result["grid"]
    print(f"\n{result['evaluation']['backbone']}/{result['evaluation']['preset']}, pairs of scanners "
          f"{','.join(result['evaluation']['scanners'])}, {result['evaluation']['epochs']} epochs; PSNR {result['psnr_definition']}")
    print(f"No-FT (source model as is): {result['no_ft']['psnr']:.3f} dB (validation)")
    print("grid (validation PSNR, % params, prior):")
    for r in sorted(grid["rows"], key=lambda r: -r["psnr"]):
        print(f"  {r['name']:<24} {r['psnr']:8.3f} dB {100 * r['fraction']:7.3f}%  prior {r['prior']:.3f}")
    best = grid["best"]
    print(f"grid best by validation {best['name']}: {best['val_psnr']:.3f} dB (val), {best['test_psnr']:.3f} dB on test "
          f"(mean over seeds {result['confirm_seeds']}, SD {best['test_sd']:.3f}) at {best['params_pct']:.3f}%; grid cost "
          f"{grid['cost']} pair-epochs")
    print(f"reaching it = a best-so-far plan within {result['tolerance_db']:.3f} dB of it on test (the larger of the "
          f"--tolerance floor {result['tolerance_floor_db']} dB and the measured noise {result['noise_sd_db']:.3f} dB); goal <= "
          f"{100 * result['goal_share']:.0f}% of the grid's cost ({result['goal_share'] * grid['cost']:.0f} pair-epochs)")
    print(f"\n{'run':<22} {'reached':>7} {'cost to reach':>14} {'% of grid':>9} {'trials':>6} {'total cost':>10} "
          f"{'best val':>8} {'best test':>9} {'% params':>8} {'test vs grid':>12}")
    for variant, data in result["engine"].items():
        for run in data["runs"]:
            best = run["best"] or {}
            print(f"{variant + '/s' + str(run['sampler_seed']):<22} {'yes' if run['reached'] else 'no':>7} "
                  f"{_fmt(run['cost_to_reach'], 'd'):>14} {_fmt(run['share_to_reach'] and 100 * run['share_to_reach'], '.1f'):>9} "
                  f"{_fmt(run['trials_to_reach'], 'd'):>6} {run['total_cost']:>10d} {_fmt(best.get('val_psnr'), '.3f'):>8} "
                  f"{_fmt(best.get('test_psnr'), '.3f'):>9} {_fmt(best.get('params_pct'), '.3f'):>8} "
                  f"{_fmt(best.get('gap_test_db'), '+.3f'):>12}")
    print(f"(priors also cost {result['prior_overhead_pair_epochs']} pair-epochs of gradient passes, once per evaluation)")
    c = result["spearman_prior_vs_psnr"]
    print(f"Spearman(prior, validation PSNR): {_fmt(c['all'], '.3f')} over {c['n_all']} fully trained plans; "
          f"{_fmt(c['grid'], '.3f')} over the {c['n_grid']} grid plans")


if __name__ == "__main__":
    main()
