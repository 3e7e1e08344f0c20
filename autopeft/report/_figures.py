"""The report's plotly figures: optimisation history, Pareto front, importances, pair heatmap.

Each function returns a ``plotly.graph_objects.Figure``, or a plain-text note when the run holds
too little to draw it (the report prints the note in the figure's place).
"""

from __future__ import annotations

import warnings
from typing import Any

import optuna
import plotly.graph_objects as go

from autopeft.report._results import pareto_front, plan_summary
from autopeft.report._run import STATE_STYLE, RunData

# Legend under the plot: above it, it collides with the title.
_LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=50, b=40), height=440,
               legend=dict(orientation="h", yanchor="top", y=-0.16, x=0))


def _state_traces(rows: list[dict[str, Any]], x_of, y_of, floor: float | None):
    """One scatter trace per trial state (so the legend names each state); trials without a
    score (failed, over budget) are drawn at ``floor`` so they stay visible."""
    traces = []
    for state, (label, colour, symbol) in STATE_STYLE.items():
        group = [r for r in rows if r.get("state") == state]
        if not group:
            continue
        scored = [r for r in group if r.get("psnr") is not None]
        unscored = [r for r in group if r.get("psnr") is None]
        shown = scored + (unscored if floor is not None else [])
        if not shown:
            continue
        hover = [
            f"#{r['number']} {state.lower()}<br>{plan_summary(r.get('plan') or {})}<br>"
            f"{100 * float(r.get('fraction') or 0):.3f}% params, pairs {r.get('pairs_done', 0)}/{r.get('pairs_total', 0)}"
            + (f"<br>PSNR {r['psnr']:.3f} dB" if r.get("psnr") is not None else "<br>no score (drawn at the floor)")
            + (f"<br>{str(r.get('reason'))[:120]}" if r.get("reason") else "")
            for r in shown
        ]
        traces.append(go.Scatter(
            x=[x_of(r) for r in shown], y=[y_of(r) if r.get("psnr") is not None else floor for r in shown],
            mode="markers", name=label, hovertext=hover, hoverinfo="text",
            marker=dict(color=colour, symbol=symbol, size=10, line=dict(width=2, color=colour)),
        ))
    return traces


def history_figure(run: RunData):
    """The objective of every trial by trial number, by state, with the best finished so far: the
    validation gain over No-FT (what the study optimises; a mean over some pairs estimates the mean
    over all, since trials start at different pairs), or PSNR for runs that recorded no gain."""
    if not run.records:
        return "No trial has run yet."
    scored = [r for r in run.records if r.get("psnr") is not None]
    key = "gain" if scored and all(r.get("gain") is not None for r in scored) else "psnr"
    values = [r[key] for r in scored]
    floor = (min(values) - 0.3) if values else None
    fig = go.Figure(_state_traces(run.records, lambda r: r["number"], lambda r: r[key], floor))
    best_x, best_y, best = [], [], None
    for record in sorted(run.records, key=lambda r: r["number"]):
        if record.get("state") == "FINISHED" and record.get(key) is not None:
            best = record[key] if best is None else max(best, record[key])
        if best is not None:
            best_x.append(record["number"])
            best_y.append(best)
    if best_x:
        fig.add_trace(go.Scatter(x=best_x, y=best_y, mode="lines", line=dict(shape="hv", color="#1f77b4", width=2),
                                 name="best finished so far", hoverinfo="skip"))
    title = ("validation PSNR gain over No-FT (dB), mean over pairs done" if key == "gain"
             else "validation PSNR (dB), mean over pairs done")
    fig.update_layout(title="Optimisation history", xaxis_title="trial number", yaxis_title=title, **_LAYOUT)
    return fig


