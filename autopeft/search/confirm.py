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
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from autopeft._io import atomic_write, atomic_write_json, path_component, path_inside
from autopeft.runs import FINISHED, records
from autopeft.search.trial import TrialSetup, run_plan, scores_to_json

__all__ = ["confirmation_candidates", "run_confirmation", "confirmation_rows"]

METRICS = ("psnr", "ssim", "nrmse")


def confirmation_candidates(run_dir: Path, k: int, setup: TrialSetup) -> list[dict[str, Any]]:
    """The ``k`` best finished trials by validation PSNR (best first), then the references.

    Each candidate: ``{"label", "number" (None for references), "plan", "fraction", "val"}``
    (``val``: the validation means the search saw; None for references it did not measure).
    """
    from autopeft.search.budget import PlanCounter
    from autopeft.search.results import reference_plans
    from backbones import build_backbone

    finished = sorted((r for r in records(run_dir) if r.get("state") == FINISHED and r.get("psnr") is not None),
                      key=lambda r: (-r["psnr"], r["number"]))
    candidates = [{"label": f"#{r['number']}", "number": r["number"], "plan": r["plan"], "fraction": r["fraction"],
                   "val": {**{m: r[m] for m in METRICS}, "gain": r.get("gain")}} for r in finished[:k]]
    ref_path = run_dir / "references.json"
    measured = {row["label"]: row for row in json.loads(ref_path.read_text(encoding="utf-8"))} if ref_path.is_file() else {}
    counter = PlanCounter(build_backbone(setup.backbone, setup.preset))
    for label, plan in reference_plans(setup.backbone, setup.epochs):
        row = measured.get(label)
        candidates.append({"label": label, "number": None, "plan": plan.to_dict(),
                           "fraction": counter.count(plan).fraction if plan.trains_anything else 0.0,
                           "val": {m: row[m] for m in METRICS} if row else None})
    return candidates


def _job_path(run_dir: Path, label: str, fold: int, seed: int) -> Path:
    # A label may come from a plan file: through path_component (the file keeps the label itself).
    slug = path_component(label.replace("#", "trial").replace(" ", "_"))
    path = run_dir / "confirmation" / f"{slug}-fold{fold}-seed{seed}.json"
    return path_inside(run_dir, path, what="a confirmation record")


def _confirm_job(setup: TrialSetup, plan_dict: Mapping[str, Any], fold: int, seed: int) -> list[dict[str, Any]]:
    """One plan on every pair of one fold with one fine-tuning seed, scored on test subjects."""
    import torch

    from autopeft.peft import Plan

    torch.set_num_threads(max(1, setup.threads))
    scores = run_plan(replace(setup, folds=(fold,)).on_node(), Plan.from_dict(plan_dict), split="test", train_seed=seed)
    return scores_to_json(scores)


