"""Does the search find a better plan than PETITE's exhaustive grid, for less, and do priors help?

One *scenario* is (backbone, scanners, data seed): built-in simulated data with that seed, every
ordered pair of the scanners, fold 0, the preset's source models. The scenarios are declared in
``bench/scenarios.yaml``, with their roles: ``tuning`` ones (earlier defaults, the prior's formula
among them, were chosen on them), ``lab`` ones (bench/table.py, bench/replay.py) and ``confirm``
ones, run here only once the lab has fixed the defaults (the held-out check). Per scenario and space (``grouped``: ``search_spaces/<backbone>.yaml``, one method
per group of blocks; ``blocks``: ``<backbone>-blocks.yaml``, one per encoder/decoder block):

1. PETITE's grid (``search_spaces/petite-grid.yaml``): every plan within the budget on every pair,
   cached per plan and pair in the work folder;
2. engine runs (``autopeft.runner.run_search``: Ray Tune + ASHA over the Optuna study) for each
   variant of ``VARIANTS`` (samplers, priors on / off / warm start only, the two prior signals),
   ``--repeats`` times with sampler seeds seed, seed+1, ... on the same evaluation.

Cost = fine-tuning pair-epochs: per trained trial, the pair-epochs it ran (a trial ASHA stopped
counts those it ran, mid-pair ones included with ``--fidelity epochs``; an over-budget draw never
trains and costs 0). The priors' own cost
(one gradient pass over one epoch of each pair's batches) is reported beside it.

Every choice is made on validation subjects: the grid's best, each run's best so far (its FINISHED
trial with the highest validation gain over No-FT). Each plan that becomes a run's best so far,
the grid's best and No-FT are re-run from scratch with ``--confirm-seeds`` fine-tuning seeds and
scored on the targets' *test* subjects (never seen by any choice). From those:

- the **test gain** of a plan: its test PSNR minus No-FT's (mean over seeds, pairs, subjects);
- the **best known** plan on test: the highest test gain among the grid's best and every confirmed
  best-so-far plan of every variant (an in-sample maximum over the runs of this bench);
- a run's **regret curve**: best known test gain minus the run's best-so-far test gain, against
  pair-epochs spent (0 spent: No-FT, gain 0); its **area** is the mean regret over a common
  horizon, the largest total cost of any run (a run holds its last best after it ends);
- **cost to reach** the grid's best / the best known: the pair-epochs until the best-so-far test gain
  is within the tolerance of it (the larger of ``--tolerance`` and the SD over seeds of the grid
  best's test PSNR), as a share of the grid's cost;
- **Spearman(prior, validation gain)** per prior signal, over every plan trained on every pair;
- **slot utilisation** of each run (trial seconds over slots x trial-phase wall time).

Per variant: medians with min and max over the repeats; against ``no-priors`` (TPE, no prior), the
regret area's paired difference over the same sampler seeds (mean, 95% bootstrap CI, Wilcoxon p).
Results go to ``bench/results/rediscovery-<scenario>-<space>.json``.

    python bench/rediscovery.py --quick --scenario cvtgan-2-4-d1 --space grouped --repeats 5
    python bench/rediscovery.py --preset paper --scenario unetr-1-5 --trials 64 --repeats 5   # GPU
    python bench/rediscovery.py --lab --scenario unetr-1-3-d6 --repeats 10 --variants <chosen>,no-priors

``--lab`` is the lab's check on the real engine (docs/lab.md): the replays' settings, the lr-tuned
Table-1 rows (the engine's portfolio, trained in full) in place of the grid, and the regret read up
to the declared horizon with a prior's own cost charged at the start.

PSNR: peak 1 on [0, 1]-scaled volumes; comparable only within one scenario.
Interrupted? Run the same command again: finished grid pairs, trials and confirmations are kept.
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
sys.path.insert(0, str(ROOT / "bench"))  # its helpers (_grid.py, _lab.py)

from _lab import BASELINE, TABLES, code_version, declared_betas, load_declared, paired, plan_id, variant_list  # noqa: E402

RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / "results" / "rediscovery"
# The scenarios and their roles are bench/scenarios.yaml's (declared before use): tuning scenarios
# (earlier defaults were chosen on them), lab ones (the lab's tables) and confirm ones (the held-out
# check of the lab's defaults).
SCENARIOS: dict[str, dict[str, Any]] = {
    name: {"backbone": spec["backbone"], "scanners": ",".join(str(s) for s in spec["scanners"]),
           "data_seed": int(spec["data_seed"]), "role": spec["role"]}
    for name, spec in load_declared()["scenarios"].items()
}
# Every variant names its fidelity: their cached runs keep their meaning when the default changes.
VARIANTS: dict[str, dict[str, Any]] = {
    "priors": {"sampler": "tpe", "priors": True, "prior_signal": "shpeft", "fidelity": "pairs"},
    "sensitivity": {"sampler": "tpe", "priors": True, "prior_signal": "sensitivity", "fidelity": "pairs"},
    "warm-only": {"sampler": "tpe", "priors": True, "prior_signal": "shpeft", "prior_candidates": 1, "fidelity": "pairs"},
    "no-priors": {"sampler": "tpe", "priors": False, "fidelity": "pairs"},
    "gp": {"sampler": "gp", "priors": False, "fidelity": "pairs"},
    "random": {"sampler": "random", "priors": False, "fidelity": "pairs"},
    # sensitivity with ASHA judging on pair-epochs (mid-pair scores) instead of pairs.
    "epoch-rung": {"sampler": "tpe", "priors": True, "prior_signal": "sensitivity", "fidelity": "epochs"},
}
PAIRED_AGAINST = BASELINE
# Variants a real engine cannot run: the lab's controls need the table (oracle) or wrap a prior
# the engine never builds (inverted, permuted).
_LAB_CONTROLS = ("oracle", "inverted-", "permuted-")
QUICK = {"scanners": "1,5", "epochs": 4, "trials": 8}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default=None, choices=list(SCENARIOS),
                        help="a declared scenario (backbone, scanners, data seed); overrides those three.")
    parser.add_argument("--space", default="grouped", choices=("grouped", "blocks"),
                        help="grouped: <backbone>.yaml; blocks: <backbone>-blocks.yaml (a method per block). Default: grouped.")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the built-in simulated data. Default: 0.")
    parser.add_argument("--backbone", default="unetr", help="unetr or cvtgan. Default: unetr.")
    parser.add_argument("--preset", default=None, help="backbone preset. Default: tiny on a CPU, paper on a GPU.")
    parser.add_argument("--device", default=None, help="cpu or cuda. Default: cuda if available.")
    parser.add_argument("--scanners", default=None, help="comma-separated scanner ids; every ordered pair is used. Default: 1,5 on a CPU, all five on a GPU.")
    parser.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs per pair. Default: the preset's (tiny 20, paper 150).")
    parser.add_argument("--trials", type=int, default=None, help="trials per engine run. Default: 16 on a CPU, 64 on a GPU.")
    parser.add_argument("--budget", default="1%", help="parameter budget of the grid and the engine runs (1%%, 250k, ...); "
                        "'grid' = the largest plan of the grid, so every grid plan is feasible. Default: 1%%.")
    parser.add_argument("--folds", type=int, default=1, help="cross-validation folds per pair. Default: 1.")
    parser.add_argument("--seed", type=int, default=0, help="seeds the evaluation (splits, crops, initialisation). Default: 0.")
    parser.add_argument("--repeats", type=int, default=1, help="engine runs per variant, with sampler seeds seed, seed+1, ... Default: 1.")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"engine variants to run, from {', '.join(VARIANTS)}. Default: all.")
    parser.add_argument("--paired-against", default=PAIRED_AGAINST,
                        help=f"the variant every other is compared with, paired by sampler seed. Default: {PAIRED_AGAINST}.")
    parser.add_argument("--concurrency", type=int, default=1, help="engine trials at once. 1 keeps the cost order exact "
                        "(with more, trials are ordered by when they end). Default: 1.")
    parser.add_argument("--no-asha", action="store_true", help="let every engine trial run all its pairs.")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="epochs of the source models. Default: the preset's.")
    parser.add_argument("--data", default=None, help="a directory with manifest.csv, or the CSV. Default: the built-in simulated data.")
    parser.add_argument("--tolerance", type=float, default=0.05, help="dB below the grid best's test PSNR that counts as reaching "
                        "it, at least; the measured noise is used when larger. Default: 0.05.")
    parser.add_argument("--confirm-seeds", type=int, default=3, help="fine-tuning seeds of each confirmation on test subjects "
                        "(also the noise estimate). Default: 3.")
    parser.add_argument("--goal", type=float, default=0.1, help="the target share of the grid's cost. Default: 0.1.")
    parser.add_argument("--lab", action="store_true", help=(
        "the lab's check on the real engine (docs/lab.md): the lab's epochs (tables/pilot.json) and horizon "
        "(replay.horizon_trials x pairs x epochs pair-epochs of bench/scenarios.yaml, a prior's own cost charged), "
        "the portfolio first and ASHA on pair-epochs as the replays ran, variants named as bench/replay.py names "
        "them (no-priors, random, <signal>-bh/10 ...), and as the reference PETITE's Table-1 rows within the budget "
        "at the portfolio's learning-rate ladder (the best by validation: the best lr-tuned Table-1 row)."))
    parser.add_argument("--quick", action="store_true", help=f"a small configuration for a CPU: {QUICK} unless given.")
    parser.add_argument("--work", type=Path, default=WORK, help=f"cache of the grid and the engine runs. Default: {WORK}.")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON output. Default: {RESULTS}/rediscovery-<scenario>-<space>.json.")
    args = parser.parse_args(argv)
    if args.scenario is not None:
        chosen = SCENARIOS[args.scenario]
        args.backbone, args.scanners, args.data_seed = chosen["backbone"], chosen["scanners"], chosen["data_seed"]
    name = args.scenario or f"{args.backbone}-{(args.scanners or 'default').replace(',', '-')}-d{args.data_seed}"
    args.scenario_name = name
    if args.out is None:
        args.out = RESULTS / f"rediscovery-{name}-{args.space}.json"
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
    if args.lab:
        _lab_arguments(parser, args)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    known = args.lab_variants if args.lab else VARIANTS
    unknown = [v for v in args.variants if v not in known]
    if unknown:
        controls = [v for v in unknown if v.startswith(_LAB_CONTROLS)]
        hint = (f" ({', '.join(controls)}: lab controls, which only a replay can run)" if controls else "")
        parser.error(f"--variants must be among {', '.join(known)}, but got {', '.join(unknown)}{hint}.")
    if args.paired_against not in known:
        parser.error(f"--paired-against must be among {', '.join(known)}, but got {args.paired_against!r}.")
    return args


def _lab_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--lab``: the settings the replays ran with, from bench/scenarios.yaml and the pilot."""
    from autopeft.search.options import PRIOR_SIGNALS

    if args.quick:
        parser.error("--lab runs the lab's own settings; drop --quick.")
    if args.scenario is None:
        parser.error("--lab needs --scenario (a declared one; the lab's checks run on the `confirm` scenarios).")
    declared = load_declared()
    pilot = TABLES / "pilot.json"
    if not pilot.is_file():
        parser.error(f"--lab reads the lab's epochs from {pilot}, which is missing: run `python bench/table.py --pilot`.")
    lab_epochs = int(json.loads(pilot.read_text(encoding="utf-8"))["epochs"])
    if args.epochs not in (None, lab_epochs):
        parser.error(f"--lab runs the lab's {lab_epochs} epochs ({pilot}); drop --epochs {args.epochs}.")
    args.epochs = lab_epochs
    args.horizon_trials = int(declared["replay"]["horizon_trials"])
    # Trials enough to pass the horizon (a replayed run needs ~1.7 x horizon_trials, ASHA stopping
    # many); the regret is read up to the horizon only, and a run that ends short is flagged.
    args.trials = args.trials or 2 * args.horizon_trials
    args.lab_variants = {name: settings for name, settings in variant_list(PRIOR_SIGNALS, declared_betas(args.horizon_trials)).items()
                         if not name.startswith(_LAB_CONTROLS)}
    if args.variants == ",".join(VARIANTS):  # the default of the engine variants: the lab's pair
        args.variants = f"{BASELINE}"
    if args.out is None or args.out == RESULTS / f"rediscovery-{args.scenario_name}-{args.space}.json":
        args.out = RESULTS / f"rediscovery-lab-{args.scenario_name}-{args.space}.json"


