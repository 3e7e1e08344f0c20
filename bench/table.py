"""A lab table: many plans trained once on one declared scenario, for bench/replay.py to search in.

The scenarios and the table's contents are declared in ``bench/scenarios.yaml`` (``table:``); this
script follows them. A *scenario* is (backbone, scanners, data seed) on the built-in simulated
data: every ordered pair of its scanners, fold 0, the tiny preset on a CPU, evaluation seed 0.

Per scenario the table holds, per plan, ordered pair and fine-tuning seed (one row each):

- 150 feasible plans from the grouped space (``search_spaces/<backbone>.yaml``) and 150 from the
  per-block space (``<backbone>-blocks.yaml``): a scrambled Sobol sample (Optuna's
  ``QMCSampler(seed=0, scramble=True)``) of every parameter of the space, learning rate included,
  drawn define-by-run through ``SearchSpace.suggest``; draws over the 1% budget are skipped;
- every Table-1 row (``portfolio.table1_plans``) at the union of ``lr_ladder(space lr, 3)`` (the
  engine's portfolio) and ``lr_ladder(space lr, 5)``; No-FT; Full-FT at ``portfolio.full_ft_ladder``;
- fine-tuning seed 1 as well for 40 sampled plans (drawn with seed 0) and every Table-1 row at its
  middle rate: the seed-to-seed noise.

Columns: ``plan_id`` (SHA-256 of the plan dict, lr and epochs included, 12 hex), ``kind``
(sampled / table1 / no-ft / full-ft), ``label``, ``space``, ``params`` (Optuna params, JSON),
``plan`` (JSON), ``lr``, ``seed``, ``source``, ``target``, ``fold``, ``epochs``, ``trainable``,
``fraction``, ``feasible``, ``val_e1`` .. ``val_eE`` (validation PSNR after each epoch: the learning
curve), ``val_psnr`` (= ``val_eE``), ``test_psnr`` (test subjects, once, after the last epoch),
``noft_val`` / ``noft_test`` (No-FT's on the pair), ``val_gain`` / ``test_gain`` (minus No-FT's),
``seconds``, ``error`` (a run that output NaN: its scores empty).

Steps, in order:

    python bench/table.py --pilot                       # epochs E by the declared epochs_rule -> tables/pilot.json
    python bench/table.py --scenario cvtgan-3-5-d3      # the table at E -> tables/<scenario>.csv.gz + .json
    python bench/table.py --scenario cvtgan-3-5-d3 --priors   # every prior signal's scores -> <scenario>-priors.csv.gz
    python bench/table.py --scenario cvtgan-1-5 --quick --out-dir /tmp/lab   # a tiny table to try the path

The pilot trains, on the tuning scenarios the rule names (validation subjects only), the Table-1
rows at their middle rate and 6 sampled plans for 16 epochs, and picks E as the rule says; it also
projects the cost of one lab table at E from its own seconds per pair-epoch. A lab table is not
built without ``tables/pilot.json``; a ``confirm`` scenario is never tabulated.

Runs go two at a time (``--workers``, one torch thread each), each into its own JSON file of the
work folder, written atomically: interrupted (Ctrl-C), the same command goes on where it stopped,
losing at most the runs in flight. ``--priors`` scores through the signal registry
(``autopeft.search.signals.prior_for``; ``gradient`` and ``audit`` probe and briefly train, their
scores cached by the library) and charges each signal its own cost (seconds, and the prior's
``.cost`` in pair-epochs) in ``<scenario>-priors.json``.

PSNR: peak 1 on [0, 1]-scaled volumes; comparable only within one scenario.
"""

from __future__ import annotations

import argparse
import json
import warnings
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `backbones` is a top-level package of the repository
sys.path.insert(0, str(ROOT / "bench"))

from _lab import (TABLES, code_version, curve_columns, load_declared, machine, plan_id,  # noqa: E402
                  scenario as declared_scenario)

WORK = TABLES / "work"
PILOT_FILE = TABLES / "pilot.json"
# The declared epochs_rule (bench/scenarios.yaml, table.epochs_rule) in numbers; a test checks
# that each appears in the rule's text, so that the two cannot drift apart silently.
PILOT = {"scenarios": ("cvtgan-2-4-d1", "unetr-3-4-d2"), "epochs": 16, "candidates": (4, 6, 8, 12, 16), "ratio": 0.9,
         "sampled": 6, "max_hours": 2.5}