def run_confirmation(run_dir: Path, setup: TrialSetup, *, k: int, folds: Sequence[int], seeds: Sequence[int],
                     concurrency: int = 1, task_options: Mapping[str, Any] | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """Confirm the ``k`` best plans and the references on test subjects; write the outputs.

    Args:
        run_dir: the search's run directory (trials/, references.json).
        setup: the search's trial set-up (its folds are replaced by ``folds``).
        k: finished plans to confirm, best by validation first.
        folds: folds to re-run on (their source models must be pre-trained).
        seeds: fine-tuning seeds; the first should be the search's (it reproduces the trials).
        concurrency: jobs at once (Ray tasks when above 1, else in this process).
        task_options: ``ray.remote`` options of one job (a trial's resources). Defaults to 1 CPU.
        progress: progress bar and one line per job.

    Returns:
        The ``confirmation`` summary (also in ``summary.json``).
    """
    from tqdm.auto import tqdm

    candidates = confirmation_candidates(run_dir, k, setup)
    jobs = []
    for candidate in candidates:
        plan_seeds = seeds[:1] if candidate["label"] == "No-FT" else seeds  # No-FT trains nothing: one seed is all
        jobs += [(candidate, fold, seed) for fold in folds for seed in plan_seeds]
    missing = [job for job in jobs if not _job_path(run_dir, job[0]["label"], job[1], job[2]).is_file()]
    started = time.time()
    if progress:
        print(f"confirmation on test subjects: {sum(c['number'] is not None for c in candidates)} best plan(s) by "
              f"validation + {', '.join(c['label'] for c in candidates if c['number'] is None)}; folds "
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
        if concurrency > 1 and len(missing) > 1:
            import ray

            task = ray.remote(**dict(task_options or {"num_cpus": 1}))(_confirm_job)
            waiting = list(missing)
            pending: dict[Any, tuple] = {}
            while waiting or pending:
                while waiting and len(pending) < concurrency:
                    job = waiting.pop(0)
                    pending[task.remote(setup, job[0]["plan"], job[1], job[2])] = job
                done, _ = ray.wait(list(pending), num_returns=1, timeout=5.0)
                bar.refresh()
                for ref in done:
                    keep(pending.pop(ref), ray.get(ref), bar)
        else:
            for job in missing:
                keep(job, _confirm_job(setup, job[0]["plan"], job[1], job[2]), bar)

    rows = confirmation_rows(run_dir)
    import pandas as pd

    frame = pd.DataFrame(rows, columns=["label", "number", "source", "target", "fold", "seed", "subject", *METRICS])
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
                rows.append({"label": job["label"], "number": job["number"], "source": pair["source"],
                             "target": pair["target"], "fold": job["fold"], "seed": job["seed"],
                             "subject": subject["subject"], **{m: subject[m] for m in METRICS}})
    return rows


def summarise(frame, candidates: Sequence[Mapping[str, Any]], *, k: int, folds: Sequence[int],
              seeds: Sequence[int]) -> dict[str, Any]:
    """Per plan: test mean and CI per metric, paired differences vs Full-FT and PETITE."""
    from autopeft.stats import CI_METHOD, TEST_METHOD, mean_ci, paired_difference

    # One unit per (target, subject): scores over sources, folds and seeds averaged first.
    units = frame.groupby(["label", "target", "subject"], sort=True)[list(METRICS)].mean()
    per_label = {label: units.xs(label, level="label") for label in units.index.get_level_values("label").unique()}
    plans = []
    for candidate in candidates:
        label = candidate["label"]
        if label not in per_label:
            continue
        table = per_label[label]
        entry = {"label": label, "number": candidate["number"], "plan": candidate["plan"], "fraction": candidate["fraction"],
                 "val": candidate["val"], "test": {m: mean_ci(table[m].to_numpy()) for m in METRICS}}
        for reference in ("Full-FT", "PETITE"):
            if reference in per_label and reference != label:
                other = per_label[reference]
                both = table.index.intersection(other.index)
                entry[f"vs_{reference}"] = {m: paired_difference(table.loc[both, m].to_numpy(), other.loc[both, m].to_numpy())
                                            for m in METRICS}
        plans.append(entry)
    searched = [p for p in plans if p["number"] is not None]
    recommended = searched[0] if searched else None  # candidates come best-by-validation first
    return {"split": "test", "k": k, "folds": list(folds), "seeds": list(seeds),
            "subjects": int(len(next(iter(per_label.values())))) if per_label else 0,
            "ci": CI_METHOD, "test": TEST_METHOD, "plans": plans, "recommended": recommended,
            "why": (f"trial #{recommended['number']} has the best validation mean PSNR "
                    f"({recommended['val']['psnr']:.3f} dB) of the {len(searched)} best finished plans confirmed; "
                    "its test result is reported whatever it is") if recommended else "no finished trial to confirm"}


def format_ci(stat: Mapping[str, Any] | None, digits: int = 3) -> str:
    """``35.123 [34.900, 35.310]``: the mean and its confidence interval (the mean alone when the
    interval is undefined)."""
    if not stat:
        return "-"
    low, high = stat["ci"]
    if any(math.isnan(v) for v in (low, high)):
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
