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

from autopeft.search.trial import FINISHED, run_plan, records, scores_to_json

__all__ = ["plan_summary", "run_references", "finish_run", "pareto_front"]


def plan_summary(plan: Mapping[str, Any]) -> str:
    """A short text for a plan: ``encoder.vit.*=lora(rank=4,targets=q+k) decoder.*=ssf +bitfit``."""
    parts = []
    for pattern, entry in (plan.get("sites") or {}).items():
        hyper = []
        for key, value in entry.items():
            if key == "method" or value is None or key in ("dropout", "activation") or (key == "alpha"):
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


def run_references(setup, config, run_dir: Path) -> list[dict[str, Any]]:
    """Fine-tune No-FT, Full-FT and PETITE's plan for this backbone on the same pairs, in the
    driver, and keep them in ``references.json`` (a resumed search reuses them)."""
    import torch

    from autopeft.finetuning import FINETUNE_DEFAULTS
    from autopeft.peft import Plan, load_plan, named_plans
    from autopeft.search.budget import PlanCounter
    from backbones import build_backbone

    torch.set_num_threads(max(1, torch.get_num_threads()))
    defaults = FINETUNE_DEFAULTS.get(setup.preset, FINETUNE_DEFAULTS["paper"])
    plans = [("No-FT", Plan.from_dict({"backbone": setup.backbone, "train": {"lr": defaults["lr_peft"], "epochs": 0}})),
             ("Full-FT", Plan.from_dict({"backbone": setup.backbone, "full_ft": True, "train": {"lr": defaults["lr_full"], "epochs": setup.epochs}}))]
    petite = f"petite-{setup.backbone}"
    if petite in named_plans():
        base = load_plan(petite).to_dict()
        base["train"] = {"lr": defaults["lr_peft"], "epochs": setup.epochs}
        plans.append(("PETITE", Plan.from_dict(base)))
    counter = PlanCounter(build_backbone(setup.backbone, setup.preset))
    rows = []
    for label, plan in plans:
        if config.progress:
            print(f"reference {label}: fine-tuning on {len(setup.units)} pair(s)", flush=True)
        scores = run_plan(setup, plan)
        count = counter.count(plan)
        n = len(scores)
        rows.append({"label": label, "plan": plan.to_dict(), "fraction": count.fraction if label != "No-FT" else 0.0,
                     **{k: sum(getattr(s, k) for s in scores) / n for k in ("psnr", "ssim", "nrmse")},
                     "pairs": scores_to_json(scores)})
    (run_dir / "references.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
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
    """Write results.csv, best_plan.yaml, pareto/*.yaml and best_weights/, and print the table."""
    import pandas as pd

    from autopeft.peft import Plan

    trial_rows = records(run_dir)
    table = []
    for r in trial_rows:
        table.append({
            "number": r["number"], "state": r["state"], "fidelity": round(float(r.get("fidelity") or 0.0), 4),
            "pairs_done": r.get("pairs_done", 0), "pairs_total": r.get("pairs_total", 0),
            "plan": plan_summary(r["plan"]), "trainable": r.get("trainable"),
            "params_pct": round(100 * float(r.get("fraction") or 0.0), 4),
            "psnr": r.get("psnr"), "ssim": r.get("ssim"), "nrmse": r.get("nrmse"),
            "prior": r.get("prior"), "warm_start": r.get("warm_start", False),
            "seconds": round(float(r.get("seconds") or 0.0), 1), "reason": r.get("reason", ""),
        })
    pd.DataFrame(table, columns=["number", "state", "fidelity", "pairs_done", "pairs_total", "plan", "trainable", "params_pct",
                                 "psnr", "ssim", "nrmse", "prior", "warm_start", "seconds", "reason"]
                 ).to_csv(run_dir / "results.csv", index=False)
    finished = [r for r in trial_rows if r["state"] == FINISHED and r.get("psnr") is not None]
    summary: dict[str, Any] = {"finished": len(finished), "trials": len(trial_rows), "best": None, "pareto": []}
    if finished:
        best = max(finished, key=lambda r: r["psnr"])
        plan = dict(best["plan"], name=f"best-{setup.backbone}",
                    description=f"autopeft search {run_dir.name}, trial {best['number']}: PSNR {best['psnr']:.3f} dB, "
                    f"{100 * best['fraction']:.3f}% of the parameters, {best['pairs_done']} pair(s)")
        Plan.from_dict(plan).to_yaml(run_dir / "best_plan.yaml")
        weights = run_dir / "weights" / f"{best['number']:04d}"
        if weights.is_dir():
            shutil.copytree(weights, run_dir / "best_weights", dirs_exist_ok=True)
        front = pareto_front(finished)
        (run_dir / "pareto").mkdir(exist_ok=True)
        for r in front:
            Plan.from_dict(dict(r["plan"], name=f"pareto-{r['number']}")).to_yaml(run_dir / "pareto" / f"plan-{r['number']:04d}.yaml")
        summary.update(best=best, pareto=front)
    _print_table(run_dir, setup, summary)
    (run_dir / "summary.json").write_text(json.dumps({k: v for k, v in summary.items()}, indent=1, default=str), encoding="utf-8")
    return summary


def _print_table(run_dir: Path, setup, summary: Mapping[str, Any]) -> None:
    """PETITE's Table 1 layout: references beside the best plan found (and the Pareto plans)."""
    from autopeft.cli._common import print_table

    rows = []
    ref_path = run_dir / "references.json"
    references = json.loads(ref_path.read_text(encoding="utf-8")) if ref_path.is_file() else []
    for ref in references:
        rows.append(_row(ref["label"], ref["fraction"], ref, "-" if ref["label"] == "No-FT" else None))
    best = summary.get("best")
    for r in summary.get("pareto", []):
        if best is None or r["number"] != best["number"]:
            rows.append(_row(f"Pareto #{r['number']}", r["fraction"], r, None, plan=plan_summary(r["plan"])))
    if best is not None:
        rows.append(_row(f"autopeft (best, #{best['number']})", best["fraction"], best, None, plan=plan_summary(best["plan"])))
    states = {}
    for r in records(run_dir):
        states[r["state"]] = states.get(r["state"], 0) + 1
    print(f"\n{setup.backbone}/{setup.preset}: mean over {len(setup.units)} source->target pair(s) "
          f"({', '.join(f'{s}->{t}' for s, t in setup.pairs)}), held-out subjects of each target; PSNR peak 1 on [0,1] data")
    print("trials: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())))
    if rows:
        print_table(rows, {"method": "Method", "params": "% Param", "psnr": "PSNR", "ssim": "SSIM", "nrmse": "NRMSE", "plan": "Plan"}, left=("method", "plan"))
    print(f"results: {run_dir / 'results.csv'}" + (f"; best plan: {run_dir / 'best_plan.yaml'}" if best else ""))


def _row(label: str, fraction: float, metrics: Mapping[str, Any], params_text: str | None, plan: str = "") -> dict[str, Any]:
    return {"method": label, "params": params_text or f"{100 * fraction:.3f}%", "psnr": f"{metrics['psnr']:.3f}",
            "ssim": f"{metrics['ssim']:.4f}", "nrmse": f"{metrics['nrmse']:.4f}", "plan": plan}
