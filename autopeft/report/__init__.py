"""The study report: one self-contained HTML file per search run (``<run>/report.html``).

It holds the results table in the form of PETITE's Table 1, the optimisation history, the Pareto
front of PSNR against % trainable parameters (No-FT, Full-FT and PETITE's plan marked), Optuna's
parameter importances, PSNR per scanner pair, example slices of the best plan, every trial with
its state (early-stopped and failed trials shown as such), and the settings and versions used.

Figures are plotly; plotly.js is embedded once, inline, so the file opens offline.

Example:
    >>> from autopeft.report import write_report
    >>> write_report("runs/unetr-20250101-120000")  # doctest: +SKIP
    PosixPath('runs/unetr-20250101-120000/report.html')
"""

from __future__ import annotations

import html
import json
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd

from autopeft._io import atomic_write_text
from autopeft.report._figures import history_figure, importance_figure, pair_heatmap, pareto_figure, selection_figure
from autopeft.report._results import (
    CONFIRMED_COLUMNS, VALIDATION_COLUMNS, SearchOutputs, confirmed_rows, plan_summary, validation_rows,
    versus_baseline_text,
)
from autopeft.report._run import STATE_STYLE, RunData, load_run
from autopeft.report._slices import slices_figure
from autopeft.runs import VERSIONED_PACKAGES, versions
from autopeft.stats import format_ci