def variant_settings(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    """The SearchConfig fields of ``variant``: an engine variant of ``VARIANTS``, or with ``--lab``
    a lab variant as bench/replay.py runs it (the portfolio first, ASHA on pair-epochs)."""
    if not getattr(args, "lab", False):
        return dict(VARIANTS[variant])
    lab = args.lab_variants[variant]
    out = {"sampler": lab["sampler"], "priors": lab["prior"] is not None, "fidelity": "epochs", "portfolio": True}
    if lab["prior"] is not None:
        out.update(prior_signal=lab["prior"], prior_beta=float(lab["beta"]))
    return out


# The grid ----------------------------------------------------------------------------------------
def _write_json(path: Path, data: Any) -> None:
    from autopeft._io import atomic_write_json

    atomic_write_json(path, data, default=str)


def _run_grid(setup, plans: list, counter, grid_dir: Path) -> list[dict[str, Any]]:
    """Every grid plan on every pair of ``setup``; one JSON per plan in ``grid_dir``, updated after
    each pair, so that a rerun skips the plans and pairs already done."""
    from autopeft.runner.trial import run_plan, running_means, scores_from_json, scores_to_json

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
    from autopeft.report import SearchOutputs
    from autopeft.runner import run_search
    from autopeft.search.config import SearchConfig
    from autopeft.runs import INFEASIBLE, TERMINAL, records

    if (run_dir / "run.json").is_file():
        done = sum(r.get("state") in TERMINAL and r.get("state") != INFEASIBLE for r in records(run_dir))
        if done >= args.trials and (run_dir / "summary.json").is_file():
            print(f"engine {variant} (sampler seed {sampler_seed}): reusing {run_dir}", flush=True)
            return run_dir
        print(f"engine {variant} (sampler seed {sampler_seed}): resuming {run_dir} ({done} of {args.trials} trials done)", flush=True)
        return run_search(resume_dir=run_dir, trials=args.trials, outputs=SearchOutputs())
    config = SearchConfig(
        backbone=args.backbone, budget=settings["budget"], preset=settings["preset"], scanners=settings["scanners"],
        space=settings["space"], trials=args.trials, epochs=settings["epochs"], folds=args.folds, seed=args.seed,
        sampler_seed=sampler_seed, out=str(run_dir), data=settings["manifest"], pretrain_epochs=args.pretrain_epochs,
        # No baseline portfolio (but with --lab): the variants compare search strategies from an
        # empty study, as the committed results were measured.
        references=False, confirm=0, asha=not args.no_asha, device=settings["device"], cpus_per_trial=1.0,
        concurrency=args.concurrency, progress=False, **{"portfolio": False, **variant_settings(args, variant)},
    )
    print(f"engine {variant} (sampler seed {sampler_seed}): {args.trials} trials in {run_dir}", flush=True)
    return run_search(config, outputs=SearchOutputs())


def _trial_rows(run_dir: Path, trials: int, epochs: int) -> list[dict[str, Any]]:
    """The run's first ``trials`` trained plans (by number; the over-budget draws among them kept
    at cost 0) in the order they ended, with their cost."""
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
        # Records before epochs_done existed ran whole pairs only. INFEASIBLE: nothing done, 0 cost.
        done = r.get("epochs_done")
        r["cost"] = int(done) if done is not None else int(r.get("pairs_done") or 0) * plan_epochs
        r["ended"] = float(r.get("started") or 0.0) + float(r.get("seconds") or 0.0)
    return sorted(rows, key=lambda r: (r["ended"], r["number"]))


def _confirmed(setup, plan: dict[str, Any], seeds: list[int], folder: Path) -> dict[str, Any]:
    """``plan`` re-run from scratch with each fine-tuning seed, scored on test subjects (cached)."""
    from autopeft.peft import Plan
    from autopeft.runner.trial import run_plan, running_means

    path = folder / f"{plan_id(plan)}.json"
    done = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"plan": plan, "seeds": {}}
    for seed in seeds:
        if str(seed) not in done["seeds"]:
            done["seeds"][str(seed)] = running_means(run_plan(setup, Plan.from_dict(plan), split="test", train_seed=seed))["psnr"]
            _write_json(path, done)
    values = [done["seeds"][str(seed)] for seed in seeds]
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "seeds": values}