def pareto_figure(run: RunData):
    """PSNR against % trainable parameters (log axis): every trial by state, the front of the
    finished trials, PETITE's plan as a star, No-FT and Full-FT as horizontal lines (No-FT trains
    nothing, so it has no place on a log axis)."""
    pct = lambda r: max(100 * float(r.get("fraction") or 0.0), 1e-6)  # noqa: E731  (log axis: no zeros)
    scored = [r for r in run.records if r.get("psnr") is not None and r.get("fraction")]
    if not scored and not run.references:
        return "No scored trial or reference yet."
    fig = go.Figure(_state_traces(scored, pct, lambda r: r["psnr"], None))
    front = pareto_front(run.finished)
    if front:
        fig.add_trace(go.Scatter(x=[pct(r) for r in front], y=[r["psnr"] for r in front], mode="lines",
                                 line=dict(shape="hv", color="#1f77b4", dash="dot"), name="Pareto front (finished)",
                                 hoverinfo="skip"))
    for ref in run.references:
        if ref["label"] in ("No-FT", "Full-FT"):
            colour = "#555555" if ref["label"] == "No-FT" else "#2ca02c"
            fig.add_hline(y=ref["psnr"], line=dict(color=colour, dash="dash", width=1.5),
                          annotation_text=f"{ref['label']} {ref['psnr']:.3f} dB" + (" (100% params)" if ref["label"] == "Full-FT" else " (0%)"),
                          annotation_position="bottom right" if ref["label"] == "No-FT" else "top left")
        else:
            fig.add_trace(go.Scatter(x=[pct(ref)], y=[ref["psnr"]], mode="markers+text", text=[ref["label"]],
                                     textposition="top center", name=f"{ref['label']} plan",
                                     marker=dict(symbol="star", size=16, color="#e377c2", line=dict(width=1, color="#333"))))
    fig.update_layout(title="PSNR against trainable parameters", xaxis_title="% trainable parameters (log)",
                      yaxis_title="PSNR (dB)", **_LAYOUT)
    # Plotly labels log-axis minor ticks "2, 3, ..." without their decade: spell every tick out.
    ticks = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100]
    fig.update_xaxes(type="log", tickvals=ticks, ticktext=[f"{t:g}%" for t in ticks])
    return fig