# --quick: enough plans to exercise every kind of row, at a size that runs in minutes on 2 cores.
# --quick also shrinks the data (4 subjects per scanner, 32 px) and its splits, to try the path in minutes.
QUICK = {"plans_per_space": 3, "epochs": 2, "ladders": (3,), "second_seed_plans": 0,
         "data": {"subjects": 4, "size": 32},
         "protocol": {"pretrain_train": 2, "pretrain_val": 1, "finetune_train": 1, "finetune_val": 1, "finetune_test": 1,
                      "folds": 1}}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default=None, help="a scenario declared in bench/scenarios.yaml (role tuning or lab).")
    parser.add_argument("--pilot", action="store_true", help="run the epochs pilot of the declared epochs_rule instead.")
    parser.add_argument("--priors", action="store_true", help="score the scenario's table with every prior signal "
                        "(autopeft.search.options.PRIOR_SIGNALS) into <scenario>-priors.csv.gz.")
    parser.add_argument("--signals", default=None, help="with --priors: comma-separated signals to score. Default: every "
                        "registered one (a lab table needs them all; fewer is for trying the path).")
    parser.add_argument("--quick", action="store_true", help=f"a tiny table for trying the path: {QUICK}; written to "
                        "--out-dir (a temporary folder unless given), never into bench/results.")
    parser.add_argument("--workers", type=int, default=2, help="runs at once, one torch thread each. Default: 2 (the CPU's cores).")
    parser.add_argument("--preset", default="tiny", help="backbone preset. Default: tiny (the scenarios are CPU ones).")
    parser.add_argument("--device", default="cpu", help="where to train. Default: cpu.")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="epochs of the source models. Default: the "
                        "preset's (the declared scenarios use it; a smaller value makes other source models, for tests).")
    parser.add_argument("--out-dir", type=Path, default=None, help=f"where the table goes. Default: {TABLES} "
                        "(a temporary folder with --quick).")
    parser.add_argument("--work", type=Path, default=None, help="the resumable work folder. Default: <out-dir>/work.")
    args = parser.parse_args(argv)
    if args.pilot == (args.scenario is not None):
        parser.error("give either --pilot or --scenario NAME (see bench/scenarios.yaml).")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, but got {args.workers}.")
    if args.quick and args.pilot:
        parser.error("--quick builds a tiny table of one --scenario; the pilot has no quick form.")
    if args.out_dir is None:
        args.out_dir = Path(tempfile.mkdtemp(prefix="autopeft-table-quick-")) if args.quick else TABLES
    args.out_dir = args.out_dir.expanduser().resolve()
    if args.quick and args.out_dir == TABLES.resolve():
        parser.error(f"--quick writes a throw-away table; give an --out-dir other than {TABLES}.")
    args.work = (args.work or args.out_dir / "work").expanduser().resolve()
    return args


# The scenario's evaluation -----------------------------------------------------------------------
class Evaluation:
    """A scenario's data, trial setup, backbone template, counter, budget and spaces."""

    def __init__(self, spec: dict[str, Any], *, preset: str, device: str, epochs: int, budget: str,
                 pretrain_epochs: int | None = None, data: bool = True, data_args: dict[str, int] | None = None,
                 protocol: dict[str, int] | None = None) -> None:
        from autopeft.data.simulator import builtin_data
        from autopeft.search.budget import Budget, PlanCounter
        from autopeft.search.space import load_space
        from autopeft.runner.trial import setup_from_config
        from autopeft.backbones import build_backbone

        self.spec, self.epochs = spec, int(epochs)
        # The data seed makes the scenario's data set (as bench/rediscovery.py sets it); the
        # evaluation seed (splits, source models) stays 0.
        # data=False: plans and counts only (the pilot's projection), no data set simulated for it.
        # data_args and protocol: the built-in data's size and splits when not the defaults (--quick).
        self.manifest = str(builtin_data(seed=int(spec["data_seed"]), progress=True, **(data_args or {}))) if data else ""
        self.setup = setup_from_config({"backbone": spec["backbone"], "preset": preset, "scanners": spec["scanners"],
                                        "folds": 1, "epochs": self.epochs, "seed": 0, "device": device,
                                        "pretrain_epochs": pretrain_epochs, "protocol": protocol},
                                       manifest_path=self.manifest, threads=1)
        self.template = build_backbone(spec["backbone"], preset)
        self.counter = PlanCounter(self.template)
        self.budget_text = budget
        self.budget = Budget.parse(budget)
        sites = self.template.sites()
        self.spaces = {"grouped": load_space(spec["backbone"], sites), "blocks": load_space(f"{spec['backbone']}-blocks", sites)}

    def key(self) -> str:
        """What makes a run's scores: the source models' cache keys (data, pre-training), the pairs,
        epochs and device. The work folder is named by it, so another evaluation never reuses rows."""
        import hashlib

        sources = sorted(spec.key() for spec in self.setup.source_specs().values())
        text = json.dumps({"sources": sources, "pairs": self.setup.pairs, "epochs": self.epochs, "device": self.setup.device})
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]

    def count(self, plan) -> dict[str, Any]:
        c = self.counter.count(plan)
        return {"trainable": int(c.trainable), "fraction": float(c.fraction),
                "feasible": bool(self.budget.allows(c.trainable, c.total))}

    def prepare_sources(self, seeds: Sequence[int], need_importance: bool) -> None:
        """Every source model (pre-trained once, into the cache) and, when some plan needs them,
        the SH-PEFT importance maps of every pair and seed, before the workers start: two workers
        would otherwise compute the same missing file twice."""
        from autopeft.finetuning import target_importance
        from autopeft.runner.trial import source_model

        for source, fold in self.setup.sources:
            source_model(self.setup, source, fold, progress=True)
        if need_importance:
            for s, t, f in self.setup.units:
                for seed in seeds:
                    target_importance(self.setup.job(s, t, f, train_seed=seed))


