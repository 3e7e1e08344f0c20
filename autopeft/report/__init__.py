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
import os
import time
from pathlib import Path
from typing import Any

from autopeft.report._run import STATE_STYLE, RunData, load_run

__all__ = ["write_report", "load_run", "RunData"]

_VERSIONED = ("autopeft", "torch", "monai", "optuna", "ray", "plotly", "pandas")

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


def versions() -> dict[str, str]:
    """Installed versions of the packages a search depends on."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in _VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def _esc(text: Any) -> str:
    return html.escape(str(text))


def _figure_html(item, first: list[bool]) -> str:
    """A figure's <div> (plotly.js inline with the first figure only), or a note."""
    if isinstance(item, str):
        return f'<p class="note">{_esc(item)}</p>'
    include = "inline" if first[0] else False  # plotly.js once, inline: no script from the network
    first[0] = False
    return item.to_html(full_html=False, include_plotlyjs=include, config={"displaylogo": False, "responsive": True})


def _table1(run: RunData) -> str:
    """References, Pareto plans and the best plan, as in PETITE's Table 1."""
    import pandas as pd

    from autopeft.search.results import pareto_front, plan_summary

    rows = []
    for ref in run.references:
        rows.append({"Method": ref["label"], "% Param": "-" if ref["label"] == "No-FT" else f"{100 * ref['fraction']:.3f}",
                     "PSNR": ref["psnr"], "SSIM": ref["ssim"], "NRMSE": ref["nrmse"], "Plan": plan_summary(ref["plan"])})
    best = run.best
    for record in pareto_front(run.finished):
        label = f"autopeft best (#{record['number']})" if best and record["number"] == best["number"] else f"Pareto #{record['number']}"
        rows.append({"Method": label, "% Param": f"{100 * record['fraction']:.3f}", "PSNR": record["psnr"],
                     "SSIM": record["ssim"], "NRMSE": record["nrmse"], "Plan": plan_summary(record["plan"])})
    if not rows:
        return '<p class="note">No finished trial or reference row yet.</p>'
    frame = pd.DataFrame(rows)
    styler = (frame.style.format({"PSNR": "{:.3f}", "SSIM": "{:.4f}", "NRMSE": "{:.4f}"})
              .highlight_max(subset=["PSNR", "SSIM"], props="font-weight: bold")
              .highlight_min(subset=["NRMSE"], props="font-weight: bold").hide(axis="index"))
    return styler.to_html()


def _trials_table(run: RunData) -> str:
    import pandas as pd

    from autopeft.search.results import plan_summary

    if not run.records:
        return '<p class="note">No trial records (trials/) yet.</p>'
    rows = [{
        "#": r["number"], "state": r.get("state", "RUNNING"),
        "pairs": f"{r.get('pairs_done', 0)}/{r.get('pairs_total', 0)}",
        "% Param": 100 * float(r.get("fraction") or 0.0), "PSNR": r.get("psnr"), "SSIM": r.get("ssim"),
        "NRMSE": r.get("nrmse"), "prior": r.get("prior"), "warm start": "yes" if r.get("warm_start") else "",
        "seconds": float(r.get("seconds") or 0.0), "plan": plan_summary(r.get("plan") or {}), "reason": r.get("reason", ""),
    } for r in run.records]
    frame = pd.DataFrame(rows)
    colour = {state: style[1] for state, style in STATE_STYLE.items()}
    styler = (frame.style.format({"% Param": "{:.3f}", "PSNR": "{:.3f}", "SSIM": "{:.4f}", "NRMSE": "{:.4f}",
                                  "prior": "{:.3g}", "seconds": "{:.0f}"}, na_rep="-")
              .map(lambda s: f"color: {colour.get(s, '#222')}; font-weight: bold", subset=["state"]).hide(axis="index"))
    return styler.to_html()


def _settings(run: RunData) -> str:
    config = run.config
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in config.items())
    recorded = run.meta.get("versions")
    now = versions()
    lines = []
    for name in _VERSIONED:
        then = (recorded or {}).get(name)
        lines.append(f"<tr><th>{name}</th><td>{_esc(then or '-')}</td><td>{_esc(now[name])}</td></tr>")
    return (f"<p>Study <code>{_esc(run.meta.get('study_name', '?'))}</code> in <code>study.db</code>, "
            f"{run.meta.get('sessions', 1)} session(s). Browse it live with <code>autopeft dashboard {_esc(run.run_dir)}</code>.</p>"
            f"<table>{rows}</table><h3>Versions</h3><table><tr><th>package</th><th>at search time</th>"
            f"<th>at report time</th></tr>{''.join(lines)}</table>")


