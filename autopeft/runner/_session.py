"""Opening a search session: a new run directory or a resumed one, and its Optuna study.

A resumed session reads ``run.json`` for the settings, tells the study what the records say of
trials an interruption left RUNNING (through ``study.tell``), marks the rest INTERRUPTED and
enqueues their plans again: finished trials are neither lost nor repeated.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from autopeft._io import path_component
from autopeft.errors import ConfigError
from autopeft.runs import (
    FAILED, FINISHED, INFEASIBLE, INTERRUPTED, STOPPED, read_meta, read_record, study_storage_url, versions, write_meta,
    write_record,
)
from autopeft.search.config import SearchConfig
from autopeft.search.portfolio import PORTFOLIO_ATTRS
from autopeft.search.sampler import make_sampler, search_seed

__all__ = ["Session", "open_session", "open_study", "requeue_interrupted"]


@dataclass
class Session:
    """One session of a search: its run directory, ``run.json`` and settings."""

    run_dir: Path
    meta: dict[str, Any]
    config: SearchConfig
    resumed: bool

    @property
    def number(self) -> int:
        return int(self.meta["sessions"])

    def save(self) -> None:
        """``run.json`` with the settings and the versions of this session (the driver's)."""
        self.meta["config"] = asdict(self.config)
        self.meta["versions"] = versions()  # of the latest session; the report shows them beside the report's own
        write_meta(self.run_dir, self.meta)


def open_session(config: SearchConfig | None, resume_dir: str | os.PathLike | None, *, trials: int | None,
                 time_budget_s: float | None, resolve) -> Session:
    """A new session (``config`` settled by ``resolve``) or the next session of ``resume_dir``."""
    if resume_dir is not None:
        run_dir = Path(resume_dir).expanduser().resolve()
        meta = read_meta(run_dir)
        if meta is None:
            raise ConfigError(f"`resume_dir` {resume_dir}: no run.json there; give the folder a search wrote (its `out`).")
        config = SearchConfig(**meta["config"])
        if trials is not None:
            config.trials = trials
        if time_budget_s is not None:
            config.time_budget_s = time_budget_s
        meta["sessions"] += 1
        return Session(run_dir, meta, config, resumed=True)
    if config is None:
        raise ValueError("`config` must be given for a new search.")
    config = resolve(config)
    run_dir = (Path(config.out).expanduser().resolve() if config.out
               else Path("runs").resolve() / f"{path_component(config.backbone)}-{time.strftime('%Y%m%d-%H%M%S')}")
    if (run_dir / "run.json").exists():
        raise ConfigError(f"`out` {run_dir} already holds a search; continue it with `resume_dir` {run_dir} or choose another `out`.")
    meta = {"study_name": f"autopeft-{config.backbone}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}", "sessions": 1}
    return Session(run_dir, meta, config, resumed=False)


def open_study(session: Session):
    """The run's study in ``study.db`` (SQLite), with a sampler seeded anew for this session."""
    config = session.config
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(study_storage_url(session.run_dir))
    seed = search_seed(config) + session.number  # the same seed would replay the first session's random draws
    sampler = make_sampler(config, seed)
    directions = ["maximize", "minimize"] if config.objective == "multi" else ["maximize"]
    return optuna.create_study(storage=storage, study_name=session.meta["study_name"], sampler=sampler,
                               directions=directions, load_if_exists=True)


def requeue_interrupted(run_dir: Path, study) -> None:
    """Study trials a killed or interrupted session left RUNNING: tell the study what their
    records say (through ``study.tell``), mark the rest FAIL (record INTERRUPTED) and enqueue
    their plans again."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        record = read_record(run_dir, trial.number)
        state = record.get("state") if record is not None else None
        if state == FINISHED and record.get("gain") is not None:
            # Ray finished it but the study never heard.
            values = [record["gain"]] + ([record["fraction"]] if len(study.directions) > 1 else [])
            study.tell(trial.number, values if len(values) > 1 else values[0])
            continue
        if state in (STOPPED, FAILED, INFEASIBLE):
            # An over-budget draw is PRUNED, as the searcher tells it (its constraint steers the sampler).
            study.tell(trial.number, state=TrialState.PRUNED if state in (STOPPED, INFEASIBLE) else TrialState.FAIL)
            continue
        study.tell(trial.number, state=TrialState.FAIL)
        if record is not None:
            record.update(state=INTERRUPTED, reason="the search was interrupted while it ran; its plan runs again")
            write_record(run_dir, trial.number, record)
        # A portfolio trial stays one (its row is trained as written, not its projection).
        kept = {k: v for k, v in trial.user_attrs.items() if k in (*PORTFOLIO_ATTRS, "warm_start")}
        study.enqueue_trial(dict(trial.params), user_attrs={**kept, "requeued": True})