# The plans ---------------------------------------------------------------------------------------
def _entry(ev: Evaluation, plan, *, kind: str, label: str, space: str = "", params: dict | None = None) -> dict[str, Any]:
    data = plan.to_dict()
    return {"plan_id": plan_id(data), "kind": kind, "label": label, "space": space, "plan": data,
            "params": dict(params or {}), "lr": float(plan.train.get("lr", 0.0) or 0.0), **ev.count(plan)}


def _frame_trial(space):
    """A finished trial that holds every parameter of ``space`` (no value that matters, never a
    plan of the table). Optuna's QMCSampler takes its search space from the first finished trial;
    with a conditional, define-by-run space that trial knows only the parameters its own methods
    drew, and every other parameter would be drawn at random (independent sampling). With this
    trial first, every parameter, conditional ones included, comes from the Sobol sequence."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    def dist(p):
        if p.kind == "categorical":
            from autopeft.search.space import _label

            return CategoricalDistribution([_label(c) for c in p.choices])
        if p.kind == "int":
            return IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        return FloatDistribution(p.low, p.high, log=p.log, step=p.step)

    distributions: dict[str, Any] = {}
    for group in space.groups:
        if len(group.options) > 1:
            distributions[f"{group.name}.method"] = CategoricalDistribution([o.method for o in group.options])
        for option in group.options:
            for p in option.params:
                if p.kind != "fixed":
                    distributions[f"{group.name}.{option.method}.{p.name}"] = dist(p)
    for name, p in (("bitfit", space.bitfit), ("lr", space.lr), ("shpeft_lambda", space.shpeft_lambda)):
        if p.kind != "fixed":
            distributions[name] = dist(p)
    params = {}
    for name, d in distributions.items():
        params[name] = d.choices[0] if isinstance(d, CategoricalDistribution) else d.low
    return optuna.trial.create_trial(params=params, distributions=distributions, value=0.0, user_attrs={"frame": True})


def sobol_plans(ev: Evaluation, space_name: str, n: int, *, max_draws_per_plan: int = 50) -> tuple[list[dict[str, Any]], int]:
    """The first ``n`` feasible, distinct plans of a scrambled Sobol sample of the space (seed 0),
    and how many draws were skipped (over the budget or repeated)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = ev.spaces[space_name]
    # QMCSampler is marked experimental; the declared sample names it, so its warning says nothing new.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.QMCSampler(seed=0, scramble=True))
    study.add_trial(_frame_trial(space))
    plans, seen, skipped = [], set(), 0
    while len(plans) < n:
        if skipped > max_draws_per_plan * n:
            raise SystemExit(f"{space.source}: {skipped} Sobol draws over the budget {ev.budget_text} or repeated for "
                             f"{len(plans)} feasible plans; the space hardly fits the budget (narrow it).")
        trial = study.ask()
        plan = space.suggest(trial, train={"epochs": ev.epochs})
        study.tell(trial, 0.0)
        entry = _entry(ev, plan, kind="sampled", label=f"{space_name}-{len(plans)}", space=space_name, params=trial.params)
        if not entry["feasible"] or entry["plan_id"] in seen:
            skipped += 1
            continue
        seen.add(entry["plan_id"])
        plans.append(entry)
    return plans, skipped