def _best_so_far(rows: list[dict[str, Any]], confirm, no_ft_test: float, *, start: float = 0,
                 horizon: float | None = None) -> list[dict[str, Any]]:
    """The steps of a run's best-so-far curve: after each trial that ended, the pair-epochs spent
    (from ``start``: a prior's own cost) and the test gain of the best FINISHED plan by validation
    so far (0: No-FT, before any). A step where the best changes also holds that plan, its test
    PSNR and its share of parameters. Trials ending after ``horizon`` are left out (never confirmed)."""
    steps, cost, best = [{"cost": 0, "trial": None, "val_gain": None, "test_gain": 0.0}], start, None
    for r in rows:
        if horizon is not None and cost + r["cost"] > horizon:
            break
        cost += r["cost"]
        if r["state"] == "FINISHED" and r.get("gain") is not None and (best is None or r["gain"] > best["gain"]):
            best = r
            test = confirm(r["plan"])
            steps.append({"cost": cost, "trial": r["number"], "val_gain": r["gain"], "test_gain": test["mean"] - no_ft_test,
                          "test_psnr": test["mean"], "test_sd": test["sd"], "fraction": r["fraction"], "plan": r["plan"]})
        else:
            steps.append({k: steps[-1][k] for k in ("trial", "val_gain", "test_gain")} | {"cost": cost})
    return steps


