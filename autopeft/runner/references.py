"""The references every search measures, trained by the runner: No-FT, Full-FT at each rung of its
learning-rate ladder (the rung chosen on validation) and PETITE's plan as published, scored on the
validation subjects as trials are and kept in ``references.json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from autopeft._io import atomic_write_json
from autopeft.backbones import build_backbone
from autopeft.peft import Plan, load_plan, named_plans
from autopeft.runner.trial import run_plan, running_means, scores_from_json, scores_to_json
from autopeft.search.budget import PlanCounter
from autopeft.search.portfolio import full_ft_ladder

__all__ = ["reference_plans", "run_references"]


def reference_plans(backbone: str, preset: str, epochs: int) -> list[tuple[str, Any]]:
    """(label, plan) of the references every search measures: No-FT; Full-FT at each rung of
    its learning-rate ladder (:func:`~autopeft.search.portfolio.full_ft_ladder`; labelled
    ``Full-FT lr=...``, the best by validation becomes ``Full-FT``, see :func:`run_references`);
    PETITE's plan for the backbone (where one ships) as published, at the preset's PEFT rate."""
    schedule = build_backbone(backbone, preset).preset.finetune
    plans = [("No-FT", Plan.from_dict({"backbone": backbone, "name": "No-FT"}))]
    for lr in full_ft_ladder(schedule.lr_full):
        plans.append((f"Full-FT lr={lr:.2g}", Plan.from_dict({"backbone": backbone, "name": "Full-FT", "full_ft": True,
                                                            "train": {"epochs": epochs, "lr": lr}})))
    petite = f"petite-{backbone}"
    if petite in named_plans():
        plans.append(("PETITE", Plan.from_dict(dict(load_plan(petite).to_dict(), train={"epochs": epochs}))))
    return plans


def _reference_job(setup, plan_dict: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One reference on every pair, scored on validation subjects (a Ray task: one trial's CPUs)."""
    torch.set_num_threads(max(1, setup.threads))
    return scores_to_json(run_plan(setup.on_node(), Plan.from_dict(plan_dict)))


def run_references(setup, config, run_dir: Path, *, task_options: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Fine-tune the references (:func:`reference_plans`; No-FT alone without
    ``config.references``) on the search's pairs, in the driver, score them on the validation
    subjects (as trials are) and keep them in ``references.json`` (a resumed search reuses them).

    Full-FT is tuned as the search is: of its ladder, the rung with the best validation PSNR is
    the ``Full-FT`` reference (``chosen``), the others stay in the file as ``Full-FT lr=...``.
    """
    # Lazy: Ray is for the tasks below only; reference_plans (the confirmation's, bench/'s) and the
    # in-process path run without loading it.
    import ray

    counter = PlanCounter(build_backbone(setup.backbone, setup.preset))
    rows = []
    # No-FT always (only an evaluation: the baseline of the objective); the others when asked.
    wanted = reference_plans(setup.backbone, setup.preset, setup.epochs)
    wanted = wanted if config.references else wanted[:1]
    if config.progress:
        print(f"references {', '.join(label for label, _ in wanted)}: fine-tuning on {len(setup.units)} pair(s), "
              "scored on validation subjects", flush=True)
    if task_options is not None and ray.is_initialized():
        # Independent runs: Ray tasks side by side, as many at once as the trials' resources allow.
        task = ray.remote(**dict(task_options))(_reference_job)
        results = ray.get([task.remote(setup, plan.to_dict()) for _, plan in wanted])
    else:
        results = [scores_to_json(run_plan(setup, plan)) for _, plan in wanted]
    for (label, plan), pairs in zip(wanted, results):
        scores = scores_from_json(pairs)
        count = counter.count(plan)
        rows.append({"label": label, "plan": plan.to_dict(), "fraction": count.fraction if plan.trains_anything else 0.0,
                     "trainable": count.trainable if plan.trains_anything else 0, "split": "val",
                     "lr": (plan.train or {}).get("lr"), **running_means(scores), "pairs": scores_to_json(scores)})
    rungs = [row for row in rows if row["plan"].get("full_ft")]
    if rungs:
        chosen = max(rungs, key=lambda row: row["psnr"])  # chosen on validation, as the search chooses
        chosen.update(label="Full-FT", chosen=True)
        if config.progress:
            tried = ", ".join(f"{r['lr']:.2g}: {r['psnr']:.3f} dB" for r in rungs)
            print(f"reference Full-FT: lr {chosen['lr']:.2g} chosen on validation ({tried})", flush=True)
    atomic_write_json(run_dir / "references.json", rows)
    return rows
