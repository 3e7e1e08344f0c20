"""What a search leaves behind: results.csv, best_plan.yaml, Pareto plans, weights, the table.

``results.csv`` has one row per trial (number, state, fidelity reached, plan summary, % params,
PSNR/SSIM/NRMSE running means over the pairs done, prior, time, reason). Only FINISHED trials
(every pair done) compete for the best plan: a trial ASHA stopped early (STOPPED) carries means
over fewer pairs and is never read as a finished one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from autopeft._io import atomic_write, atomic_write_json
from autopeft.tables import print_table
from autopeft.runs import ranked_finished, records, weights_dir
from autopeft.stats import format_ci
from autopeft.runner.trial import run_plan, running_means, scores_from_json, scores_to_json

__all__ = ["plan_summary", "run_references", "finish_run", "pareto_front"]


def plan_summary(plan: Mapping[str, Any]) -> str:
    """A short text for a plan: ``encoder.vit.*=lora(rank=4,targets=q+k) decoder.*=ssf +bitfit``."""
    from autopeft.peft import registered_methods

    methods = registered_methods()
    parts = []
    for pattern, entry in (plan.get("sites") or {}).items():
        method = methods.get(entry["method"])  # a run may name a method this process lacks: show all
        shown = method.summary_fields if method is not None and method.summary_fields is not None else entry.keys()
        hyper = []
        for key in shown:
            value = entry.get(key)
            if key == "method" or value is None:
                continue
            hyper.append(f"{key}={'+'.join(map(str, value)) if isinstance(value, list) else value}")
        parts.append(f"{pattern}={entry['method']}" + (f"({','.join(hyper)})" if hyper else ""))
    if plan.get("full_ft"):
        parts.append("full")
    if plan.get("bitfit"):
        parts.append("+bitfit")
    text = " ".join(parts) or "frozen"
    lr = (plan.get("train") or {}).get("lr")
    return text + (f" lr={lr:.2g}" if lr else "")


def reference_plans(backbone: str, preset: str, epochs: int) -> list[tuple[str, Any]]:
    """(label, plan) of the references every search measures: No-FT; Full-FT at each rung of
    its learning-rate ladder (:func:`~autopeft.search.portfolio.full_ft_ladder`; labelled
    ``Full-FT lr=...``, the best by validation becomes ``Full-FT``, see :func:`run_references`);
    PETITE's plan for the backbone (where one ships) as published, at the preset's PEFT rate."""
    from autopeft.peft import Plan, load_plan, named_plans
    from autopeft.search.portfolio import full_ft_ladder
    from backbones import build_backbone

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
    import torch

    from autopeft.peft import Plan

    torch.set_num_threads(max(1, setup.threads))
    return scores_to_json(run_plan(setup.on_node(), Plan.from_dict(plan_dict)))


def run_references(setup, config, run_dir: Path, *, task_options: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Fine-tune the references (:func:`reference_plans`; No-FT alone without
    ``config.references``) on the search's pairs, in the driver, score them on the validation
    subjects (as trials are) and keep them in ``references.json`` (a resumed search reuses them).

    Full-FT is tuned as the search is: of its ladder, the rung with the best validation PSNR is
    the ``Full-FT`` reference (``chosen``), the others stay in the file as ``Full-FT lr=...``.
    """
    import ray

    from autopeft.search.budget import PlanCounter
    from backbones import build_backbone

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


