"""Example slices (PETITE's Fig. 4): short scan, long scan, predictions and error maps.

The best plan's saved weights (``best_weights/<source>-<target>-fold<k>/``) are loaded onto the
cached pre-trained source model with :func:`autopeft.peft.load_trained`. The comparison is against
No-FT (the pre-trained source model itself): the search does not keep Full-FT weights (a whole
model per pair) and fine-tuning one inside a report would cost as much as a trial.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autopeft.report._run import RunData


def _setup(run: RunData):
    """The search's TrialSetup rebuilt from run.json (pre-trained models are found in the cache
    by the same key the search used)."""
    from autopeft.cli._common import resolve_manifest
    from autopeft.search.trial import TrialSetup

    config = run.config
    scanners = [str(s) for s in config["scanners"]]
    return TrialSetup(
        backbone=config["backbone"], preset=config["preset"],
        manifest_path=str(resolve_manifest(config.get("data"), progress=False)),
        pairs=tuple((s, t) for s in scanners for t in scanners if s != t), folds=tuple(range(int(config.get("folds", 1)))),
        epochs=int(config["epochs"]), seed=int(config.get("seed", 0)), protocol=dict(config.get("protocol") or {}),
        pretrain_epochs=config.get("pretrain_epochs"), device="cpu", threads=1, run_dir=str(run.run_dir),
        weights=config.get("weights"),
    )


def _pick_pair(run: RunData) -> tuple[Path, str, str, int] | None:
    weights = run.run_dir / "best_weights"
    if not weights.is_dir():
        return None
    for folder in sorted(p for p in weights.iterdir() if p.is_dir()):
        try:
            pair, fold = folder.name.rsplit("-fold", 1)
            source, target = pair.split("-", 1)
            return folder, source, target, int(fold)
        except ValueError:
            continue
    return None


def slices_figure(run: RunData):
    """A 2 x 3 grid for one held-out subject of the best plan's first pair:
    top: short scan | No-FT prediction | best-plan prediction;
    bottom: long scan (target) | |No-FT - long| | |best - long|. Axial slice through the middle.

    Returns:
        ``(figure, caption)``, or a note (str) when there are no saved best weights.
    """
    import plotly.graph_objects as go
    import torch
    from plotly.subplots import make_subplots

    from autopeft import metrics
    from autopeft.data import eval_volumes, split_scanner
    from autopeft.evaluation import predict_volume
    from autopeft.peft import load_trained
    from autopeft.search.trial import source_model

    best = run.best
    picked = _pick_pair(run)
    if best is None or picked is None:
        return "No example slices: the run has no finished trial with saved weights (best_weights/)."
    folder, source, target, fold = picked
    setup = _setup(run)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pretrained, _ = source_model(setup, source, fold)
    tuned = load_trained(pretrained, folder).eval()
    splits = split_scanner(setup.manifest_path, target, purpose="finetune", protocol=setup.make_protocol(),
                           fold=fold, seed=setup.seed)
    # A test subject once the confirmation has read them; before that a validation one (the search
    # must not read test subjects early).
    split = "test" if run.confirmation and run.confirmation.get("plans") else "val"
    volume = eval_volumes(splits[split][:1])[0]
    roi = pretrained.preset.crop_size
    no_ft = predict_volume(pretrained, volume["short"], roi_size=roi).clamp(0, 1)
    best_pred = predict_volume(tuned, volume["short"], roi_size=roi).clamp(0, 1)
    long = volume["long"]
    scores = {name: metrics.psnr(pred.unsqueeze(0), long.unsqueeze(0)) for name, pred in (("no_ft", no_ft), ("best", best_pred))}

    z = long.shape[-1] // 2  # axial plane: the last voxel axis is superior-inferior in RAS NIfTI

    def plane(t: torch.Tensor) -> list[list[float]]:
        return t[0, :, :, z].T.numpy().tolist()  # rows = anterior-posterior, drawn bottom-up

    error_max = float(max((no_ft - long).abs().max(), (best_pred - long).abs().max(), 1e-6))
    panels = [
        (1, 1, f"short scan (scanner {target})", volume["short"], False),
        (1, 2, f"No-FT prediction, {scores['no_ft']:.2f} dB", no_ft, False),
        (1, 3, f"best plan #{best['number']}, {scores['best']:.2f} dB", best_pred, False),
        (2, 1, "long scan (target)", long, False),
        (2, 2, "|No-FT − long|", (no_ft - long).abs(), True),
        (2, 3, f"|best #{best['number']} − long|", (best_pred - long).abs(), True),
    ]
    fig = make_subplots(rows=2, cols=3, subplot_titles=[p[2] for p in panels], horizontal_spacing=0.04, vertical_spacing=0.08)
    for row, col, _title, tensor, is_error in panels:
        fig.add_trace(go.Heatmap(
            z=plane(tensor), colorscale="Hot" if is_error else "Gray", zmin=0, zmax=error_max if is_error else 1,
            showscale=col == 3, colorbar=dict(len=0.45, y=0.23 if is_error else 0.77, title="error" if is_error else "[0,1]"),
            hovertemplate="%{z:.3f}<extra></extra>",
        ), row=row, col=col)
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, scaleanchor="x", constrain="domain")
    for index in range(2, 7):
        fig.update_yaxes(scaleanchor=f"x{index}", row=(index - 1) // 3 + 1, col=(index - 1) % 3 + 1)
    fig.update_layout(template="plotly_white", height=640, margin=dict(l=20, r=20, t=60, b=20),
                      title=f"Example slices: subject {volume.get('subject', '?')}, pair {source}→{target} (fold {fold}), axial slice {z}")
    caption = (f"Split: {'test' if split == 'test' else 'validation (in-sample)'}; a subject of target scanner {target}; the best plan's weights for pair {source}→{target} loaded onto "
               f"the cached pre-trained source model. Compared with No-FT (the pre-trained model itself): Full-FT weights "
               f"are not kept by the search. Error maps share one colour range (0 to {error_max:.3f}). PSNR over this whole volume.")
    return fig, caption