def importance_figure(run: RunData, *, min_trials: int = 4):
    """Optuna's parameter importances over the *finished* trials (an early-stopped trial's value is
    a mean over fewer pairs, so it would blur what a parameter does)."""
    study = run.study()
    if study is None:
        return "No Optuna study (study.db) in the run directory."
    finished_numbers = {r["number"] for r in run.finished}
    trials = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
              if t.number in finished_numbers and t.params]
    if len(trials) < min_trials:
        return (f"Parameter importances need at least {min_trials} finished trials; this run has {len(trials)}. "
                "Run more trials (--trials, or --resume with a larger --trials) to see which choices matter.")
    # A copy of the study holding only the finished trials, single objective (PSNR).
    view = optuna.create_study(direction="maximize")
    view.add_trials([optuna.trial.create_trial(params=t.params, distributions=t.distributions, value=t.values[0])
                     for t in trials])
    try:
        with warnings.catch_warnings():
            # Conditional parameters seen in few trials make the evaluator warn per parameter; the
            # figure's title already gives the trial count, so the console stays quiet.
            warnings.simplefilter("ignore", UserWarning)
            importances = optuna.importance.get_param_importances(view)
    except (ValueError, RuntimeError) as err:  # e.g. every trial took the same values: nothing to rank
        return f"Parameter importances could not be computed over {len(trials)} finished trials: {err}"
    if not importances:
        return "Parameter importances are empty: no parameter varied across the finished trials."
    title = f"Parameter importances for the objective ({len(trials)} finished trials, Optuna default evaluator)"
    if len(importances) > GROUP_ABOVE:
        return _grouped_importances(importances, title)
    names = list(importances)[::-1]
    fig = go.Figure(go.Bar(x=[importances[n] for n in names], y=names, orientation="h", marker_color="#1f77b4",
                           hovertemplate="%{y}: %{x:.3f}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="importance (sums to 1)", **{**_LAYOUT, "height": max(260, 60 + 28 * len(names))})
    return fig


GROUP_ABOVE = 16  # more parameters than this (per-block spaces): one bar per block, split by method


def _grouped_importances(importances: dict[str, float], title: str):
    """One bar per block of the space (its method choice and its methods' hyperparameters, stacked
    by method), and one for the global choices (lr, BitFit, SH-PEFT lambda)."""
    parts: dict[str, dict[str, float]] = {}  # block -> segment -> importance
    for name, value in importances.items():
        if name.endswith(".method"):
            block, segment = name[: -len(".method")], "method choice"
        elif name.count(".") >= 2:
            block, method, _param = name.rsplit(".", 2)
            segment = f"{method} settings"
        else:
            block, segment = "(global)", name
        parts.setdefault(block, {})
        parts[block][segment] = parts[block].get(segment, 0.0) + value
    blocks = sorted(parts, key=lambda b: sum(parts[b].values()))
    segments = sorted({seg for block in parts.values() for seg in block})
    fig = go.Figure([go.Bar(name=seg, orientation="h", y=blocks, x=[parts[b].get(seg, 0.0) for b in blocks],
                            hovertemplate=f"%{{y}} / {seg}: %{{x:.3f}}<extra></extra>") for seg in segments])
    fig.update_layout(barmode="stack", title=title + ", grouped by block and method", xaxis_title="importance (sums to 1)",
                      **{**_LAYOUT, "height": max(300, 80 + 26 * len(blocks))})
    return fig


def pair_heatmap(run: RunData, *, top: int = 5):
    """PSNR per (source -> target, fold) for the references and the best finished plans."""
    rows: list[tuple[str, list[dict[str, Any]]]] = [(ref["label"], ref.get("pairs") or []) for ref in run.references]
    for record in run.finished[:top]:
        rows.append((f"trial #{record['number']}", record.get("pairs") or []))
    rows = [(label, pairs) for label, pairs in rows if pairs]
    if not rows:
        return "No per-pair scores yet (no finished trial or reference)."
    key = lambda p: f"{p['source']}→{p['target']}" + (f" f{p['fold']}" if p.get("fold") else "")  # noqa: E731
    columns = sorted({key(p) for _, pairs in rows for p in pairs})
    z = [[next((p["psnr"] for p in pairs if key(p) == c), None) for c in columns] for _, pairs in rows]
    text = [[f"{v:.2f}" if v is not None else "" for v in line] for line in z]
    fig = go.Figure(go.Heatmap(z=z, x=columns, y=[label for label, _ in rows], text=text, texttemplate="%{text}",
                               colorscale="Viridis", colorbar=dict(title="PSNR dB"),
                               hovertemplate="%{y}<br>%{x}: %{z:.3f} dB<extra></extra>"))
    fig.update_layout(title="PSNR per scanner pair (source→target; held-out subjects of the target)",
                      xaxis_title="scanner pair", **{**_LAYOUT, "height": max(260, 120 + 40 * len(rows))})
    fig.update_yaxes(autorange="reversed")
    return fig


def selection_figure(run: RunData):
    """Validation PSNR (what the search chose on) against confirmed test PSNR with its 95% CI, one
    point per confirmed plan and reference, and the diagonal: selection bias made visible."""
    plans = [p for p in ((run.confirmation or {}).get("plans") or []) if p.get("val")]
    if not plans:
        return "No confirmed plan with a validation score: the run has no confirmation on test subjects (--confirm 0)."
    fig = go.Figure()
    low = min(min(p["val"]["psnr"], p["test"]["psnr"]["mean"]) for p in plans) - 0.2
    high = max(max(p["val"]["psnr"], p["test"]["psnr"]["mean"]) for p in plans) + 0.2
    fig.add_trace(go.Scatter(x=[low, high], y=[low, high], mode="lines", name="test = validation",
                             line=dict(color="#999", dash="dash"), hoverinfo="skip"))
    for group, colour in (("searched", "#1f77b4"), ("reference", "#2ca02c")):
        chosen = [p for p in plans if (p["number"] is not None) == (group == "searched")]
        if not chosen:
            continue
        test = [p["test"]["psnr"] for p in chosen]
        fig.add_trace(go.Scatter(
            x=[p["val"]["psnr"] for p in chosen], y=[t["mean"] for t in test], mode="markers+text",
            text=[p["label"] for p in chosen], textposition="top center", name=f"{group} plans",
            marker=dict(color=colour, size=11),
            error_y=dict(type="data", symmetric=False, array=[t["ci"][1] - t["mean"] for t in test],
                         arrayminus=[t["mean"] - t["ci"][0] for t in test]),
            hovertext=[f"{p['label']}: validation {p['val']['psnr']:.3f} dB, test {t['mean']:.3f} "
                       f"[{t['ci'][0]:.3f}, {t['ci'][1]:.3f}] dB" for p, t in zip(chosen, test)], hoverinfo="text",
        ))
    fig.update_layout(title="Validation PSNR against test PSNR (confirmed plans)", xaxis_title="validation PSNR (dB), search",
                      yaxis_title="test PSNR (dB), confirmation, mean [95% CI]", **_LAYOUT)
    return fig
