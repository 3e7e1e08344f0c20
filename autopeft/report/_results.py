"""What a search leaves behind: results.csv, best_plan.yaml, Pareto plans, weights, the table.

Written and printed at the end of a run from its records, through
:class:`~autopeft.runner.engine.RunOutputs` (:class:`SearchOutputs` here): the runner trains and
records, this module writes the results up; the report reads them back.

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

import pandas as pd

from autopeft._io import atomic_write, atomic_write_json
from autopeft.peft import Plan, registered_methods
from autopeft.runs import ranked_finished, records, weights_dir
from autopeft.stats import format_ci
from autopeft.tables import print_table

__all__ = ["plan_summary", "finish_run", "pareto_front", "record_confirmation", "SearchOutputs"]


def plan_summary(plan: Mapping[str, Any]) -> str:
    """A short text for a plan: ``encoder.vit.*=lora(rank=4,targets=q+k) decoder.*=ssf +bitfit``."""
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


def finish_run(run_dir: Path, setup, config, prior: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write results.csv, best_plan.yaml, pareto/*.yaml, best_weights/ and summary.json.

    ``prior`` (the prior signal and the pair-epochs it cost to make, None without priors) goes
    into summary.json, so that a comparison of searches can charge it.

    Everything here is chosen on validation scores. When the search confirms nothing
    (``config.confirm == 0``) the validation table is printed, marked in-sample; otherwise
    :func:`record_confirmation` prints the test table after the confirmation.
    """
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
    summary: dict[str, Any] = {"finished": len(finished), "trials": len(trial_rows), "split": "val", "best": None, "pareto": [],
                               "prior": dict(prior) if prior else None}
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


class SearchOutputs:
    """What a search writes and prints at its end, from its records: the report's side of
    :class:`autopeft.runner.RunOutputs`, handed to :func:`autopeft.runner.run_search` by its caller
    (the runner never imports the report).

    Example:
        >>> from autopeft.report import SearchOutputs
        >>> from autopeft.runner import run_search
        >>> run_search(config, outputs=SearchOutputs())  # doctest: +SKIP
    """

    def finish(self, run_dir: Path, setup, config, prior: Mapping[str, Any] | None) -> dict[str, Any]:
        """:func:`finish_run`: results.csv, best_plan.yaml, pareto/, best_weights/, summary.json."""
        return finish_run(run_dir, setup, config, prior)

    def confirmed(self, run_dir: Path, setup, summary: dict[str, Any], confirmation: Mapping[str, Any]) -> None:
        """:func:`record_confirmation`: the confirmation in summary.json and best_plan.yaml, the test table."""
        record_confirmation(run_dir, setup, summary, confirmation)

    def examples(self, run_dir: Path, setup, best: Mapping[str, Any] | None, *, split: str) -> bool:
        """:func:`~autopeft.report._examples.write_examples`: the report's example slices."""
        # Lazy: drawing the slices loads the training stack (runner.trial, MONAI); write_report,
        # which reads a run directory only, goes without it.
        from autopeft.report._examples import write_examples

        return write_examples(run_dir, setup, best, split=split)
