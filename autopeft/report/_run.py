"""Reading what a search left in its run directory, for the report."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from autopeft.errors import ConfigError
from autopeft.runs import ranked_finished, records, study_path, study_storage_url

# Order, colour and marker of each trial state in every figure and table of the report.
STATE_STYLE: dict[str, tuple[str, str, str]] = {
    # state: (legend label, colour, plotly marker symbol)
    "FINISHED": ("finished", "#1f77b4", "circle"),
    "STOPPED": ("stopped early (ASHA)", "#ff7f0e", "diamond-open"),
    "FAILED": ("failed", "#d62728", "x"),
    "INFEASIBLE": ("over budget (not trained)", "#7f7f7f", "square-open"),
    "INTERRUPTED": ("interrupted", "#9467bd", "triangle-down-open"),
    "RUNNING": ("running", "#2ca02c", "star-open"),
}


@dataclass
class RunData:
    """Everything a report shows, read once from a run directory.

    Args:
        run_dir: the search's output folder.
        meta: ``run.json`` (study name, sessions, settings, versions when recorded).
        records: trial records by trial number (``trials/NNNN.json``).
        references: the No-FT / Full-FT / PETITE rows on validation subjects (``references.json``),
            possibly empty.
        confirmation: the confirmation on test subjects (``summary.json["confirmation"]``), or None.
    """

    run_dir: Path
    meta: dict[str, Any]
    records: list[dict[str, Any]]
    references: list[dict[str, Any]] = field(default_factory=list)
    confirmation: dict[str, Any] | None = None

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.meta.get("config") or {})

    @property
    def finished(self) -> list[dict[str, Any]]:
        """Trials that ran every pair and scored (the only ones that compete for best)."""
        return ranked_finished(self.records)

    @property
    def best(self) -> dict[str, Any] | None:
        return next(iter(self.finished), None)

    def state_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for record in self.records:
            counts[record.get("state", "RUNNING")] = counts.get(record.get("state", "RUNNING"), 0) + 1
        return counts

    def study(self):
        """The run's Optuna study, or None when ``study.db`` is missing."""
        name = self.meta.get("study_name")
        if not study_path(self.run_dir).is_file() or not name:
            return None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return optuna.load_study(study_name=name, storage=study_storage_url(self.run_dir))


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory written by ``autopeft search``.

    Raises:
        ConfigError: the folder has no ``run.json`` (it is not a search's output).
    """
    folder = Path(run_dir).expanduser().resolve()
    meta_path = folder / "run.json"
    if not meta_path.is_file():
        raise ConfigError(f"{folder} has no run.json: give the folder 'autopeft search' wrote (its --out).")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    ref_path = folder / "references.json"
    references = json.loads(ref_path.read_text(encoding="utf-8")) if ref_path.is_file() else []
    summary_path = folder / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    return RunData(run_dir=folder, meta=meta, records=records(folder), references=references,
                   confirmation=summary.get("confirmation"))
