"""Example slices (PETITE's Fig. 4): short scan, long scan, predictions and error maps.

Drawn from what the search kept in ``<run>/examples/`` (:mod:`autopeft.report._examples` writes
them; their format and :func:`read_examples` are here): the report runs no model. The comparison is against No-FT (the pre-trained source model itself): the
search does not keep Full-FT weights (a whole model per pair).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from safetensors.torch import load_file

from autopeft.report._run import RunData

__all__ = ["slices_figure", "read_examples", "EXAMPLES_DIR", "SLICES_FILE", "SLICES_META"]

EXAMPLES_DIR = "examples"  # <run>/examples/: the planes (safetensors) and what they show (JSON)
SLICES_FILE, SLICES_META = "slices.safetensors", "slices.json"


def read_examples(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(planes as arrays, metadata) of the run's example slices, or None when it has none."""
    folder = Path(run_dir) / EXAMPLES_DIR
    if not (folder / SLICES_FILE).is_file() or not (folder / SLICES_META).is_file():
        return None
    planes = {name: t.numpy() for name, t in load_file(str(folder / SLICES_FILE)).items()}
    return planes, json.loads((folder / SLICES_META).read_text(encoding="utf-8"))


def slices_figure(run: RunData):
    """A 2 x 3 grid for one held-out subject of the best plan's first pair:
    top: short scan | No-FT prediction | best-plan prediction;
    bottom: long scan (target) | |No-FT - long| | |best - long|. Axial slice through the middle.

    Returns:
        ``(figure, caption)``, or a note (str) when the run holds no example slices.
    """
    found = read_examples(run.run_dir)
    if found is None:
        return ("No example slices: the run holds none (examples/). The search draws them at its end from the best "
                "plan's saved weights; a run with no finished trial, or one interrupted before its end, has none "
                "(continue it with autopeft search --resume RUN_DIR).")
    planes, meta = found
    short, long, no_ft, best_pred = (np.asarray(planes[k]) for k in ("short", "long", "no_ft", "best"))
    source, target, fold, number, split = meta["source"], meta["target"], meta["fold"], meta["number"], meta["split"]
    scores = meta["psnr"]
    error_max = float(max(np.abs(no_ft - long).max(), np.abs(best_pred - long).max(), 1e-6))
    panels = [
        (1, 1, f"short scan (scanner {target})", short, False),
        (1, 2, f"No-FT prediction, {scores['no_ft']:.2f} dB", no_ft, False),
        (1, 3, f"best plan #{number}, {scores['best']:.2f} dB", best_pred, False),
        (2, 1, "long scan (target)", long, False),
        (2, 2, "|No-FT − long|", np.abs(no_ft - long), True),
        (2, 3, f"|best #{number} − long|", np.abs(best_pred - long), True),
    ]
    fig = make_subplots(rows=2, cols=3, subplot_titles=[p[2] for p in panels], horizontal_spacing=0.04, vertical_spacing=0.08)
    for row, col, _title, tensor, is_error in panels:
        fig.add_trace(go.Heatmap(
            z=tensor.tolist(), colorscale="Hot" if is_error else "Gray", zmin=0, zmax=error_max if is_error else 1,
            showscale=col == 3, colorbar=dict(len=0.45, y=0.23 if is_error else 0.77, title="error" if is_error else "[0,1]"),
            hovertemplate="%{z:.3f}<extra></extra>",
        ), row=row, col=col)
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, scaleanchor="x", constrain="domain")
    for index in range(2, 7):
        fig.update_yaxes(scaleanchor=f"x{index}", row=(index - 1) // 3 + 1, col=(index - 1) % 3 + 1)
    fig.update_layout(template="plotly_white", height=640, margin=dict(l=20, r=20, t=60, b=20),
                      title=f"Example slices: subject {meta['subject']}, pair {source}→{target} (fold {fold}), axial slice {meta['z']}")
    caption = (f"Split: {'test' if split == 'test' else 'validation (in-sample)'}; a subject of target scanner {target}; the best plan's weights for pair {source}→{target} loaded onto "
               f"the pre-trained source model by the search. Compared with No-FT (the pre-trained model itself): Full-FT weights "
               f"are not kept by the search. Error maps share one colour range (0 to {error_max:.3f}). PSNR over this whole volume.")
    return fig, caption
