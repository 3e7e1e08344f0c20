"""A search's run directory: its layout, the trial-record schema and states, written by the driver only.

Layout of ``<run>/``::

    run.json            settings, study name, sessions, package versions of the latest session
    study.db            the Optuna study (SQLite)
    references.json     No-FT / Full-FT / PETITE on validation subjects
    trials/NNNN.json    one record per trial (:func:`new_record`; states below)
    weights/NNNN/       a trial's trained parts, per pair (:func:`pair_folder`:
                        ``<source>-<target>-fold<k>/``, names through ``autopeft._io.path_component``;
                        the names themselves in its meta.json)
    results.csv, best_plan.yaml, pareto/, best_weights/, summary.json, slots.json
    examples/           example slices of the best plan (drawn by the search, shown by the report)
    confirmation/       per (plan, fold, seed) test scores; confirmation.csv
    ray/                Ray Tune's storage when ``--storage-path`` is not given

Ray workers never write here: a trial hands its metrics and per-subject scores back through
``tune.report`` and its trained parts as a Tune checkpoint under the storage path; the driver's
Tune callback turns them into records and ``weights/``. So a run directory needs no shared disk.

Trial states: RUNNING while it trains, then FINISHED (every pair done), STOPPED (the scheduler
stopped it early), FAILED (an error, with its reason), INFEASIBLE (drawn over the budget, never
trained) or INTERRUPTED (a session ended while it ran; its plan runs again on resume).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from autopeft._io import atomic_write_json, path_component, path_inside

__all__ = [
    "RUNNING", "FINISHED", "STOPPED", "FAILED", "INFEASIBLE", "INTERRUPTED", "TERMINAL", "trial_state", "ranked_finished",
    "new_record", "study_path", "study_storage_url", "record_path", "weights_dir", "pair_folder", "find_pair", "write_record", "read_record", "records",
    "read_meta", "write_meta", "versions", "VERSIONED_PACKAGES",
]

RUNNING, FINISHED, STOPPED, FAILED, INFEASIBLE, INTERRUPTED = (
    "RUNNING", "FINISHED", "STOPPED", "FAILED", "INFEASIBLE", "INTERRUPTED")
TERMINAL = (FINISHED, STOPPED, FAILED, INFEASIBLE)

VERSIONED_PACKAGES = ("autopeft", "torch", "monai", "optuna", "ray", "plotly", "pandas")


def trial_state(result: Mapping[str, Any] | None, error: bool) -> str:
    """FINISHED, STOPPED or FAILED, from a trial's last reported metrics (the one rule): FAILED on a
    process error (``error``) or an error the trial reported (``result["error"]``), FINISHED when
    every pair is done, else STOPPED (the scheduler stopped it early)."""
    if error or (result and result.get("error")):
        return FAILED
    if not result or int(result.get("pairs_done", 0)) < int(result.get("pairs_total", 1)):
        return STOPPED
    return FINISHED


def ranked_finished(trial_records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """FINISHED trials with a score, best first: by validation PSNR (mean over every pair), ties to
    the earlier trial. The one rule for "the best plan": the recommended plan, the plans the
    confirmation re-runs, the best baseline of the portfolio and the console's best all read it."""
    finished = [r for r in trial_records if r.get("state") == FINISHED and r.get("psnr") is not None]
    return sorted(finished, key=lambda r: (-float(r["psnr"]), int(r["number"])))


def new_record(config: Mapping[str, Any], pairs_total: int, *, state: str, reason: str = "") -> dict[str, Any]:
    """A trial's record before it trains (or, for an over-budget draw, its only record), from the
    trial config the search's ``define`` step made."""
    return {
        "number": int(config["number"]), "state": state, "plan": config["plan"], "params": config["params"],
        "trainable": config["trainable"], "fraction": config["fraction"], "prior": config.get("prior"),
        "warm_start": config.get("warm_start", False), "portfolio": config.get("portfolio"), "split": "val", "pairs_total": int(pairs_total), "pairs_done": 0,
        "epochs_done": 0,
        "fidelity": 0.0, "psnr": None, "ssim": None, "nrmse": None, "gain": None, "pairs": [], "reason": reason,
        "started": time.time(), "seconds": 0.0,
    }


def study_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "study.db"


def study_storage_url(run_dir: str | os.PathLike) -> str:
    """The SQLAlchemy URL of the run's study, its path escaped: a folder named with ``%``, ``#``
    or ``?`` must not be read as URL syntax (``f"sqlite:///{path}"`` decodes ``%2F`` to ``/``)."""
    from sqlalchemy.engine import URL  # optuna's own dependency; loaded only when a study is opened

    return URL.create("sqlite", database=str(study_path(run_dir))).render_as_string(hide_password=False)


def record_path(run_dir: str | os.PathLike, number: int) -> Path:
    return Path(run_dir) / "trials" / f"{number:04d}.json"


def weights_dir(run_dir: str | os.PathLike, number: int) -> Path:
    """Where trial ``number``'s trained parts are kept, one folder per pair."""
    return Path(run_dir) / "weights" / f"{number:04d}"


def pair_folder(source: str, target: str, fold: int) -> str:
    """The folder name of a pair's trained parts: ``<source>-<target>-fold<k>``, each scanner name
    through :func:`autopeft._io.path_component` (kept as it is when it is a plain name)."""
    return f"{path_component(source)}-{path_component(target)}-fold{int(fold)}"


def find_pair(weights: str | os.PathLike, source: str, target: str, fold: int) -> Path:
    """A pair's trained-parts folder in ``weights`` (a ``weights/NNNN/`` or ``best_weights/``):
    :func:`pair_folder`, or the raw-name folder an earlier autopeft wrote, when only that exists and
    lies inside ``weights``. The path may not exist."""
    weights = Path(weights)
    current = weights / pair_folder(source, target, fold)
    legacy = weights / f"{source}-{target}-fold{fold}"
    if legacy != current and not current.exists():
        try:
            if legacy.is_dir():
                return path_inside(weights, legacy, what="a pair's trained parts")
        except ValueError:  # outside weights/, or no path at all: only the current name counts
            pass
    return current


def write_record(run_dir: str | os.PathLike, number: int, record: Mapping[str, Any]) -> None:
    """Write a trial record atomically (temporary file + ``os.replace``)."""
    path = record_path(run_dir, number)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, dict(record), default=str)


def read_record(run_dir: str | os.PathLike, number: int) -> dict[str, Any] | None:
    path = record_path(run_dir, number)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def records(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every trial record of a run, by trial number."""
    folder = Path(run_dir) / "trials"
    if not folder.is_dir():
        return []
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))]


def read_meta(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``run.json``, or None when the folder holds no search."""
    path = Path(run_dir) / "run.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_meta(run_dir: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    atomic_write_json(Path(run_dir) / "run.json", dict(meta))


def versions() -> dict[str, str]:
    """Installed versions of the packages a search depends on (kept in ``run.json``)."""
    found = {}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found