def pareto_front(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Rows not dominated in (higher PSNR, lower fraction), by increasing fraction."""
    front = []
    for row in rows:
        dominated = any(
            other["psnr"] >= row["psnr"] and other["fraction"] <= row["fraction"]
            and (other["psnr"] > row["psnr"] or other["fraction"] < row["fraction"])
            for other in rows
        )
        if not dominated:
            front.append(row)
    return sorted(front, key=lambda r: r["fraction"])


def finish_run(run_dir: Path, setup, config, space, priors: bool) -> dict[str, Any]:
    """Write results.csv, best_plan.yaml, pareto/*.yaml, best_weights/ and summary.json.

    Everything here is chosen on validation scores. When the search confirms nothing
    (``config.confirm == 0``) the validation table is printed, marked in-sample; otherwise
    :func:`record_confirmation` prints the test table after the confirmation.
    """
    import pandas as pd

    from autopeft.peft import Plan

    trial_rows = records(run_dir)
    table = []
    for r in trial_rows:
        table.append({
            "number": r["number"], "state": r["state"], "fidelity": round(float(r.get("fidelity") or 0.0), 4),
            "pairs_done": r.get("pairs_done", 0), "pairs_total": r.get("pairs_total", 0),
            "epochs_done": r.get("epochs_done"), "plan": plan_summary(r["plan"]), "trainable": r.get("trainable"),
            "params_pct": round(100 * float(r.get("fraction") or 0.0), 4), "split": "val",
            "psnr": r.get("psnr"), "gain": r.get("gain"), "ssim": r.get("ssim"), "nrmse": r.get("nrmse"),
            "prior": r.get("prior"), "warm_start": r.get("warm_start", False), "portfolio": r.get("portfolio") or "",
            "seconds": round(float(r.get("seconds") or 0.0), 1), "reason": r.get("reason", ""),
        })
    frame = pd.DataFrame(table, columns=["number", "state", "fidelity", "pairs_done", "pairs_total", "epochs_done", "plan", "trainable",
                                         "params_pct", "split", "psnr", "gain", "ssim", "nrmse", "prior", "warm_start", "portfolio",
                                         "seconds", "reason"])
    atomic_write(run_dir / "results.csv", lambda tmp: frame.to_csv(tmp, index=False))
    finished = ranked_finished(trial_rows)
    summary: dict[str, Any] = {"finished": len(finished), "trials": len(trial_rows), "split": "val", "best": None, "pareto": []}
    slots = run_dir / "slots.json"
    if slots.is_file():  # per session: trial seconds over slots x wall time of the trial phase
        summary["slots"] = json.loads(slots.read_text(encoding="utf-8"))
    if finished:
        best = finished[0]
        summary["baseline"] = versus_baseline(finished)
        _write_best_plan(run_dir, setup, best, f"the best validation PSNR ({best['psnr']:.3f} dB) of {len(finished)} finished trials",
                         summary["baseline"])
        weights = weights_dir(run_dir, best["number"])
        if weights.is_dir():
            shutil.copytree(weights, run_dir / "best_weights", dirs_exist_ok=True)
        front = pareto_front(finished)
        (run_dir / "pareto").mkdir(exist_ok=True)
        for r in front:
            Plan.from_dict(dict(r["plan"], name=f"pareto-{r['number']}")).to_yaml(run_dir / "pareto" / f"plan-{r['number']:04d}.yaml")
        summary.update(best=best, pareto=front)
    if summary.get("baseline") and getattr(config, "progress", True):
        print(summary["baseline"]["text"], flush=True)
    if not getattr(config, "confirm", 0):
        _print_validation_table(run_dir, setup, summary)
    atomic_write_json(run_dir / "summary.json", summary, default=str)
    return summary


def versus_baseline(finished: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Whether the search beat its own best baseline on validation: the best plan against the
    best finished trial of the portfolio (a Table-1 row, lr tuned), in mean validation PSNR over
    every pair. None when no portfolio trial finished. ``finished`` ranked best first."""
    baseline = next((r for r in finished if r.get("portfolio")), None)
    if baseline is None:
        return None
    best = finished[0]
    margin = float(best["psnr"]) - float(baseline["psnr"])
    beat = best["number"] != baseline["number"] and margin > 0
    if beat:
        text = (f"The search beat its best Table-1 baseline on validation: #{best['number']} {best['psnr']:.3f} dB vs "
                f"#{baseline['number']} ({baseline['portfolio']}) {baseline['psnr']:.3f} dB, +{margin:.3f} dB (in-sample).")
    elif best["number"] == baseline["number"]:
        text = (f"The search did NOT beat its best Table-1 baseline on validation: the best plan is the baseline itself, "
                f"#{best['number']} ({baseline['portfolio']}), {best['psnr']:.3f} dB.")
    else:
        text = (f"The search did NOT beat its best Table-1 baseline on validation: #{best['number']} {best['psnr']:.3f} dB "
                f"ties #{baseline['number']} ({baseline['portfolio']}) at {baseline['psnr']:.3f} dB.")
    return {"number": baseline["number"], "label": baseline["portfolio"], "psnr": baseline["psnr"], "split": "val",
            "margin_db": margin, "beat": beat, "text": text}


def _write_best_plan(run_dir: Path, setup, best: Mapping[str, Any], why: str,
                     baseline: Mapping[str, Any] | None = None) -> None:
    from autopeft.peft import Plan

    versus = f"; {baseline['text']}" if baseline else "; no Table-1 baseline of the portfolio finished."
    plan = dict(best["plan"], name=f"best-{setup.backbone}",
                description=f"autopeft search {run_dir.name}: recommended trial #{best['number']}, chosen for {why}; "
                f"{100 * best['fraction']:.3f}% of the parameters{versus} Reproduce it with autopeft finetune --plan "
                f"{run_dir / 'best_plan.yaml'} --split val (fold and --seed {setup.seed} of the search)")
    Plan.from_dict(plan).to_yaml(run_dir / "best_plan.yaml")


def record_confirmation(run_dir: Path, setup, summary: dict[str, Any], confirmation: Mapping[str, Any]) -> None:
    """Add the confirmation to summary.json, say in best_plan.yaml which plan is recommended and
    why (with its confirmed test PSNR), and print the test table."""
    summary["confirmation"] = dict(confirmation)
    recommended = confirmation.get("recommended")
    if recommended is not None:
        best = next((r for r in records(run_dir) if r["number"] == recommended["number"]), None)
        if best is not None:
            _write_best_plan(run_dir, setup, best, f"{confirmation['why']}; confirmed on test subjects: PSNR "
                             f"{format_ci(recommended['test']['psnr'])} dB (mean [95% CI])", summary.get("baseline"))
    atomic_write_json(run_dir / "summary.json", summary, default=str)
    print(f"\n{setup.backbone}/{setup.preset}: TEST subjects (untouched by the search), {_units_text(setup, confirmation)}")
    print_table(confirmed_rows(confirmation), CONFIRMED_COLUMNS, left=("method", "plan"))
    print(f"mean [{confirmation['ci']}]; paired differences on the same subjects, p: {confirmation['test']}.")
    if recommended is not None:
        print(f"recommended: #{recommended['number']} ({confirmation['why']}); plan: {run_dir / 'best_plan.yaml'}")
        print(versus_baseline_text(confirmation))
    print(f"per-subject scores: {run_dir / 'confirmation.csv'}")


def versus_baseline_text(confirmation: Mapping[str, Any]) -> str:
    """What the search added over the best Table-1 row with its learning rate tuned, on test (the
    console and the report both show it)."""
    recommended, baseline = confirmation.get("recommended") or {}, confirmation.get("baseline")
    if baseline is None:
        return "no Table-1 row of the portfolio finished: nothing to compare the recommended plan with"
    if baseline["number"] == recommended.get("number"):
        return (f"the recommended plan IS the best Table-1 row, lr tuned ({baseline.get('portfolio')}): the search found "
                "nothing better on validation")
    diff = (recommended.get("vs_baseline") or {}).get("psnr")
    if not diff:
        return f"best Table-1 row, lr tuned: #{baseline['number']} ({baseline.get('portfolio')})"
    verdict = ("better" if diff["ci"][0] > 0 else "worse" if diff["ci"][1] < 0 else "no different, within the CI")
    return (f"recommended vs the best Table-1 row, lr tuned (#{baseline['number']} {baseline.get('portfolio')}), test "
            f"PSNR paired on the same subjects: {format_ci(diff)} dB, p={diff['p']:.2g}: {verdict}")


def _units_text(setup, confirmation: Mapping[str, Any]) -> str:
    pairs = ", ".join(f"{s}->{t}" for s, t in setup.pairs)
    return (f"pairs {pairs} x folds {', '.join(map(str, confirmation['folds']))} x fine-tuning seeds "
            f"{', '.join(map(str, confirmation['seeds']))}; {confirmation['subjects']} test subjects")


CONFIRMED_COLUMNS = {"method": "Method", "params": "% Param", "val_psnr": "val PSNR", "psnr": "test PSNR [95% CI]",
                     "ssim": "test SSIM", "nrmse": "test NRMSE", "vs_full": "vs Full-FT dB [CI] p",
                     "vs_petite": "vs PETITE dB [CI] p", "vs_baseline": "vs best Table-1 row dB [CI] p", "plan": "Plan"}
# How the references and the portfolio's best read in the tables: which are tuned, which are not.
_REFERENCE_NAMES = {"Full-FT": "Full-FT (lr tuned)", "PETITE": "PETITE (as published)"}
VALIDATION_COLUMNS = {"method": "Method", "params": "% Param", "psnr": "val PSNR", "ssim": "val SSIM",
                      "nrmse": "val NRMSE", "plan": "Plan"}


def confirmed_rows(confirmation: Mapping[str, Any]) -> list[dict[str, str]]:
    """Table-1 rows of the confirmation (test subjects): references first, then the confirmed plans
    best by validation first; the console and the report both show these."""

    def diff(entry: Mapping[str, Any], key: str) -> str:
        stat = (entry.get(key) or {}).get("psnr")
        if not stat:
            return "-"
        p = stat.get("p")
        return f"{format_ci(stat)} p={p:.2g}" if p is not None and p == p else format_ci(stat)

    recommended = (confirmation.get("recommended") or {}).get("number")
    plans = sorted(confirmation.get("plans") or [], key=lambda e: e["number"] is not None)
    rows = []
    for entry in plans:
        label = _REFERENCE_NAMES.get(entry["label"], entry["label"])
        if entry["number"] is not None:
            label = f"autopeft #{entry['number']}" + (" (recommended)" if entry["number"] == recommended else "")
            if entry.get("baseline"):
                label += f" = best Table-1 row, lr tuned: {entry.get('portfolio')}"
        rows.append({"method": label, "params": "-" if not entry.get("fraction") else f"{100 * entry['fraction']:.3f}%",
                     "val_psnr": f"{entry['val']['psnr']:.3f}" if entry.get("val") else "-",
                     "psnr": format_ci(entry["test"]["psnr"]), "ssim": format_ci(entry["test"]["ssim"], 4),
                     "nrmse": format_ci(entry["test"]["nrmse"], 4), "vs_full": diff(entry, "vs_Full-FT"),
                     "vs_petite": diff(entry, "vs_PETITE"), "vs_baseline": diff(entry, "vs_baseline"),
                     "plan": plan_summary(entry["plan"]) if entry["number"] is not None else ""})
    return rows


def validation_rows(references: Sequence[Mapping[str, Any]], finished: Sequence[Mapping[str, Any]],
                    best: Mapping[str, Any] | None) -> list[dict[str, str]]:
    """Table-1 rows on validation subjects: references, Pareto plans and the best plan (in-sample:
    these scores chose the plans); the console and the report both show these."""
    rows = [_row(ref["label"], ref["fraction"], ref, "-" if ref["label"] == "No-FT" else None) for ref in references]
    for r in pareto_front(finished):
        if best is None or r["number"] != best["number"]:
            rows.append(_row(f"Pareto #{r['number']}", r["fraction"], r, None, plan=plan_summary(r["plan"])))
    if best is not None:
        rows.append(_row(f"autopeft (best, #{best['number']})", best["fraction"], best, None, plan=plan_summary(best["plan"])))
    return rows


def _print_validation_table(run_dir: Path, setup, summary: Mapping[str, Any]) -> None:
    """PETITE's Table 1 layout on validation subjects, for a search that confirms nothing."""
    ref_path = run_dir / "references.json"
    references = json.loads(ref_path.read_text(encoding="utf-8")) if ref_path.is_file() else []
    rows = validation_rows(references, summary.get("pareto", []), summary.get("best"))
    states: dict[str, int] = {}
    for r in records(run_dir):
        states[r["state"]] = states.get(r["state"], 0) + 1
    print(f"\n{setup.backbone}/{setup.preset}: mean over {len(setup.units)} source->target pair(s) "
          f"({', '.join(f'{s}->{t}' for s, t in setup.pairs)}) on VALIDATION subjects of each target. In-sample: these "
          "scores chose the plans, so the best is biased upward; confirm on test subjects with --confirm K.")
    print("trials: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())))
    if rows:
        print_table(rows, VALIDATION_COLUMNS, left=("method", "plan"))
    print(f"results: {run_dir / 'results.csv'}" + (f"; best plan: {run_dir / 'best_plan.yaml'}" if summary.get("best") else ""))


def _row(label: str, fraction: float, metrics: Mapping[str, Any], params_text: str | None, plan: str = "") -> dict[str, Any]:
    return {"method": label, "params": params_text or f"{100 * fraction:.3f}%", "psnr": f"{metrics['psnr']:.3f}",
            "ssim": f"{metrics['ssim']:.4f}", "nrmse": f"{metrics['nrmse']:.4f}", "plan": plan}