def _last_best(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The step where the run's final best plan became best ({} when it finished none)."""
    return next((s for s in reversed(steps) if "plan" in s), {})


def _first_cost(steps: list[dict[str, Any]], level: float) -> int | None:
    return next((s["cost"] for s in steps if s["test_gain"] >= level), None)


def _regret_area(steps: list[dict[str, Any]], best_known: float, horizon: int) -> float:
    """Mean of (best known - best so far) test gain over pair-epochs 0..horizon (a step function:
    a trial's cost is spent before its plan counts)."""
    if horizon <= 0:
        return best_known - steps[-1]["test_gain"]
    area, previous = 0.0, steps[0]
    for step in steps[1:] + [{**steps[-1], "cost": max(horizon, steps[-1]["cost"])}]:
        width = min(step["cost"], horizon) - min(previous["cost"], horizon)
        area += width * (best_known - previous["test_gain"])
        previous = step
    return area / horizon


def _spread(values: list[float | None]) -> dict[str, Any]:
    """Median with min and max (``None`` values, e.g. never reached, counted apart)."""
    known = [v for v in values if v is not None]
    return {"median": statistics.median(known) if known else None, "min": min(known) if known else None,
            "max": max(known) if known else None, "n": len(known), "of": len(values)}


# The lab's check ---------------------------------------------------------------------------------
def _lab_reference_plans(args: argparse.Namespace, settings: dict[str, Any], template, counter) -> list:
    """The lr-tuned Table-1 rows: the engine's own portfolio (every Table-1 row within the budget
    at the space's learning-rate ladder), each named by its row and rate."""
    from autopeft.peft import Plan
    from autopeft.search.budget import Budget
    from autopeft.search.portfolio import portfolio
    from autopeft.search.space import load_space

    space = load_space(settings["space"], template.sites())
    entries = portfolio(space, counter, Budget.parse(args.budget), train={"epochs": settings["epochs"]})
    return [Plan.from_dict({**entry.plan.to_dict(), "name": entry.name.replace(" ", "_")}) for entry in entries]


def _prior_cost(args: argparse.Namespace, variant: str, run_dir: Path, summary: dict[str, Any]) -> float:
    """Pair-epochs a variant's prior cost to make, as its engine run recorded it in summary.json
    (charged at the start of its runs with ``--lab``; 0 without a prior or without ``--lab``)."""
    if not args.lab or variant_settings(args, variant).get("prior_signal") is None:
        return 0.0
    if "prior" not in summary:
        raise SystemExit(f"{run_dir / 'summary.json'} has no 'prior' (written before the engine recorded the prior's cost): "
                         f"delete {run_dir} and run again.")
    return float(summary["prior"]["pair_epochs"])


# The whole bench ---------------------------------------------------------------------------------
def _settings(args: argparse.Namespace) -> dict[str, Any]:
    from autopeft.search.config import SearchConfig, resolve_defaults

    resolved = resolve_defaults(SearchConfig(
        backbone=args.backbone, budget="100%", preset=args.preset, device=args.device, epochs=args.epochs, trials=args.trials,
        scanners=[s.strip() for s in args.scanners.split(",") if s.strip()] if args.scanners else None))
    args.trials = resolved.trials
    return {"preset": resolved.preset, "device": resolved.device, "scanners": [str(s) for s in resolved.scanners],
            "epochs": int(resolved.epochs), "space": args.backbone + ("-blocks" if args.space == "blocks" else "")}


def _source_keys(setup, *, progress: bool = False) -> list[str]:
    """The cache key of every source model of ``setup`` (pre-training the missing ones)."""
    from autopeft.pretraining import SourceSpec
    from autopeft.runner.trial import source_model

    keys = []
    for fold in setup.folds:
        for source in sorted({s for s, _ in setup.pairs}):
            _, meta = source_model(setup, source, fold, progress=progress)
            keys.append(SourceSpec.from_metadata(meta).key())
    return keys


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    import torch

    from autopeft.data import read_manifest
    from autopeft.data.simulator import builtin_data
    from autopeft.peft import Plan
    from autopeft.pretraining import manifest_digest
    from autopeft.search.budget import Budget, PlanCounter
    from autopeft.runner.confirm import confirmation_seeds
    from autopeft.search.options import PRIOR_SIGNALS
    from autopeft.search.prior_quality import spearman
    from autopeft.search.priors import SITE_MASS_SIGNALS
    from autopeft.search.signals import prior_for
    from autopeft.search.space import load_space
    from autopeft.runner.trial import setup_from_config
    from autopeft.stats import paired_difference
    from autopeft.backbones import build_backbone

    from _grid import grid_plans

    torch.set_num_threads(1)  # one thread per trial, the engine's trials included: steadier on a shared CPU
    wall_start = time.time()
    settings = _settings(args)
    if args.data is not None:
        manifest = Path(args.data).expanduser()
        manifest_path = str(manifest / "manifest.csv" if manifest.is_dir() else manifest)
    else:
        manifest_path = str(builtin_data(seed=args.data_seed, progress=True))
    settings["manifest"] = manifest_path
    lr = build_backbone(args.backbone, settings["preset"]).preset.finetune.lr_peft
    template = build_backbone(args.backbone, settings["preset"])
    counter = PlanCounter(template)
    all_plans = (_lab_reference_plans(args, settings, template, counter) if args.lab
                 else grid_plans(args.backbone, train={"lr": lr, "epochs": settings["epochs"]}))
    if args.budget == "grid":
        settings["budget"] = str(max(counter.count(p).trainable for p in all_plans))
    else:
        settings["budget"] = args.budget
    budget = Budget.parse(settings["budget"])
    # The grid a user of PETITE's table would run under this budget: its plans that fit.
    plans = [p for p in all_plans if budget.allows(counter.count(p).trainable, counter.total)]
    if not plans:
        raise SystemExit(f"no plan of the grid fits the budget {settings['budget']}: raise --budget.")
    scanners = settings["scanners"]
    setup = setup_from_config({"backbone": args.backbone, "preset": settings["preset"], "scanners": scanners,
                               "folds": args.folds, "epochs": settings["epochs"], "seed": args.seed,
                               "pretrain_epochs": args.pretrain_epochs, "device": settings["device"]},
                              manifest_path=manifest_path, threads=1)
    sources = _source_keys(setup, progress=True)  # pre-trains missing source models, once, here
    # Everything that changes a score is in the key (the source models' cache keys carry the data
    # and its pipeline version): a different evaluation gets a different folder, never stale results.
    evaluation = {"backbone": args.backbone, **{k: settings[k] for k in ("preset", "device", "scanners", "epochs")},
                  "folds": args.folds, "seed": args.seed, "data_seed": args.data_seed, "pretrain_epochs": args.pretrain_epochs,
                  "lr": lr, "data": manifest_digest(read_manifest(manifest_path)), "sources": sources}
    key = hashlib.sha256(json.dumps(evaluation, sort_keys=True).encode()).hexdigest()[:12]
    work = args.work.expanduser().resolve() / f"{args.backbone}-{settings['preset']}-{key}"
    _write_json(work / "evaluation.json", evaluation)
    print(f"rediscovery {args.scenario_name} ({SCENARIOS.get(args.scenario, {}).get('role', 'custom')}), space "
          f"{settings['space']}: {args.backbone}/{settings['preset']} on {settings['device']}, {len(setup.units)} pair(s) "
          f"({', '.join(f'{s}->{t}' for s, t in setup.pairs)}), {settings['epochs']} epochs; budget {settings['budget']} "
          f"({len(plans)} of {len(all_plans)} grid plans fit); work folder {work}", flush=True)

    # 1. the grid (cached per plan and pair), No-FT on validation and test
    phase = time.time()
    grid = _run_grid(setup, plans, counter, work / ("lr-tuned-table1" if args.lab else "grid"))
    grid_seconds = time.time() - phase
    grid_cost = sum(r["cost"] for r in grid)
    no_ft_plan = {"name": "no-ft", "backbone": args.backbone, "train": {"lr": lr, "epochs": 0}}
    no_ft = _run_grid(setup, [Plan.from_dict(no_ft_plan)], counter, work / "reference")[0]
    for r in grid:
        r["gain"] = r["psnr"] - no_ft["psnr"]
    grid_best = max(grid, key=lambda r: r["psnr"])  # chosen on validation, as a user of the grid would
    seeds = list(confirmation_seeds(args.seed, args.confirm_seeds))  # none the search trained with
    confirm = lambda plan_dict: _confirmed(setup, plan_dict, seeds, work / "confirmed")  # noqa: E731
    no_ft_test = confirm(no_ft_plan)["mean"]
    grid_best_test = confirm(grid_best["plan"])
    grid_best_gain = grid_best_test["mean"] - no_ft_test
    tolerance = max(args.tolerance, grid_best_test["sd"])

    # 2. the engine runs, and every best-so-far plan confirmed on test
    runs: dict[str, list[dict[str, Any]]] = {}
    lab_horizon = args.horizon_trials * len(setup.units) * settings["epochs"] if args.lab else None
    for variant in args.variants:
        for repeat in range(args.repeats):
            sampler_seed = args.seed + repeat
            run_dir = work / (f"engine-{'lab-' if args.lab else ''}{settings['space']}-{variant.replace('/', '_')}"
                              f"-b{settings['budget']}-t{args.trials}-s{sampler_seed}" + ("-noasha" if args.no_asha else ""))
            phase = time.time()
            _engine_run(args, settings, variant, sampler_seed, run_dir)
            rows = _trial_rows(run_dir, args.trials, settings["epochs"])
            summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
            start = _prior_cost(args, variant, run_dir, summary)
            slots = summary.get("slots") or []
            runs.setdefault(variant, []).append({
                "sampler_seed": sampler_seed, "run_dir": str(run_dir), "seconds": time.time() - phase, "rows": rows,
                "prior_cost_pair_epochs": start,
                "steps": _best_so_far(rows, confirm, no_ft_test, start=start, horizon=lab_horizon),
                "short_of_horizon": lab_horizon is not None and start + sum(r["cost"] for r in rows) < lab_horizon,
                "slot_busy_share": slots[-1]["busy_share"] if slots else None,
                "trial_phase_seconds": sum(s["phase_seconds"] for s in slots) if slots else None,
                "states": {s: sum(r["state"] == s for r in rows) for s in sorted({r["state"] for r in rows})},
            })

    # Engine trials run in Ray workers that import the code as it is then: if the source models'
    # key changed meanwhile (code or data edited during the run), they scored on another evaluation.
    changed = _source_keys(setup) != sources
    if changed:
        print("WARNING: the source models' cache key changed during this run (code or data edited meanwhile): "
              "engine trials may have used other source models than the grid; run again.", flush=True)

    # 3. regret against the best known plan on test (in-sample over this bench's runs)
    best_known = max([grid_best_gain] + [s["test_gain"] for vr in runs.values() for run in vr for s in run["steps"]])
    horizon = lab_horizon or max([run["steps"][-1]["cost"] for vr in runs.values() for run in vr] or [grid_cost])
    for variant_runs in runs.values():
        for run in variant_runs:
            steps = run["steps"]
            run.update(
                total_cost=steps[-1]["cost"], total_share=steps[-1]["cost"] / grid_cost,
                regret_area_db=_regret_area(steps, best_known, horizon),
                cost_to_grid_best=_first_cost(steps, grid_best_gain - tolerance),
                cost_to_best_known=_first_cost(steps, best_known - tolerance),
                best_test_gain=steps[-1]["test_gain"], best_vs_grid_db=steps[-1]["test_gain"] - grid_best_gain,
                best_fraction=_last_best(steps).get("fraction"), best_plan=_last_best(steps).get("plan"))
            for name in ("cost_to_grid_best", "cost_to_best_known"):
                run[name.replace("cost", "share")] = None if run[name] is None else run[name] / grid_cost

    # 4. the priors: Spearman(prior, validation gain) over every plan trained on every pair
    trained = [(r["plan"], r["gain"]) for r in grid] + [
        (r["plan"], r["gain"]) for vr in runs.values() for run in vr for r in run["rows"]
        if r["state"] == "FINISHED" and r.get("gain") is not None]
    correlation = {}
    # The site-mass signals (cheap: one gradient pass per pair) and those the variants ran with
    # (cached by their runs); the per-candidate ones would train probes just for this figure.
    run_signals = [variant_settings(args, v).get("prior_signal") for v in args.variants]
    space = load_space(settings["space"], template.sites())
    for signal in [s for s in PRIOR_SIGNALS if s in SITE_MASS_SIGNALS or s in run_signals]:
        prior = prior_for(signal, setup, template, counter, space)
        scores = [prior.score(Plan.from_dict(plan)) for plan, _ in trained]
        grid_scores = scores[: len(grid)]
        correlation[signal] = {"all": spearman(scores, [g for _, g in trained]), "n_all": len(trained),
                               "grid": spearman(grid_scores, [r["gain"] for r in grid]), "n_grid": len(grid)}

    variants_out = {}
    against = args.paired_against
    reference = {run["sampler_seed"]: run for run in runs.get(against, [])}
    for variant, variant_runs in runs.items():
        paired_areas = [(run["regret_area_db"], reference[run["sampler_seed"]]["regret_area_db"])
                        for run in variant_runs if run["sampler_seed"] in reference]
        paired_final = [(run["best_test_gain"], reference[run["sampler_seed"]]["best_test_gain"])
                        for run in variant_runs if run["sampler_seed"] in reference]
        variants_out[variant] = {
            "settings": variant_settings(args, variant),
            "prior_cost_pair_epochs": max((r["prior_cost_pair_epochs"] for r in variant_runs), default=0.0),
            "runs_short_of_horizon": sum(bool(r.get("short_of_horizon")) for r in variant_runs),
            "regret_area_db": _spread([r["regret_area_db"] for r in variant_runs]),
            "share_to_grid_best": _spread([r["share_to_grid_best"] for r in variant_runs]),
            "share_to_best_known": _spread([r["share_to_best_known"] for r in variant_runs]),
            "best_test_gain_db": _spread([r["best_test_gain"] for r in variant_runs]),
            "best_vs_grid_db": _spread([r["best_vs_grid_db"] for r in variant_runs]),
            "slot_busy_share": _spread([r["slot_busy_share"] for r in variant_runs]),
            "total_pair_epochs": _spread([r["total_cost"] for r in variant_runs]),
            "trial_phase_seconds": _spread([r["trial_phase_seconds"] for r in variant_runs]),
            "beats_grid": f"{sum(r['best_vs_grid_db'] > 0 for r in variant_runs)}/{len(variant_runs)}",
            "within_goal": f"{sum(r['share_to_grid_best'] is not None and r['share_to_grid_best'] <= args.goal for r in variant_runs)}/{len(variant_runs)}",
            "regret_area_minus_paired": (paired_difference([a for a, _ in paired_areas], [b for _, b in paired_areas])
                                         if variant != against and len(paired_areas) >= 2 else None),
            "final_test_gain_minus_paired": (paired_difference([a for a, _ in paired_final], [b for _, b in paired_final])
                                             if variant != against and len(paired_final) >= 2 else None),
            # The declared intervals of the lab (bench/scenarios.yaml replay.intervals): t and BCa.
            "paired_t_and_bca": ({"regret_area": paired([a - b for a, b in paired_areas]),
                                  "final_test_gain": paired([a - b for a, b in paired_final])}
                                 if variant != against and len(paired_final) >= 2 else None),
            "runs": [{k: v for k, v in run.items() if k != "rows"} for run in variant_runs],
        }
    result = {
        "benchmark": "rediscovery", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "scenario": args.scenario_name, "scenario_role": SCENARIOS.get(args.scenario, {}).get("role", "custom"),
        "space": settings["space"],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads_per_trial": 1, "device": settings["device"]},
        "command": "python bench/rediscovery.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "code_version": code_version(),
        "evaluation": evaluation, "evaluation_changed_during_run": changed, "budget": settings["budget"],
        "lab": bool(args.lab),
        "reference_plans": ("PETITE's Table-1 rows within the budget at the portfolio's learning-rate ladder "
                            "(autopeft.search.portfolio.portfolio); 'grid' below holds them, its best by validation "
                            "is the best lr-tuned Table-1 row" if args.lab else "PETITE's grid (search_spaces/petite-grid.yaml)"),
        "trials_per_run": args.trials, "repeats": args.repeats, "concurrency": args.concurrency, "asha": not args.no_asha,
        "tolerance_db": tolerance, "tolerance_floor_db": args.tolerance, "noise_sd_db": grid_best_test["sd"],
        "confirm_seeds": seeds, "goal_share": args.goal, "horizon_pair_epochs": horizon, "paired_against": against,
        # Every run's first trial trains in full (the scheduler has nothing to judge it against), so no
        # run reaches any plan for less than one whole plan's cost.
        "least_possible_share": len(setup.units) * settings["epochs"] / grid_cost,
        "split": "choices on validation subjects; gains, regret and costs to reach on test subjects",
        "best_known_is_in_sample": "the best known test gain is the maximum over this bench's own confirmed plans",
        "psnr_definition": "peak 1 on [0,1]-scaled volumes; mean over pairs of the targets' validation (val) or test subjects",
        "cost_unit": "fine-tuning pair-epochs (pairs run x epochs, summed over trained trials)",
        "prior_overhead_pair_epochs": len(setup.units),
        "no_ft": {"val_psnr": no_ft["psnr"], "test_psnr": no_ft_test},
        "grid": {"plans_within_budget": len(grid), "plans": len(all_plans), "cost": grid_cost,
                 "best": {"name": grid_best["name"], "val_gain": grid_best["gain"], "test_gain": grid_best_gain,
                          "test_psnr": grid_best_test["mean"], "test_sd": grid_best_test["sd"],
                          "params_pct": 100 * grid_best["fraction"]},
                 "rows": [{k: r[k] for k in ("name", "psnr", "gain", "fraction", "cost", "seconds")} for r in grid]},
        "best_known_test_gain_db": best_known,
        "engine": variants_out,
        "spearman_prior_vs_val_gain": correlation,
        "seconds": {"grid_this_session": grid_seconds, "total": time.time() - wall_start},
    }
    _print(result)
    _write_json(args.out.expanduser().resolve(), result)
    print(f"\nwritten {args.out}")
    return result


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _span(spread: dict[str, Any], spec: str, scale: float = 1.0) -> str:
    if spread["median"] is None:
        return f"- (0/{spread['of']})"
    text = (f"{format(scale * spread['median'], spec)} [{format(scale * spread['min'], spec)}, "
            f"{format(scale * spread['max'], spec)}]")
    return text + (f" ({spread['n']}/{spread['of']})" if spread["n"] < spread["of"] else "")


def _print(result: dict[str, Any]) -> None:
    grid = result["grid"]
    e = result["evaluation"]
    print(f"\n{result['scenario']} ({result['scenario_role']}), space {result['space']}: {e['backbone']}/{e['preset']}, "
          f"scanners {','.join(e['scanners'])}, data seed {e['data_seed']}, {e['epochs']} epochs, budget {result['budget']}")
    print(f"No-FT: {result['no_ft']['val_psnr']:.3f} dB validation, {result['no_ft']['test_psnr']:.3f} dB test")
    best = grid["best"]
    print(f"grid: {grid['plans_within_budget']} of {grid['plans']} plans within the budget, cost {grid['cost']} pair-epochs; "
          f"best by validation {best['name']}: test gain {best['test_gain']:+.3f} dB (SD over seeds {best['test_sd']:.3f})")
    print(f"best known on test (in-sample over this bench): {result['best_known_test_gain_db']:+.3f} dB; tolerance "
          f"{result['tolerance_db']:.3f} dB; regret horizon {result['horizon_pair_epochs']} pair-epochs")
    print(f"\nper variant, median [min, max] over {result['repeats']} repeats (test subjects):")
    print(f"{'variant':<12} {'regret area dB':<24} {'% grid to grid best':<26} {'% grid to best known':<26} "
          f"{'best test gain dB':<26} {'beats grid':>10} {'slots busy %':<20} {'pair-epochs':<18} {'trial phase s':<20} "
          f"{'area vs ' + result['paired_against']}")
    for variant, data in result["engine"].items():
        diff = data["regret_area_minus_paired"]
        paired_text = "-" if diff is None else (f"{diff['mean']:+.3f} [{_fmt(diff['ci'][0], '+.3f')}, "
                                                f"{_fmt(diff['ci'][1], '+.3f')}] p={_fmt(diff['p'], '.2f')}")
        print(f"{variant:<12} {_span(data['regret_area_db'], '.3f'):<24} {_span(data['share_to_grid_best'], '.0f', 100):<26} "
              f"{_span(data['share_to_best_known'], '.0f', 100):<26} {_span(data['best_test_gain_db'], '+.3f'):<26} "
              f"{data['beats_grid']:>10} {_span(data['slot_busy_share'], '.0f', 100):<20} "
              f"{_span(data['total_pair_epochs'], '.0f'):<18} {_span(data['trial_phase_seconds'], '.0f'):<20} {paired_text}")
    if result.get("lab"):
        print("(--lab: 'grid' is the lr-tuned Table-1 rows within the budget; 'best test gain' is read at the horizon, "
              "a prior's own cost charged; its margin over the best lr-tuned row is in best_vs_grid_db)")
    print(f"(no run can reach a plan for less than {100 * result['least_possible_share']:.0f}% of the grid: its first "
          "trial trains in full)")
    print(f"(priors also cost {result['prior_overhead_pair_epochs']} pair-epochs of gradient passes, once per evaluation)")
    for signal, c in result["spearman_prior_vs_val_gain"].items():
        print(f"Spearman({signal} prior, validation gain): {_fmt(c['all'], '.3f')} over {c['n_all']} fully trained plans; "
              f"{_fmt(c['grid'], '.3f')} over the {c['n_grid']} grid plans")


if __name__ == "__main__":
    main()