def table1_entries(ev: Evaluation, ladders: Sequence[int]) -> list[dict[str, Any]]:
    """Every Table-1 row at the union of the spaces' ``lr_values(steps)`` for each ladder, built as
    ``portfolio.portfolio`` builds its entries (so the replay's portfolio finds them by plan id);
    rows over the budget are kept, marked not feasible. ``middle``: the row at the middle rate of
    the first ladder (the engine's)."""
    from autopeft.search.budget import Budget
    from autopeft.search.portfolio import portfolio

    entries: dict[str, dict[str, Any]] = {}
    everything = Budget.parse("100%")
    first = sorted({lr for space in ev.spaces.values() for lr in space.lr_values(ladders[0])})
    middle = first[len(first) // 2]
    for space_name, space in ev.spaces.items():
        for steps in ladders:
            for e in portfolio(space, ev.counter, everything, train={"epochs": ev.epochs}, steps=steps):
                # The ladders share their centre, up to the last bit of a float (lr_ladder(.., 3)
                # and (.., 5) reach it by other arithmetic): one rate, the first ladder's value.
                if steps != ladders[0] and any(math.isclose(e.lr, lr, rel_tol=1e-9) for lr in first):
                    continue
                entry = _entry(ev, e.plan, kind="table1", label=e.label, space="", params={})
                entry["middle"] = e.lr == middle
                entries.setdefault(entry["plan_id"], entry)
    return list(entries.values())


def reference_entries(ev: Evaluation) -> list[dict[str, Any]]:
    """No-FT, and Full-FT at ``portfolio.full_ft_ladder`` of the preset's Full-FT rate."""
    from autopeft.peft import Plan, load_plan
    from autopeft.search.portfolio import full_ft_ladder

    backbone = ev.spec["backbone"]
    out = [_entry(ev, load_plan(f"{backbone}-noft"), kind="no-ft", label="No-FT")]
    full = load_plan(f"{backbone}-fullft").to_dict()
    for lr in full_ft_ladder(ev.template.preset.finetune.lr_full):
        plan = Plan.from_dict({**full, "train": {**full.get("train", {}), "epochs": ev.epochs, "lr": lr}})
        out.append(_entry(ev, plan, kind="full-ft", label=f"Full-FT lr={lr:.2g}"))
    return out


def needs_importance(entries: Sequence[dict[str, Any]]) -> bool:
    from autopeft.peft import Plan

    return any(Plan.from_dict(e["plan"]).needs_importance for e in entries)


# The runs ----------------------------------------------------------------------------------------
def task_file(work: Path, task: dict[str, Any]) -> Path:
    return work / "rows" / f"{task['plan_id']}-{task['source']}-{task['target']}-s{task['seed']}.json"


def tasks_for(ev: Evaluation, entries: Sequence[dict[str, Any]], splits: Sequence[str]) -> list[dict[str, Any]]:
    """One run per (plan, ordered pair, fine-tuning seed) of ``entries`` (their ``seeds``)."""
    return [{**{k: e[k] for k in ("plan_id", "plan", "kind", "label", "space", "params", "lr", "trainable", "fraction", "feasible")},
             "source": s, "target": t, "fold": f, "seed": seed, "epochs": ev.epochs, "splits": list(splits)}
            for e in entries for seed in e.get("seeds", (0,)) for s, t, f in ev.setup.units]


_WORKER: dict[str, Any] = {}


def _worker_init(setup, work: str, threads: int) -> None:
    import torch

    # Why processes and not Ray tasks: two runs on two cores need no cluster, object store or
    # dashboard (Ray's own processes would take CPU from the runs on this shared machine), and a
    # process pool dies with Ctrl-C. One torch thread each: two runs fill the two cores.
    torch.set_num_threads(threads)
    _WORKER.update(setup=setup, work=Path(work))


def run_one(task: dict[str, Any], setup=None, work: Path | None = None) -> dict[str, Any]:
    """Train and score one (plan, pair, seed); its row is written atomically to the work folder."""
    from autopeft._io import atomic_write_json
    from autopeft.evaluation import mean_scores
    from autopeft.finetuning import finetune_plan
    from autopeft.peft import Plan

    setup = setup if setup is not None else _WORKER["setup"]
    work = work if work is not None else _WORKER["work"]
    epochs = int(task["epochs"])
    plan = Plan.from_dict(task["plan"])
    job = setup.job(task["source"], task["target"], task["fold"], train_seed=task["seed"])
    started = time.perf_counter()
    row = {k: v for k, v in task.items() if k != "splits"}
    row["plan"], row["params"] = json.dumps(task["plan"], sort_keys=True), json.dumps(task["params"], sort_keys=True)
    try:
        _, result = finetune_plan(plan, job, splits=tuple(task["splits"]), score_epochs=range(1, epochs))
        scored = {h["epoch"]: h["psnr"] for h in result.history if "psnr" in h}
        final = float(result.metrics["psnr"])
        if not math.isfinite(final):
            raise FloatingPointError(f"validation PSNR {final}")
        # No-FT (nothing trains) has no history: its curve is its one score at every epoch.
        row.update({f"val_e{e}": float(scored.get(e, final)) for e in range(1, epochs)}, **{f"val_e{epochs}": final})
        row["val_psnr"] = final
        row["test_psnr"] = float(mean_scores(result.subjects["test"])["psnr"]) if "test" in task["splits"] else None
        row["error"] = ""
    except FloatingPointError as error:  # diverged: kept as a row without scores, never retried
        row.update({c: None for c in curve_columns(epochs)}, val_psnr=None, test_psnr=None, error=str(error))
    row["seconds"] = time.perf_counter() - started
    atomic_write_json(task_file(work, task), row)
    return row


def pending_tasks(tasks: Sequence[dict[str, Any]], work: Path) -> list[dict[str, Any]]:
    """The tasks whose row file is not in the work folder yet (a file is there only once written
    whole: atomic writes leave at most a ``.partial-*`` file, which does not count)."""
    return [t for t in tasks if not task_file(work, t).is_file()]


def run_tasks(tasks: list[dict[str, Any]], setup, work: Path, *, workers: int, what: str,
              runner: Callable[..., dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Every task's row: read from the work folder when done, trained otherwise (``workers`` at a
    time; 1: in this process, with ``runner``, :func:`run_one` by default), with done/total and an
    ETA printed after each run."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    import multiprocessing

    todo = pending_tasks(tasks, work)
    done = len(tasks) - len(todo)
    print(f"{what}: {len(tasks)} runs, {done} already in {work / 'rows'}, {len(todo)} to train with {workers} worker(s)",
          flush=True)
    started, finished = time.time(), 0

    def progress(row: dict[str, Any]) -> None:
        eta = (time.time() - started) / finished * (len(todo) - finished)
        score = "NaN" if row["val_psnr"] is None else f"val {row['val_psnr']:.3f}"
        print(f"  {done + finished}/{len(tasks)} {row['label']} {row['source']}->{row['target']} seed {row['seed']}: "
              f"{score}, {row['seconds']:.1f} s; ETA {eta / 60:.1f} min", flush=True)

    interrupted = (f"\ninterrupted: the finished runs are kept in {work / 'rows'}; run the same command again to go on.")
    if todo and workers == 1:
        try:
            for task in todo:
                row = (runner or run_one)(task, setup, work)
                finished += 1
                progress(row)
        except KeyboardInterrupt:
            raise SystemExit(interrupted)
    elif todo:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init, initargs=(setup, str(work), 1))
        try:
            queue = list(todo)
            pending = {pool.submit(run_one, queue.pop(0)) for _ in range(min(2 * workers, len(queue)))}
            while pending:
                ready, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in ready:
                    row = future.result()
                    finished += 1
                    if queue:
                        pending.add(pool.submit(run_one, queue.pop(0)))
                    progress(row)
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise SystemExit(interrupted)
        pool.shutdown()
    return [json.loads(task_file(work, t).read_text(encoding="utf-8")) for t in tasks]


def with_gains(rows: list[dict[str, Any]], epochs: int):
    """The rows as a DataFrame with No-FT's scores per pair and the gains over them."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    noft = frame[frame["kind"] == "no-ft"].groupby(["source", "target"])[["val_psnr", "test_psnr"]].mean()
    noft.columns = ["noft_val", "noft_test"]
    frame = frame.join(noft, on=["source", "target"])
    frame["val_gain"] = frame["val_psnr"] - frame["noft_val"]
    frame["test_gain"] = frame["test_psnr"] - frame["noft_test"]
    columns = ["plan_id", "kind", "label", "space", "lr", "seed", "source", "target", "fold", "epochs", "trainable",
               "fraction", "feasible", *curve_columns(epochs), "val_psnr", "test_psnr", "noft_val", "noft_test", "val_gain",
               "test_gain", "seconds", "error", "params", "plan"]
    return frame[columns].sort_values(["kind", "space", "plan_id", "seed", "source", "target"]).reset_index(drop=True)


def write_csv(path: Path, frame) -> None:
    from autopeft._io import atomic_write

    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False, compression="gzip", float_format="%.6g"))


# The pilot ---------------------------------------------------------------------------------------
def choose_epochs(curves: dict[str, list[list[float]]], *, full: int, candidates: Sequence[int], ratio: float) -> dict[str, Any]:
    """The declared rule on the pilot's curves: per backbone, the median over plans of
    gain(E) / gain(full) (gains over No-FT, validation, mean over pairs; ``curves[backbone]`` one
    list of gains after epochs 1 .. full per plan); E per backbone the smallest candidate with a
    median >= ``ratio``, and E the larger of the backbones'."""
    per = {}
    for backbone, plans in curves.items():
        medians = {}
        for e in candidates:
            ratios = [c[e - 1] / c[full - 1] for c in plans if c[full - 1] != 0]
            medians[e] = statistics.median(ratios) if ratios else float("nan")
        chosen = next((e for e in candidates if medians[e] >= ratio), candidates[-1])
        per[backbone] = {"median_ratio": medians, "epochs": chosen, "plans": len(plans),
                         "plans_not_gaining_at_full": sum(c[full - 1] <= 0 for c in plans)}
    return {"per_backbone": per, "epochs": max(p["epochs"] for p in per.values())}


def table_runs(rows: int, second_seed: int, pairs: int) -> int:
    """(plan, pair, seed) runs of one table."""
    return (rows + second_seed) * pairs


def project_seconds(runs: int, epochs: int, fixed: float, per_epoch: float, workers: int) -> float:
    """Wall seconds of ``runs`` runs of ``epochs`` epochs, ``workers`` at a time: each costs its
    fixed part (loading, scoring the held-out subjects at the end) and ``per_epoch`` per epoch
    (training and the epoch's validation scoring)."""
    return runs * (fixed + per_epoch * epochs) / workers


def cost_model(frame, epochs: int, test_share: float) -> dict[str, float]:
    """Per run: the fixed seconds and the seconds per epoch, from a pilot's rows (one scenario).

    A run that trains nothing (No-FT) costs the fixed part alone on validation subjects: it is the
    fixed part; the trained runs' remainder over their epochs is the per-epoch part (per pair,
    then averaged: the pairs' targets differ in size). A table also scores test subjects once,
    ``test_share`` = test / validation subjects times the validation scoring."""
    per_pair = []
    for _, rows in frame.groupby(["source", "target"]):
        fixed = float(rows.loc[rows["kind"] == "no-ft", "seconds"].mean())
        trained = rows[(rows["kind"] != "no-ft") & rows["error"].eq("")]
        per_pair.append((fixed, float(((trained["seconds"] - fixed) / epochs).mean())))
    fixed = statistics.mean(f for f, _ in per_pair)
    return {"fixed_seconds": fixed * (1 + test_share), "seconds_per_epoch": max(statistics.mean(e for _, e in per_pair), 0.0)}


def _table_size(ev: Evaluation, declared: dict[str, Any]) -> tuple[int, int]:
    """(plans, second-seed plans) of a lab table on ``ev``'s backbone (counted, not trained)."""
    rows = table1_entries(ev, declared["table"]["table1_ladders"])
    middle = sum(e["middle"] for e in rows)
    plans = 2 * int(declared["table"]["plans_per_space"]) + len(rows) + len(reference_entries(ev))
    return plans, int(declared["table"]["second_seed_plans"]) + middle


def pilot(args: argparse.Namespace, declared: dict[str, Any]) -> dict[str, Any]:
    wall = time.time()
    curves: dict[str, list[list[float]]] = {}
    timing: dict[str, list[dict[str, float]]] = {}
    per_scenario = {}
    for name in PILOT["scenarios"]:
        spec = declared_scenario(name, declared)
        if spec["role"] != "tuning":
            raise SystemExit(f"the pilot runs on tuning scenarios only, but {name} is {spec['role']} in bench/scenarios.yaml.")
        ev = Evaluation(spec, preset=args.preset, device=args.device, epochs=PILOT["epochs"], budget=declared["table"]["budget"])
        rows = [e for e in table1_entries(ev, declared["table"]["table1_ladders"]) if e["middle"]]
        sampled, _ = sobol_plans(ev, "grouped", PILOT["sampled"])
        entries = [*reference_entries(ev)[:1], *rows, *sampled]
        ev.prepare_sources([0], needs_importance(entries))
        work = args.work / f"pilot-{name}-{args.preset}-e{ev.epochs}-{ev.key()}"
        done = run_tasks(tasks_for(ev, entries, ("val",)), ev.setup, work, workers=args.workers, what=f"pilot {name}")
        frame = with_gains(done, ev.epochs)
        trained = frame[(frame["kind"] != "no-ft") & frame["error"].eq("")]
        gains = trained[curve_columns(ev.epochs)].sub(trained["noft_val"], axis=0)
        gains["plan_id"] = trained["plan_id"]
        mean = gains.groupby("plan_id").mean()
        curves.setdefault(spec["backbone"], []).extend(mean.values.tolist())
        protocol = ev.setup.protocol
        model = cost_model(frame, ev.epochs, protocol.finetune_test / protocol.finetune_val)
        timing.setdefault(spec["backbone"], []).append(model)
        per_scenario[name] = {"plans": int(mean.shape[0]), "labels": sorted(set(trained["label"])),
                              "curves": {pid: row.tolist() for pid, row in mean.iterrows()}, "cost_model": model}
    decision = choose_epochs(curves, full=PILOT["epochs"], candidates=PILOT["candidates"], ratio=PILOT["ratio"])
    epochs_by_rule = decision["epochs"]
    # The projection: the pilot's own seconds (a fixed part per run and a part per epoch, training
    # and the per-epoch validation scoring a table does too) times the runs of each lab table.
    projections = {}
    for name, spec in declared["scenarios"].items():
        if spec["role"] != "lab":
            continue
        spec = declared_scenario(name, declared)
        models = timing.get(spec["backbone"])
        if not models:
            continue
        fixed = statistics.mean(m["fixed_seconds"] for m in models)
        per_epoch = statistics.mean(m["seconds_per_epoch"] for m in models)
        ev = Evaluation(spec, preset=args.preset, device=args.device, epochs=PILOT["epochs"], budget=declared["table"]["budget"],
                        data=False)
        plans, second = _table_size(ev, declared)
        runs = table_runs(plans, second, len(ev.setup.units))
        projections[name] = {"runs": runs, "fixed_seconds": fixed, "seconds_per_epoch": per_epoch,
                             "hours_at": {e: project_seconds(runs, e, fixed, per_epoch, args.workers) / 3600
                                          for e in PILOT["candidates"]}}
    fits = [e for e in PILOT["candidates"]
            if e <= epochs_by_rule and all(p["hours_at"][e] <= PILOT["max_hours"] for p in projections.values())]
    epochs = epochs_by_rule if epochs_by_rule in fits else (max(fits) if fits else min(PILOT["candidates"]))
    result = {
        "benchmark": "table-pilot", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/table.py " + " ".join(sys.argv[1:]), "code_version": code_version(), "machine": machine(),
        "rule": declared["table"]["epochs_rule"], "settings": {**PILOT, "preset": args.preset, "workers": args.workers,
                                                             "split": "val"},
        "scenarios": per_scenario, "decision": decision, "epochs_by_rule": epochs_by_rule, "epochs": epochs,
        "capped_by_cost": epochs != epochs_by_rule, "projection": projections, "seconds": time.time() - wall,
    }
    from autopeft._io import atomic_write_json

    atomic_write_json(args.out_dir / "pilot.json", result, default=str)
    for backbone, p in decision["per_backbone"].items():
        print(f"{backbone}: median gain(E)/gain({PILOT['epochs']}) " + ", ".join(f"E={e}: {v:.2f}" for e, v in p["median_ratio"].items())
              + f" -> E={p['epochs']} ({p['plans']} plans)")
    for name, p in projections.items():
        print(f"{name}: {p['runs']} runs, projected {p['hours_at'][epochs]:.2f} h at E={epochs} with {args.workers} workers")
    print(f"E = {epochs}" + (f" (the rule said {epochs_by_rule}; capped by the projected cost)" if result["capped_by_cost"] else "")
          + f"; written {args.out_dir / 'pilot.json'}")
    return result


# The table ---------------------------------------------------------------------------------------
def table_epochs(args: argparse.Namespace) -> int:
    if args.quick:
        return QUICK["epochs"]
    path = args.out_dir / "pilot.json"
    if not path.is_file():
        raise SystemExit(f"no pilot result at {path}: a lab table's epochs come from the declared epochs_rule; run "
                         "`python bench/table.py --pilot` first.")
    return int(json.loads(path.read_text(encoding="utf-8"))["epochs"])


def plan_entries(ev: Evaluation, declared: dict[str, Any], quick: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every plan of the table with its fine-tuning seeds, and the counts."""
    table = declared["table"]
    per_space = QUICK["plans_per_space"] if quick else int(table["plans_per_space"])
    ladders = QUICK["ladders"] if quick else tuple(table["table1_ladders"])
    second = QUICK["second_seed_plans"] if quick else int(table["second_seed_plans"])
    sampled, skipped = [], {}
    for space_name in ev.spaces:
        plans, skipped[space_name] = sobol_plans(ev, space_name, per_space)
        sampled.extend(plans)
    rows = table1_entries(ev, ladders)
    references = reference_entries(ev)
    twice = {e["plan_id"] for e in random.Random(0).sample(sampled, min(second, len(sampled)))} if second else set()
    if second:
        twice |= {e["plan_id"] for e in rows if e["middle"]}
    entries = []
    for e in [*sampled, *rows, *references]:
        if e["plan_id"] in {x["plan_id"] for x in entries}:
            continue  # a sampled plan equal to a Table-1 row: trained once
        entries.append({**e, "seeds": (0, 1) if e["plan_id"] in twice else (0,)})
    counts = {"sampled": {s: sum(e["space"] == s for e in sampled) for s in ev.spaces}, "draws_skipped": skipped,
              "table1": len(rows), "table1_feasible": sum(e["feasible"] for e in rows), "references": len(references),
              "second_seed_plans": len(twice), "plans": len(entries)}
    return entries, counts


def build(args: argparse.Namespace, declared: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    wall = time.time()
    epochs = table_epochs(args)
    data_args, protocol = (QUICK["data"], QUICK["protocol"]) if args.quick else ({}, {})
    ev = Evaluation(spec, preset=args.preset, device=args.device, epochs=epochs, budget=declared["table"]["budget"],
                    pretrain_epochs=args.pretrain_epochs, data_args=data_args, protocol=protocol)
    entries, counts = plan_entries(ev, declared, args.quick)
    seeds = sorted({s for e in entries for s in e["seeds"]})
    ev.prepare_sources(seeds, needs_importance(entries))
    work = args.work / f"{spec['name']}-{args.preset}-e{epochs}{'-quick' if args.quick else ''}-{ev.key()}"
    tasks = tasks_for(ev, entries, ("val", "test"))
    rows = run_tasks(tasks, ev.setup, work, workers=args.workers, what=f"table {spec['name']}")
    frame = with_gains(rows, epochs)
    trained = frame[frame["kind"] != "no-ft"]
    out = args.out_dir / f"{spec['name']}.csv.gz"
    write_csv(out, frame)
    meta = {
        "benchmark": "lab-table", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/table.py " + " ".join(sys.argv[1:]), "code_version": code_version(), "machine": machine(),
        "scenario": spec, "quick": args.quick,
        "settings": {"preset": args.preset, "device": args.device, "pretrain_epochs": args.pretrain_epochs, "fold": 0,
                     "evaluation_seed": 0, "budget": ev.budget_text,
                     "pairs": [f"{s}->{t}" for s, t in ev.setup.pairs], "workers": args.workers, "torch_threads_per_worker": 1,
                     "manifest": ev.manifest, "data": data_args, "protocol": protocol, "spaces": {k: v.source for k, v in ev.spaces.items()}},
        "epochs": epochs, "epochs_from": "--quick" if args.quick else str(args.out_dir / "pilot.json"),
        "cost": {"seconds": float(frame["seconds"].sum()), "pair_epochs": int(len(trained) * epochs),
                 "seconds_per_pair_epoch": float(trained["seconds"].sum() / max(len(trained) * epochs, 1)),
                 # No-FT here scores validation and test subjects as every run does: no test share to add.
                 "per_run": cost_model(frame, epochs, 0.0)},
        "counts": {**counts, "rows": int(len(frame)), "diverged": int((frame["error"] != "").sum())},
        "wall_seconds_this_invocation": time.time() - wall, "files": {"table": out.name, "work": str(work)},
    }
    from autopeft._io import atomic_write_json

    atomic_write_json(args.out_dir / f"{spec['name']}.json", meta, default=str)
    size = out.stat().st_size / 2**20
    print(f"written {out} ({len(frame)} rows, {size:.2f} MB) and {spec['name']}.json; "
          f"{meta['cost']['seconds'] / 60:.1f} min of runs, {meta['cost']['pair_epochs']} pair-epochs")
    return meta


# The priors --------------------------------------------------------------------------------------
def signal_scorer(name: str, setup, template, counter, units: Sequence[tuple[str, str, int]]):
    """The prior of signal ``name`` over ``units`` (its pair-epochs spent: ``.cost``).

    ``autopeft.search.signals.prior_for`` on ``setup`` narrowed to ``units``' pairs and folds.
    The per-candidate signals (``gradient``, ``audit``) read their (site, method) candidates from
    the space: always the grouped one (``search_spaces/<backbone>.yaml``, as a search of it
    would), so that one prior, one cost and one cache serve the table's plans of both spaces. Per
    site the grouped spaces offer every method the per-block ones do, plus VPT in the encoder's
    transformer blocks, so no per-block plan trains a candidate the grouped prior did not score."""
    from dataclasses import replace

    from autopeft.search.signals import prior_for
    from autopeft.search.space import load_space

    sub = replace(setup, pairs=tuple(sorted({(s, t) for s, t, _ in units})), folds=tuple(sorted({f for _, _, f in units})))
    space = load_space(setup.backbone, template.sites())
    return prior_for(name, sub, template, counter, space)


def score_priors(args: argparse.Namespace, declared: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    import pandas as pd

    from autopeft.peft import Plan
    from autopeft.search.options import PRIOR_SIGNALS
    from autopeft.search.priors import CandidatePrior

    path = args.out_dir / f"{spec['name']}.csv.gz"
    meta_path = args.out_dir / f"{spec['name']}.json"
    if not path.is_file() or not meta_path.is_file():
        raise SystemExit(f"no table at {path}: build it first with `python bench/table.py --scenario {spec['name']}`.")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    table = pd.read_csv(path, dtype={"plan_id": str, "source": str, "target": str})
    plans = table.drop_duplicates("plan_id")[["plan_id", "plan"]]
    ev = Evaluation(spec, preset=meta["settings"]["preset"], device=args.device, epochs=int(meta["epochs"]),
                    budget=meta["settings"]["budget"], pretrain_epochs=meta["settings"].get("pretrain_epochs"),
                    data_args=meta["settings"].get("data"), protocol=meta["settings"].get("protocol"))
    groups = {f"{s}->{t}": [(s, t, f)] for s, t, f in ev.setup.units}
    groups["all"] = list(ev.setup.units)  # the search's prior: every pair's maps averaged
    frames, costs, notes = [], {}, {}
    chosen = tuple(x.strip() for x in args.signals.split(",") if x.strip()) if args.signals else PRIOR_SIGNALS
    unknown = [x for x in chosen if x not in PRIOR_SIGNALS]
    if unknown:
        raise SystemExit(f"--signals: {', '.join(unknown)} not among {', '.join(PRIOR_SIGNALS)}.")
    for signal in chosen:
        started, pair_epochs = time.perf_counter(), 0.0
        scored = {}
        for pair, units in groups.items():
            scorer = signal_scorer(signal, ev.setup, ev.template, ev.counter, units)
            if pair == "all":
                pair_epochs = float(scorer.cost)  # what a search on every pair pays (the per-pair ones filled the cache)
                # Per-candidate priors say which candidates went unscored (audit: VPT cannot be switched off).
                notes[signal] = list(scorer.notes) if isinstance(scorer, CandidatePrior) else []
            scored[pair] = [float(scorer.score(Plan.from_dict(json.loads(p)))) for p in plans["plan"]]
        costs[signal] = {"seconds": time.perf_counter() - started, "pair_epochs": pair_epochs}
        for pair, values in scored.items():
            frames.append(pd.DataFrame({"plan_id": plans["plan_id"].values, "pair": pair, "signal": signal, "score": values}))
        print(f"prior {signal}: {len(plans)} plans x {len(groups)} pair groups in {costs[signal]['seconds']:.1f} s", flush=True)
    long = pd.concat(frames, ignore_index=True)
    wide = long.pivot_table(index=["plan_id", "pair"], columns="signal", values="score").reset_index()
    out = args.out_dir / f"{spec['name']}-priors.csv.gz"
    write_csv(out, wide)
    result = {"scenario": spec["name"], "command": "python bench/table.py " + " ".join(sys.argv[1:]),
              "code_version": code_version(), "machine": machine(), "signals": list(chosen), "cost": costs,
              "cost_note": ("pair_epochs: the prior's own .cost (autopeft.search.signals) on every pair: shpeft and "
                            "sensitivity one gradient pass over one epoch per pair each (charged to both, although they "
                            "read the same maps), gradient one per method the grouped space offers and pair, audit "
                            "max(1, E // 4) training epochs per switchable method and pair, count and early none; "
                            "seconds: this invocation, scores already cached count their loading and the scoring only"),
              "candidate_space": f"search_spaces/{spec['backbone']}.yaml (grouped; gradient and audit candidates)",
              "notes": notes,
              "plans": int(len(plans)), "pairs": list(groups)}
    from autopeft._io import atomic_write_json

    atomic_write_json(args.out_dir / f"{spec['name']}-priors.json", result, default=str)
    print(f"written {out}")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    declared = load_declared()
    import torch

    torch.set_num_threads(1)
    if args.pilot:
        return pilot(args, declared)
    spec = declared_scenario(args.scenario, declared)
    if spec["role"] == "confirm":
        raise SystemExit(f"{spec['name']} is a `confirm` scenario in bench/scenarios.yaml: it is never tabulated, replayed or "
                         "searched while choosing (it is the held-out check). Choose a lab or tuning scenario.")
    if args.priors:
        return score_priors(args, declared, spec)
    return build(args, declared, spec)


if __name__ == "__main__":
    main()