def write_report(run_dir: str | os.PathLike, *, out: str | os.PathLike | None = None, slices: bool = True) -> Path:
    """Write the run's report as one self-contained HTML file.

    Args:
        run_dir: a folder written by ``autopeft search``.
        out: where to write. Defaults to ``<run_dir>/report.html``.
        slices: draw example slices (loads the pre-trained source model from the cache and runs
            two whole-volume predictions). Defaults to True.

    Returns:
        The path written.

    Raises:
        ConfigError: ``run_dir`` is not a search's output.
    """
    from autopeft.report._figures import history_figure, importance_figure, pair_heatmap, pareto_figure

    run = load_run(run_dir)
    target = Path(out) if out is not None else run.run_dir / "report.html"
    config = run.config
    counts = run.state_counts()
    first = [True]
    sections: list[tuple[str, str, str]] = []  # (anchor, title, html)
    sections.append(("table", "Results (PETITE Table 1 layout)",
                     f"<p class='caption'>Means over {_pairs_text(run)} on the held-out subjects of each target; "
                     "PSNR with peak 1 on [0, 1] data, 3D SSIM, NRMSE = RMSE / target range. Only trials that ran every "
                     "pair compete; bold: best column value.</p>" + _table1(run)))
    sections.append(("history", "Optimisation history", _figure_html(history_figure(run), first)
                     + "<p class='caption'>Early-stopped trials show their mean over fewer pairs; failed and over-budget "
                     "trials have no score and sit at the bottom edge.</p>"))
    sections.append(("pareto", "Pareto front", _figure_html(pareto_figure(run), first)))
    sections.append(("importance", "Parameter importances", _figure_html(importance_figure(run), first)))
    sections.append(("pairs", "PSNR per scanner pair", _figure_html(pair_heatmap(run), first)))
    if slices:
        from autopeft.report._slices import slices_figure

        result = slices_figure(run)
        body = _figure_html(result, first) if isinstance(result, str) else (
            _figure_html(result[0], first) + f"<p class='caption'>{_esc(result[1])}</p>")
        sections.append(("slices", "Example slices", body))
    sections.append(("trials", "All trials", _trials_table(run)))
    sections.append(("settings", "Search settings and versions", _settings(run)))

    states = " ".join(f"<span style='color:{STATE_STYLE.get(s, ('', '#222'))[1]}'><b>{n}</b> {s.lower()}</span>"
                      for s, n in sorted(counts.items()))
    best = run.best
    best_text = (f"Best finished plan: trial #{best['number']}, PSNR {best['psnr']:.3f} dB with "
                 f"{100 * best['fraction']:.3f}% of the parameters trainable." if best else "No trial has finished every pair yet.")
    page = (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>autopeft report: {_esc(run.run_dir.name)}</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<h1>autopeft search report</h1><p class='sub'>{_esc(run.run_dir)} · {_esc(config.get('backbone'))}/"
        f"{_esc(config.get('preset'))} · budget {_esc(config.get('budget'))} · written {time.strftime('%Y-%m-%d %H:%M')}</p>"
        f"<p class='states'>Trials: {states or 'none yet'}</p><p><b>{_esc(best_text)}</b></p>"
        "<nav>" + "".join(f"<a href='#{a}'>{_esc(t)}</a>" for a, t, _ in sections) + "</nav>"
        + "".join(f"<section id='{a}'><h2>{_esc(t)}</h2>{body}</section>" for a, t, body in sections)
        + "</body></html>"
    )
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, target)  # atomic: a report being rewritten at the end of a search is never half there
    return target


def _pairs_text(run: RunData) -> str:
    """The pairs the scores average over: read from the scores themselves, else from the settings."""
    seen = {(p["source"], p["target"], p.get("fold", 0)) for row in run.references + run.finished for p in row.get("pairs") or []}
    if seen:
        folds = len({fold for _, _, fold in seen})
        pairs = sorted({f"{s}→{t}" for s, t, _ in seen})
        return f"{len(pairs)} source→target pair(s) ({', '.join(pairs)}) × {folds} fold(s)"
    scanners = [str(s) for s in run.config.get("scanners") or []]
    return f"{len(scanners) * (len(scanners) - 1)} source→target pair(s) of scanners {', '.join(scanners)}"
