"""Confirmation on untouched test subjects: the last stage of every search.

Trials, the scheduler, the sampler, the priors and the choice of the best plan see only validation
subjects. Among many noisy validation scores the best is biased upward, so the search ends by
re-running, from scratch, the ``k`` best finished plans by validation PSNR and the references
(No-FT, Full-FT, PETITE's plan) on every pair x fold x fine-tuning seed, and scoring them on the
targets' *test* subjects, which nothing before this stage reads.

Reported for each plan: test PSNR / SSIM / NRMSE as mean and 95% CI over test subjects (a subject
is one unit: its scores over sources, folds and seeds are averaged first), and the paired
difference against Full-FT and PETITE's plan on the same subjects, with its CI and a Wilcoxon
signed-rank p-value (:mod:`autopeft.stats`). The recommended plan is the best of the ``k`` by
validation mean, and its test result is reported whatever it is.

Each (plan, fold, seed) is kept in ``<run>/confirmation/`` as soon as it is done, so a resumed
search runs only what is missing. Outputs: ``confirmation.csv`` (one row per plan x pair x fold x
seed x test subject), ``summary.json["confirmation"]`` and ``best_plan.yaml`` (which plan was
recommended, and why).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from autopeft._io import atomic_write, atomic_write_json, path_component, path_inside
from autopeft.backbones import build_backbone
from autopeft.peft import Plan
from autopeft.runner.references import reference_plans
from autopeft.runner.trial import TrialSetup, run_plan, scores_to_json
from autopeft.runs import ranked_finished, read_record, records
from autopeft.search.budget import PlanCounter
from autopeft.stats import GRID_CI_METHOD, TEST_METHOD, grid_mean_ci, paired_grid_difference

__all__ = ["confirmation_candidates", "confirmation_seeds", "run_confirmation", "confirmation_rows", "replay_check"]

METRICS = ("psnr", "ssim", "nrmse")


def confirmation_candidates(run_dir: Path, k: int, setup: TrialSetup) -> list[dict[str, Any]]:
    """The ``k`` best finished trials by validation (:func:`autopeft.runs.ranked_finished`, best
    first), the best finished trial of the baseline portfolio when it is not among them, then the
    references: No-FT, Full-FT (its learning rate chosen on validation) and PETITE's plan as
    published.

    Each candidate: ``{"label", "number" (None for references), "plan", "fraction", "val",
    "baseline"}`` (``val``: the validation means the search saw, None for references it did not
    measure; ``baseline``: the best Table-1 row with its learning rate tuned, the portfolio's best).
    """
    ranked = ranked_finished(records(run_dir))
    baseline = next((r for r in ranked if r.get("portfolio")), None)
    chosen = ranked[:k] + ([baseline] if baseline is not None and baseline not in ranked[:k] else [])
    candidates = [{"label": f"#{r['number']}", "number": r["number"], "plan": r["plan"], "fraction": r["fraction"],
                   "val": {**{m: r[m] for m in METRICS}, "gain": r.get("gain")}, "portfolio": r.get("portfolio"),
                   "baseline": r is baseline} for r in chosen]
    ref_path = run_dir / "references.json"
    measured = {row["label"]: row for row in json.loads(ref_path.read_text(encoding="utf-8"))} if ref_path.is_file() else {}
    counter = PlanCounter(build_backbone(setup.backbone, setup.preset))
    references = reference_plans(setup.backbone, setup.preset, setup.epochs)
    rungs = [plan for _, plan in references if plan.full_ft]
    for label, plan in references:
        if plan.full_ft:
            if plan is not rungs[len(rungs) // 2]:
                continue  # one Full-FT: the rung chosen on validation, else the middle one (the preset's rate)
            label = "Full-FT"
            if measured.get(label, {}).get("chosen"):
                plan = Plan.from_dict(measured[label]["plan"])
        row = measured.get(label)
        candidates.append({"label": label, "number": None, "plan": plan.to_dict(),
                           "fraction": counter.count(plan).fraction if plan.trains_anything else 0.0,
                           "val": {m: row[m] for m in METRICS} if row else None, "portfolio": None, "baseline": False})
    return candidates


def confirmation_seeds(search_seed: int, count: int) -> tuple[int, ...]:
    """``count`` fine-tuning seeds disjoint from the one every trial and reference of the search
    trained with (``search_seed``): the seeds after it."""
    return tuple(search_seed + 1 + i for i in range(count))


def replay_check(run_dir: Path, setup: TrialSetup, number: int) -> dict[str, Any] | None:
    """Re-run trial ``number`` exactly as the search ran it (its seed, fold 0, validation
    subjects) and compare with its record: a reproducibility check, kept out of every reported
    figure. None when the record has no fold-0 pair."""
    record = read_record(run_dir, number)
    recorded = {(p["source"], p["target"]): p["psnr"] for p in (record or {}).get("pairs") or [] if int(p.get("fold", 0)) == 0}
    if not recorded:
        return None
    scores = run_plan(replace(setup, folds=(0,)).on_node(), Plan.from_dict(record["plan"]), split="val")
    replayed = {(s.source, s.target): s.psnr for s in scores}
    diffs = [abs(replayed[pair] - psnr) for pair, psnr in recorded.items() if pair in replayed]
    return {"number": number, "split": "val", "fold": 0, "seed": setup.seed,
            "recorded_psnr": sum(recorded.values()) / len(recorded), "replayed_psnr": sum(replayed.values()) / len(replayed),
            "max_abs_diff_db": max(diffs) if diffs else None}


def _job_path(run_dir: Path, label: str, fold: int, seed: int) -> Path:
    # A label may come from a plan file: through path_component (the file keeps the label itself).
    slug = path_component(label.replace("#", "trial").replace(" ", "_"))
    path = run_dir / "confirmation" / f"{slug}-fold{fold}-seed{seed}.json"
    return path_inside(run_dir, path, what="a confirmation record")


def _confirm_job(setup: TrialSetup, plan_dict: Mapping[str, Any], fold: int, seed: int) -> list[dict[str, Any]]:
    """One plan on every pair of one fold with one fine-tuning seed, scored on test subjects."""
    torch.set_num_threads(max(1, setup.threads))
    scores = run_plan(replace(setup, folds=(fold,)).on_node(), Plan.from_dict(plan_dict), split="test", train_seed=seed)
    return scores_to_json(scores)


def run_confirmation(run_dir: Path, setup: TrialSetup, *, k: int, folds: Sequence[int], seeds: Sequence[int],
                     parallel: bool = False, task_options: Mapping[str, Any] | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """Confirm the ``k`` best plans and the references on test subjects; write the outputs.

    Args:
        run_dir: the search's run directory (trials/, references.json).
        setup: the search's trial set-up (its folds are replaced by ``folds``).
        k: finished plans to confirm, best by validation first.
        folds: folds to re-run on (their source models must be pre-trained).
        seeds: fine-tuning seeds, none of them one the search trained with (:func:`confirmation_seeds`):
            a winner's lucky seed must not carry into its test mean.
        parallel: run the jobs as Ray tasks, as many at once as the cluster's resources fit;
            else one after another in this process. Defaults to False.
        task_options: ``ray.remote`` options of one job (a trial's resources): what bounds how
            many run at once. Defaults to 1 CPU.
        progress: progress bar and one line per job.

    Returns:
        The ``confirmation`` summary (also in ``summary.json``).
    """
    candidates = confirmation_candidates(run_dir, k, setup)
    # The best baseline counts among the k best only when it is one of them.
    baseline = next((c["label"] for c in candidates if c["baseline"] and c not in candidates[:k]), None)
    jobs = []
    for candidate in candidates:
        plan_seeds = seeds[:1] if candidate["label"] == "No-FT" else seeds  # No-FT trains nothing: one seed is all
        jobs += [(candidate, fold, seed) for fold in folds for seed in plan_seeds]
    missing = [job for job in jobs if not _job_path(run_dir, job[0]["label"], job[1], job[2]).is_file()]
    started = time.time()
    if progress:
        searched = sum(c["number"] is not None and c["label"] != baseline for c in candidates)
        print(f"confirmation on test subjects: {searched} best plan(s) by validation"
              f"{' + the best Table-1 row, lr tuned (' + baseline + ')' if baseline else ''} + "
              f"{', '.join(c['label'] for c in candidates if c['number'] is None)}; folds "
              f"{', '.join(map(str, folds))} x fine-tuning seeds {', '.join(map(str, seeds))}: "
              f"{len(missing)} of {len(jobs)} runs to do", flush=True)

    def keep(job, pairs: list[dict[str, Any]], bar) -> None:
        candidate, fold, seed = job
        atomic_write_json(_job_path(run_dir, candidate["label"], fold, seed),
                          {"label": candidate["label"], "number": candidate["number"], "fold": fold, "seed": seed,
                           "pairs": pairs})
        bar.update(1)
        mean = sum(p["psnr"] for p in pairs) / len(pairs)
        bar.write(f"  [{(time.time() - started) / 60:4.1f} min] confirmed {candidate['label']} fold {fold} seed {seed}: "
                  f"test PSNR {mean:.3f} dB")

    with tqdm(total=len(missing), desc="confirm on test subjects", unit="run", disable=not progress) as bar:
        if parallel and len(missing) > 1:
            # Lazy: only this path needs Ray; the in-process one (--concurrency 1) and the module's
            # other users (confirmation_seeds in bench/) run without loading it.
            import ray

            from autopeft.runner._tasks import as_they_finish

            task = ray.remote(**dict(task_options or {"num_cpus": 1}))(_confirm_job)
            running = {task.remote(setup, job[0]["plan"], job[1], job[2]): job for job in missing}
            for job, result in as_they_finish(running, bar):  # each result kept as it arrives
                keep(job, result, bar)
        else:
            for job in missing:
                keep(job, _confirm_job(setup, job[0]["plan"], job[1], job[2]), bar)

    rows = confirmation_rows(run_dir)

    frame = pd.DataFrame(rows, columns=["label", "number", "split", "source", "target", "fold", "seed", "subject", *METRICS])
    atomic_write(run_dir / "confirmation.csv", lambda tmp: frame.to_csv(tmp, index=False))
    summary = summarise(frame, candidates, k=k, folds=folds, seeds=seeds)
    summary["seconds"] = round(time.time() - started, 1)
    return summary


def confirmation_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Every per-subject test score kept in ``<run>/confirmation/``."""
    rows = []
    for path in sorted((run_dir / "confirmation").glob("*.json")):
        job = json.loads(path.read_text(encoding="utf-8"))
        for pair in job["pairs"]:
            for subject in pair["subjects"]:
                rows.append({"label": job["label"], "number": job["number"], "split": pair.get("split", "test"),
                             "source": pair["source"], "target": pair["target"], "fold": job["fold"], "seed": job["seed"],
                             "subject": subject["subject"], **{m: subject[m] for m in METRICS}})
    return rows


def summarise(frame, candidates: Sequence[Mapping[str, Any]], *, k: int, folds: Sequence[int],
              seeds: Sequence[int]) -> dict[str, Any]:
    """Per plan: test mean and CI per metric, paired differences against Full-FT, PETITE and the
    best Table-1 row with its learning rate tuned (``vs_baseline``), all on the same subjects.

    A unit is one (target, subject): its scores over sources and seeds are averaged per fold; the
    CIs resample folds, then units (:func:`autopeft.stats.grid_mean_ci`), so that they carry the
    fold-to-fold variance as well as the subject-to-subject one.
    """
    cells = frame.groupby(["label", "fold", "target", "subject"], sort=True)[list(METRICS)].mean()
    grids = {label: {m: cells.xs(label, level="label")[m].unstack(["target", "subject"]) for m in METRICS}
             for label in cells.index.get_level_values("label").unique()}
    baseline = next((c["label"] for c in candidates if c.get("baseline")), None)
    plans = []
    for candidate in candidates:
        label = candidate["label"]
        if label not in grids:
            continue
        grid = grids[label]
        entry = {"label": label, "number": candidate["number"], "plan": candidate["plan"], "fraction": candidate["fraction"],
                 "val": candidate["val"], "portfolio": candidate.get("portfolio"), "baseline": bool(candidate.get("baseline")),
                 "test": {m: grid_mean_ci(grid[m].dropna(axis=1).to_numpy()) for m in METRICS}}
        for key, reference in (("vs_Full-FT", "Full-FT"), ("vs_PETITE", "PETITE"), ("vs_baseline", baseline)):
            if reference in grids and reference != label:
                entry[key] = {m: paired_grid_difference(*_aligned(grid[m], grids[reference][m])) for m in METRICS}
        plans.append(entry)
    searched = [p for p in plans if p["number"] is not None]
    recommended = searched[0] if searched else None  # candidates come best-by-validation first
    return {"split": "test", "k": k, "folds": list(folds), "seeds": list(seeds),
            "subjects": int(next(iter(grids.values()))["psnr"].shape[1]) if grids else 0,
            "ci": GRID_CI_METHOD, "test": TEST_METHOD, "plans": plans, "recommended": recommended,
            "baseline": next((p for p in plans if p["baseline"]), None),
            "why": (f"trial #{recommended['number']} has the best validation mean PSNR "
                    f"({recommended['val']['psnr']:.3f} dB) of every finished trial; "
                    "its test result is reported whatever it is") if recommended else "no finished trial to confirm"}


def _aligned(grid, reference):
    """Two folds x units tables cut to the folds and units both have, in the same order."""
    rows = grid.index.intersection(reference.index)
    columns = grid.columns.intersection(reference.columns)
    both = [grid.loc[rows, columns], reference.loc[rows, columns]]
    complete = both[0].notna().all() & both[1].notna().all()
    return tuple(t.loc[:, complete].to_numpy() for t in both)