__all__ = ["write_report", "load_run", "RunData", "SearchOutputs", "plan_summary"]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 16px 28px; color: #222; line-height: 1.45; }
h1 { margin-bottom: 4px; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 36px; }
.sub { color: #555; margin-top: 0; } .note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 8px 12px; }
.caption { color: #555; font-size: 0.92em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } nav a { margin-right: 14px; } .states span { margin-right: 14px; }
"""


def _esc(text: Any) -> str:
    return html.escape(str(text))


def _figure_html(item, first: list[bool]) -> str:
    """A figure's <div> (plotly.js inline with the first figure only), or a note."""
    if isinstance(item, str):
        return f'<p class="note">{_esc(item)}</p>'
    include = "inline" if first[0] else False  # plotly.js once, inline: no script from the network
    first[0] = False
    return item.to_html(full_html=False, include_plotlyjs=include, config={"displaylogo": False, "responsive": True})


def _rows_html(rows: list[dict[str, str]], columns: dict[str, str]) -> str:
    return pd.DataFrame(rows, columns=list(columns)).rename(columns=columns).to_html(index=False, escape=True, border=0)


def _table1(run: RunData) -> str:
    """PETITE's Table 1 layout: on test subjects with CIs when the run was confirmed, else on
    validation subjects (in-sample). One row builder serves this and the console."""
    if run.confirmation and run.confirmation.get("plans"):
        columns = {k: v for k, v in CONFIRMED_COLUMNS.items() if k not in ("vs_full", "vs_petite", "vs_baseline")}
        return _rows_html(confirmed_rows(run.confirmation), columns)
    rows = validation_rows(run.references, run.finished, run.best)
    if not rows:
        return '<p class="note">No finished trial or reference row yet.</p>'
    return _rows_html(rows, VALIDATION_COLUMNS)


def _confirmed(run: RunData) -> str:
    """The confirmation: test mean [95% CI] and paired differences against Full-FT, PETITE and the
    best Table-1 row with its learning rate tuned (the baseline portfolio's best)."""
    confirmation = run.confirmation
    if not confirmation or not confirmation.get("plans"):
        return ('<p class="note">This run has no confirmation on test subjects (searched with --confirm 0, or it was '
                'interrupted before it): every figure in this report is on validation subjects, the ones the search '
                'chose on, and so biased upward. Continue it with <code>autopeft search --resume RUN_DIR</code>.</p>')
    recommended = confirmation.get("recommended") or {}
    columns = {k: v for k, v in CONFIRMED_COLUMNS.items()
               if k in ("method", "params", "val_psnr", "psnr", "vs_full", "vs_petite", "vs_baseline")}
    versus = f"<p>{_esc(versus_baseline_text(confirmation))}.</p>" if recommended else ""
    return (f"<p class='caption'>Split: <b>test</b> subjects, read by nothing before this stage. Folds "
            f"{_esc(', '.join(map(str, confirmation['folds'])))} × fine-tuning seeds {_esc(', '.join(map(str, confirmation['seeds'])))}, "
            f"{confirmation['subjects']} test subjects (a cell per fold and subject of each target: its scores over sources and "
            f"seeds are averaged first). Mean [{_esc(confirmation['ci'])}]. Differences are paired on the same subjects; "
            f"p: {_esc(confirmation['test'])}. The validation PSNR column is what the search saw (in-sample).</p>"
            + _rows_html(confirmed_rows(confirmation), columns)
            + (f"<p><b>Recommended: trial #{recommended.get('number')}</b>: {_esc(confirmation.get('why', ''))}.</p>"
               if recommended else "") + versus)


def _trials_table(run: RunData) -> str:
    if not run.records:
        return '<p class="note">No trial records (trials/) yet.</p>'
    rows = [{
        "#": r["number"], "state": r.get("state", "RUNNING"),
        "pairs": f"{r.get('pairs_done', 0)}/{r.get('pairs_total', 0)}", "pair-epochs": r.get("epochs_done"),
        "% Param": 100 * float(r.get("fraction") or 0.0), "val PSNR": r.get("psnr"), "gain dB": r.get("gain"),
        "SSIM": r.get("ssim"),
        "NRMSE": r.get("nrmse"), "prior": r.get("prior"), "warm start": "yes" if r.get("warm_start") else "",
        "seconds": float(r.get("seconds") or 0.0), "plan": plan_summary(r.get("plan") or {}), "reason": r.get("reason", ""),
    } for r in run.records]
    frame = pd.DataFrame(rows)
    colour = {state: style[1] for state, style in STATE_STYLE.items()}
    styler = (frame.style.format({"% Param": "{:.3f}", "val PSNR": "{:.3f}", "gain dB": "{:+.3f}", "SSIM": "{:.4f}", "NRMSE": "{:.4f}",
                                  "prior": "{:.3g}", "seconds": "{:.0f}", "pair-epochs": "{:.0f}"}, na_rep="-")
              .map(lambda s: f"color: {colour.get(s, '#222')}; font-weight: bold", subset=["state"]).hide(axis="index"))
    return styler.to_html()


def _settings(run: RunData) -> str:
    config = run.config
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in config.items())
    recorded = run.meta.get("versions")
    now = versions()
    lines = []
    for name in VERSIONED_PACKAGES:
        then = (recorded or {}).get(name)
        lines.append(f"<tr><th>{name}</th><td>{_esc(then or '-')}</td><td>{_esc(now[name])}</td></tr>")
    slots_path = run.run_dir / "slots.json"
    slots = json.loads(slots_path.read_text(encoding="utf-8")) if slots_path.is_file() else []
    busy = "".join(f"<li>session {i + 1}: {100 * sl['busy_share']:.0f}% of {sl['concurrency']} slot(s) busy over a "
                   f"{sl['phase_seconds'] / 60:.1f}-minute trial phase</li>" for i, sl in enumerate(slots))
    return ((f"<p>Trial slots (trial seconds over slots × wall time of the trial phase):</p><ul>{busy}</ul>" if busy else "")
            + f"<p>Study <code>{_esc(run.meta.get('study_name', '?'))}</code> in <code>study.db</code>, "
            f"{run.meta.get('sessions', 1)} session(s). Browse it live with <code>autopeft dashboard {_esc(run.run_dir)}</code>.</p>"
            f"<table>{rows}</table><h3>Versions</h3><table><tr><th>package</th><th>at search time</th>"
            f"<th>at report time</th></tr>{''.join(lines)}</table>")


def write_report(run_dir: str | os.PathLike, *, out: str | os.PathLike | None = None, slices: bool = True) -> Path:
    """Write the run's report as one self-contained HTML file.

    Args:
        run_dir: a folder written by ``autopeft search``.
        out: where to write. Defaults to ``<run_dir>/report.html``.
        slices: show the example slices the search kept (``examples/``). Defaults to True.

    Returns:
        The path written.

    Raises:
        ConfigError: ``run_dir`` is not a search's output.
    """
    run = load_run(run_dir)
    target = Path(out) if out is not None else run.run_dir / "report.html"
    page = _page(run, _sections(run, slices=slices), _headline(run))
    atomic_write_text(target, page)  # a report being rewritten at the end of a search is never half there
    return target


def _sections(run: RunData, *, slices: bool) -> list[tuple[str, str, str]]:
    """The report's sections, in page order.

    Args:
        run: the run to report.
        slices: include the example slices.

    Returns:
        (anchor, title, html) of each section.
    """
    first = [True]
    sections: list[tuple[str, str, str]] = []  # (anchor, title, html)
    confirmed = bool(run.confirmation and run.confirmation.get("plans"))
    split_text = ("<b>test</b> subjects of each target (the confirmation), mean [95% CI]" if confirmed else
                  "<b>validation</b> subjects of each target: in-sample, these scores chose the plans")
    sections.append(("table", "Results (PETITE Table 1 layout)",
                     f"<p class='caption'>Means over {_pairs_text(run)} on the {split_text}; "
                     "PSNR with peak 1 on [0, 1] data, 3D SSIM, NRMSE = RMSE / target range. Only trials that ran every "
                     "pair compete.</p>" + _table1(run)))
    sections.append(("confirmed", "Confirmed on test subjects", _confirmed(run)))
    sections.append(("selection", "Validation against test", _figure_html(selection_figure(run), first)
                     + "<p class='caption'>Each confirmed plan's validation PSNR (what the search chose on) against its "
                     "test PSNR (mean and 95% CI). Validation and test are different subjects, so even plans nobody selected "
                     "(the references) sit off the diagonal; a searched plan lying further below it than the references "
                     "shows the selection bias of picking the best of many noisy validation scores.</p>"))
    sections.append(("history", "Optimisation history", _figure_html(history_figure(run), first)
                     + "<p class='caption'>Split: validation. Early-stopped trials show their mean over fewer pairs; failed "
                     "and over-budget trials have no score and sit at the bottom edge.</p>"))
    sections.append(("pareto", "Pareto front", _figure_html(pareto_figure(run), first)
                     + "<p class='caption'>Split: validation (in-sample).</p>"))
    sections.append(("importance", "Parameter importances", _figure_html(importance_figure(run), first)
                     + "<p class='caption'>Split: validation.</p>"))
    sections.append(("pairs", "PSNR per scanner pair", _figure_html(pair_heatmap(run), first)
                     + "<p class='caption'>Split: validation.</p>"))
    if slices:
        result = slices_figure(run)
        body = _figure_html(result, first) if isinstance(result, str) else (
            _figure_html(result[0], first) + f"<p class='caption'>{_esc(result[1])}</p>")
        sections.append(("slices", "Example slices", body))
    sections.append(("trials", "All trials", _trials_table(run)))
    sections.append(("settings", "Search settings and versions", _settings(run)))
    return sections


def _headline(run: RunData) -> str:
    """The one-line verdict under the title: the confirmed recommendation, else the best validation plan.

    Args:
        run: the run to report.

    Returns:
        Plain text (escaped by the caller).
    """
    best = run.best
    recommended = (run.confirmation or {}).get("recommended")
    if recommended:
        gain = recommended["val"].get("gain")
        gain_text = f", gain over No-FT {gain:+.3f} dB: the study's objective value" if gain is not None else ""
        return (f"Recommended plan: trial #{recommended['number']}, test PSNR {format_ci(recommended['test']['psnr'])} dB "
                f"(mean [95% CI]; validation {recommended['val']['psnr']:.3f} dB{gain_text}) with "
                f"{100 * recommended['fraction']:.3f}% of the parameters trainable.")
    if best:
        gain_text = f", gain over No-FT {best['gain']:+.3f} dB" if best.get("gain") is not None else ""
        return (f"Best finished plan: trial #{best['number']}, validation PSNR {best['psnr']:.3f} dB{gain_text} (in-sample, "
                f"not confirmed on test subjects) with {100 * best['fraction']:.3f}% of the parameters trainable.")
    return "No trial has finished every pair yet."


def _page(run: RunData, sections: list[tuple[str, str, str]], headline: str) -> str:
    """The whole HTML page: header, trial counts, headline, navigation, then the sections.

    Args:
        run: the run to report.
        sections: (anchor, title, html) of each section, in page order.
        headline: the verdict line from `_headline`.

    Returns:
        The page's HTML.
    """
    config = run.config
    states = " ".join(f"<span style='color:{STATE_STYLE.get(s, ('', '#222'))[1]}'><b>{n}</b> {s.lower()}</span>"
                      for s, n in sorted(run.state_counts().items()))
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>autopeft report: {_esc(run.run_dir.name)}</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<h1>autopeft search report</h1><p class='sub'>{_esc(run.run_dir)} · {_esc(config.get('backbone'))}/"
        f"{_esc(config.get('preset'))} · budget {_esc(config.get('budget'))} · written {time.strftime('%Y-%m-%d %H:%M')}</p>"
        f"<p class='states'>Trials: {states or 'none yet'}</p><p><b>{_esc(headline)}</b></p>"
        "<nav>" + "".join(f"<a href='#{a}'>{_esc(t)}</a>" for a, t, _ in sections) + "</nav>"
        + "".join(f"<section id='{a}'><h2>{_esc(t)}</h2>{body}</section>" for a, t, body in sections)
        + "</body></html>"
    )


def _pairs_text(run: RunData) -> str:
    """The pairs the scores average over: read from the scores themselves, else from the settings."""
    seen = {(p["source"], p["target"], p.get("fold", 0)) for row in run.references + run.finished for p in row.get("pairs") or []}
    if seen:
        folds = len({fold for _, _, fold in seen})
        pairs = sorted({f"{s}→{t}" for s, t, _ in seen})
        return f"{len(pairs)} source→target pair(s) ({', '.join(pairs)}) × {folds} fold(s)"
    scanners = [str(s) for s in run.config.get("scanners") or []]
    return f"{len(scanners) * (len(scanners) - 1)} source→target pair(s) of scanners {', '.join(scanners)}"
