"""The search engine: Ray Tune runs trials, Optuna samples plans, ASHA stops weak trials early.

Flow of :func:`run_search`:

1. settle the configuration (defaults for this machine: tiny preset on a CPU, paper on a GPU)
   and write it to ``<run>/run.json``;
2. pre-train every source model once, in the driver, before any trial (cached, shared);
3. open the Optuna study in ``<run>/study.db`` (SQLite, unique name); on a first session, enqueue
   the plans with the best SH-PEFT prior (warm start, unless ``priors`` is off);
4. fine-tune the reference plans (No-FT always: its per-pair validation PSNR is the baseline of
   the objective; Full-FT and PETITE's plan for the results table);
5. run the trials through ``ray.tune.Tuner`` with :class:`~autopeft.search._searcher.StudySearcher`
   (Optuna's ask / tell; plans over the budget are drawn again inside the sampling step, each told
   to the study as FAIL with its ``trial.set_constraint``, and never become Ray trials), the
   objective being the mean validation PSNR gain over No-FT (pairs rotated per trial), ``ASHAScheduler``
   on the pairs done (a stopped trial is PRUNED in the study), and a limiter that caps concurrency,
   stops launching at the deadline and after ``trials`` launched plans;
6. write ``results.csv``, ``best_plan.yaml``, the Pareto plans and the best plan's weights;
7. confirm the ``confirm`` best plans and the references on the targets' test subjects
   (:mod:`autopeft.search.confirm`): everything before this stage sees validation subjects only.

Resuming (``resume_dir``) reads ``run.json``, marks trials an interruption left running as
INTERRUPTED and enqueues their plans again, and runs only the trials still missing: finished
trials are neither lost nor repeated (their records are the ground truth).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from autopeft.checkpoints import atomic_write_text
from autopeft.errors import ConfigError
from autopeft.search.budget import Budget, PlanCounter
from autopeft.search.options import PRIOR_CANDIDATES, PRIOR_SIGNALS, SAMPLERS
from autopeft.search.trial import (
    FAILED,
    FINISHED,
    INFEASIBLE,
    INTERRUPTED,
    STOPPED,
    TERMINAL,
    TrialSetup,
    new_record,
    read_record,
    records,
    run_plan,
    write_record,
)

__all__ = ["SearchConfig", "run_search", "resolve_defaults"]

# Over-budget draws allowed per trial asked for before the search gives up on the space: a space
# whose plans almost never fit the budget would otherwise draw forever.
MAX_INFEASIBLE_DRAWS_PER_TRIAL = 25

# The CPU default: the time budget counts from the start (a first run pre-trains its two source
# models there) and trials launched before it end within a few minutes, so the run ends within 20.
# The confirmation (about 2 minutes on the CPU default) comes after the deadline, hence 13 minutes.
CPU_DEFAULTS = {"scanners": ["1", "5"], "trials": 48, "time_budget_s": 13 * 60.0, "confirm_seeds": 2}
GPU_DEFAULTS = {"scanners": ["1", "2", "3", "4", "5"], "trials": 64, "time_budget_s": None, "confirm_folds": 3,
                "confirm_seeds": 3}


@dataclass
class SearchConfig:
    """Settings of one search (every field is a command-line flag of ``autopeft search``, except
    ``sampler_seed``).

    ``None`` fields take the machine's defaults (:func:`resolve_defaults`). ``seed`` seeds the
    evaluation (splits, crops, initialisation) and, unless ``sampler_seed`` is given, the search
    (Optuna sampler, warm-start candidates): repeating a search with other ``sampler_seed`` values
    varies only the search, so every repeat scores plans on the same evaluation.
    """

    backbone: str
    budget: str
    preset: str | None = None
    space: str | None = None
    scanners: list[str] | None = None
    trials: int | None = None
    time_budget_s: float | None = None
    epochs: int | None = None
    folds: int = 1
    seed: int = 0
    sampler_seed: int | None = None
    out: str | None = None
    objective: str = "single"
    sampler: str = "tpe"
    priors: bool = True
    prior_signal: str = "shpeft"
    prior_candidates: int = PRIOR_CANDIDATES
    warm_start: int | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    concurrency: int | None = None
    address: str | None = None
    data: str | None = None
    weights: str | None = None  # a user's pre-trained model of `source` (see autopeft.pretraining.imported_model)
    source: str | None = None
    pretrain_epochs: int | None = None
    protocol: dict[str, int] = field(default_factory=dict)
    references: bool = True
    asha: bool = True
    device: str | None = None
    progress: bool = True
    dashboard: bool = False
    confirm: int = 3
    confirm_folds: int | None = None
    confirm_seeds: int | None = None

    def __post_init__(self) -> None:
        if (self.weights is None) != (self.source is None):
            raise ConfigError("`weights` and `source` go together: `weights` is a model pre-trained on scanner "
                              "`source`, and the search fine-tunes it from there to every other scanner.")
        if self.objective not in ("single", "multi"):
            raise ConfigError(f"`objective` must be 'single' or 'multi', but got {self.objective!r}.")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"`sampler` must be one of {', '.join(SAMPLERS)}, but got {self.sampler!r}.")
        if self.prior_signal not in PRIOR_SIGNALS:
            raise ConfigError(f"`prior_signal` must be one of {', '.join(PRIOR_SIGNALS)}, but got {self.prior_signal!r}.")
        if self.prior_candidates < 1:
            raise ConfigError(f"`prior_candidates` must be at least 1, but got {self.prior_candidates}.")
        if self.trials is not None and self.trials < 1:
            raise ConfigError(f"`trials` must be at least 1, but got {self.trials}.")
        if self.folds < 1:
            raise ConfigError(f"`folds` must be at least 1, but got {self.folds}.")
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise ConfigError(f"`cpus_per_trial` must be > 0 and `gpus_per_trial` >= 0, but got {self.cpus_per_trial} and {self.gpus_per_trial}.")
        if self.confirm < 0:
            raise ConfigError(f"`confirm` (plans to confirm on test subjects) must be 0 or more, but got {self.confirm}.")
        for name in ("confirm_folds", "confirm_seeds"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"`{name}` must be at least 1, but got {value}.")


def resolve_defaults(config: SearchConfig) -> SearchConfig:
    """Fill the ``None`` fields for this machine: a GPU gets the paper preset, all five
    scanners, 64 trials and a confirmation over 3 folds x 3 seeds; a CPU the tiny preset, two
    scanners, 48 trials, no trial launched after 13 minutes and a confirmation over the search's
    folds x 2 seeds (sized so the default run ends within 20 minutes on 2 cores)."""
    import torch

    from backbones import registered_backbones

    cuda = torch.cuda.is_available() if config.device is None else config.device.startswith("cuda")
    defaults = GPU_DEFAULTS if cuda else CPU_DEFAULTS
    preset = config.preset or ("paper" if cuda else "tiny")
    if config.scanners is None and config.data is not None:  # the data's own scanners
        from autopeft.cli._common import resolve_manifest
        from autopeft.data import default_scanners

        scanners, why = default_scanners(resolve_manifest(config.data), gpu=cuda, include=config.source)
        print(why, flush=True)
        config = replace(config, scanners=scanners)
    values: dict[str, Any] = {
        "preset": preset,
        "device": config.device or ("cuda" if cuda else "cpu"),
        "space": config.space or config.backbone,
        "scanners": config.scanners or list(defaults["scanners"]),
        "trials": config.trials or defaults["trials"],
        "confirm_folds": config.confirm_folds or defaults.get("confirm_folds", config.folds),
        "confirm_seeds": config.confirm_seeds or defaults["confirm_seeds"],
    }
    presets = registered_backbones().get(config.backbone)
    if presets is None:
        raise ConfigError(f"Unknown backbone {config.backbone!r}; registered: {', '.join(sorted(registered_backbones()))}.")
    if preset not in presets:
        raise ConfigError(f"Backbone {config.backbone!r} has no preset {preset!r}; presets: {', '.join(presets)}.")
    values["epochs"] = config.epochs or presets[preset].finetune.epochs
    if config.time_budget_s is None and config.trials is None:
        values["time_budget_s"] = defaults["time_budget_s"]
    if config.gpus_per_trial == 0 and cuda and config.device is None:
        values["gpus_per_trial"] = 1.0
    if config.source is not None and str(config.source) not in values["scanners"]:
        raise ConfigError(f"`source` ({config.source}) must be one of `scanners` ({','.join(values['scanners'])}).")
    if len(values["scanners"]) < 2:
        raise ConfigError(f"`scanners` must hold at least two scanners (a source and a target), but got {values['scanners']}.")
    return replace(config, **values)


def _budget_seconds(text: str | float | None) -> float | None:
    """``30m``, ``2h``, ``90s`` or seconds."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    units = {"s": 1, "m": 60, "h": 3600}
    raw = str(text).strip().lower()
    try:
        return float(raw[:-1]) * units[raw[-1]] if raw[-1] in units else float(raw)
    except (ValueError, IndexError):
        raise ConfigError(f"--time-budget {text!r} must be like 30m, 2h, 90s or a number of seconds.") from None


# Ray side ----------------------------------------------------------------------------------------
def _trainable(config: dict[str, Any], setup: TrialSetup) -> None:
    """Ray Tune function trainable: one trial (runs in a Ray worker)."""
    import torch
    from ray import tune

    from autopeft.peft import Plan

    torch.set_num_threads(max(1, setup.threads))  # oversubscribing 2 cores makes tiny steps 5-10x slower
    number = int(config["number"])
    existing = read_record(setup.run_dir, number)
    if existing is not None and existing.get("state") == FINISHED:
        # Ray restarted a trial that had already finished: report its result, train nothing.
        tune.report({k: existing.get(k) for k in ("psnr", "ssim", "nrmse", "gain", "fraction", "fidelity", "pairs_done",
                                                  "pairs_total")})
        return
    record = new_record(config, setup, state="RUNNING")
    write_record(setup.run_dir, number, record)
    plan = Plan.from_dict(config["plan"])

    def report(metrics: dict[str, Any]) -> None:
        record.update(metrics, seconds=time.time() - record["started"])
        metrics = {k: v for k, v in metrics.items() if k != "pairs"}
        write_record(setup.run_dir, number, record)
        tune.report({**metrics, "fraction": config["fraction"]})

    try:
        save_dir = Path(setup.run_dir) / "weights" / f"{number:04d}"
        run_plan(setup, plan, report=report, save_dir=save_dir, offset=number)
    except Exception as err:  # recorded with its reason, then re-raised so Ray and Optuna mark it FAILED
        record.update(state=FAILED, reason=f"{type(err).__name__}: {err}"[:500], seconds=time.time() - record["started"])
        write_record(setup.run_dir, number, record)
        raise
    record.update(state=FINISHED, seconds=time.time() - record["started"])
    write_record(setup.run_dir, number, record)


def _baseline(run_dir: Path) -> tuple[tuple[str, str, int, float], ...]:
    """No-FT's validation PSNR per (source, target, fold), from references.json."""
    rows = json.loads((run_dir / "references.json").read_text(encoding="utf-8"))
    no_ft = next(row for row in rows if row["label"] == "No-FT")
    return tuple((p["source"], p["target"], int(p["fold"]), float(p["psnr"])) for p in no_ft["pairs"])


def _ray_helpers(run_dir: Path, total: int, deadline: float | None, started: float, progress: bool):
    """The Tune callback (records, console lines) and the deadline limiter, built on first use so
    that importing this module does not import Ray."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter, Searcher

    class Progress(tune.Callback):
        """Finishes each trial's record (FINISHED or STOPPED early, FAILED) and prints one line per event."""

        def _close(self, trial, failed: bool) -> None:
            from autopeft.search._searcher import trial_state

            number = int(trial.config["number"])
            record = read_record(run_dir, number) or {"number": number, "pairs_done": 0, "pairs_total": 0, "fidelity": 0.0}
            if failed:
                if record.get("state") != FAILED:
                    record.update(state=FAILED, reason=record.get("reason") or f"the trial process failed ({trial.error_file or 'no error file'})")
            elif record.get("state") == "RUNNING":
                record["state"] = trial_state(record, False)
            write_record(run_dir, number, record)
            if progress:
                self.line(record)

        def line(self, record: dict[str, Any]) -> None:
            done = records(run_dir)
            counts = {state: sum(r.get("state") == state for r in done) for state in (FINISHED, STOPPED, FAILED, INFEASIBLE, "RUNNING")}
            best = max((r for r in done if r.get("state") == FINISHED), key=lambda r: r["psnr"], default=None)
            left = f", {max(deadline - time.time(), 0) / 60:.1f} min left to launch" if deadline else ""
            best_text = (f"best {best['psnr']:.3f} dB (validation) at {100 * best['fraction']:.3f}% (#{best['number']})"
                         if best else "no finished trial yet")
            print(
                f"[{(time.time() - started) / 60:5.1f} min] trial #{record['number']} {record['state'].lower()}"
                + (f" ({record.get('reason')})" if record.get("state") in (FAILED,) else "")
                + f" | finished {counts[FINISHED]}, stopped early {counts[STOPPED]}, failed {counts[FAILED]}, "
                f"running {counts['RUNNING']} of {total} plans; {counts[INFEASIBLE]} over-budget draws skipped | {best_text}{left}",
                flush=True,
            )

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self._close(trial, failed=False)

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self._close(trial, failed=True)

    class TrialLimiter(ConcurrencyLimiter):
        """A concurrency limit that also stops *launching* trials (running ones finish) after
        ``deadline_at`` (once a first wave of ``max_concurrent`` plans has been launched) or once
        ``wanted`` plans have been launched."""

        def __init__(self, searcher, max_concurrent: int, deadline_at: float | None, wanted: int) -> None:
            super().__init__(searcher, max_concurrent=max_concurrent)
            self.deadline_at = deadline_at
            self.wanted = wanted
            self.launched = 0

        def suggest(self, trial_id: str):
            first_wave = self.launched < min(self.wanted, self.max_concurrent)
            if self.deadline_at is not None and time.time() >= self.deadline_at and not first_wave:
                return Searcher.FINISHED
            if self.launched >= self.wanted:
                return Searcher.FINISHED
            config = super().suggest(trial_id)
            if isinstance(config, dict):
                self.launched += 1
            return config

    return Progress(), TrialLimiter


def _search_seed(config: SearchConfig) -> int:
    return config.seed if config.sampler_seed is None else config.sampler_seed


def make_sampler(config: SearchConfig, seed: int):
    """The Optuna sampler ``config.sampler`` names (``SAMPLERS``), seeded with ``seed``."""
    import optuna

    if config.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    startup = min(10, max(2, (config.trials or 16) // 4))
    if config.sampler == "gp":
        # Conditional parameters (a method's own) fall outside the GP's joint space: drawn at random.
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup, warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)


def _open_study(run_dir: Path, meta: dict[str, Any], config: SearchConfig, session: int):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{run_dir / 'study.db'}")
    # A new seed per session: the same seed would replay the first session's random draws.
    sampler = make_sampler(config, _search_seed(config) + session)
    directions = ["maximize", "minimize"] if config.objective == "multi" else ["maximize"]
    study = optuna.create_study(storage=storage, study_name=meta["study_name"], sampler=sampler,
                                directions=directions, load_if_exists=True)
    return storage, sampler, study


def _mark_interrupted(run_dir: Path, study) -> list[dict[str, Any]]:
    """Study trials a killed or interrupted session left RUNNING: tell the study what their
    records say (through ``study.tell``), mark the rest FAIL (record INTERRUPTED) and return their
    params, to be enqueued again."""
    from optuna.trial import TrialState

    again = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        record = read_record(run_dir, trial.number)
        state = record.get("state") if record is not None else None
        if state == FINISHED and record.get("gain") is not None:
            # Ray finished it but the study never heard.
            values = [record["gain"]] + ([record["fraction"]] if len(study.directions) > 1 else [])
            study.tell(trial.number, values if len(values) > 1 else values[0])
            continue
        if state in (STOPPED, FAILED, INFEASIBLE):
            study.tell(trial.number, state=TrialState.PRUNED if state == STOPPED else TrialState.FAIL)
            continue
        study.tell(trial.number, state=TrialState.FAIL)
        if record is not None:
            record.update(state=INTERRUPTED, reason="the search was interrupted while it ran; its plan runs again")
            write_record(run_dir, trial.number, record)
        again.append({k: v for k, v in trial.params.items()})
    return again


def _new_run_dir(config: SearchConfig) -> Path:
    if config.out:
        return Path(config.out).expanduser().resolve()
    return Path("runs").resolve() / f"{config.backbone}-{time.strftime('%Y%m%d-%H%M%S')}"


def _print_settings(config: SearchConfig, setup: TrialSetup, budget: Budget, total: int, run_dir: Path, resumed: bool) -> None:
    print(("resuming" if resumed else "search") + f" in {run_dir}")
    print(f"  backbone {config.backbone}/{config.preset} on {config.device}; space {config.space}; budget {budget.describe(total)}")
    print(f"  scanners {', '.join(config.scanners)}: {len(setup.pairs)} source->target pairs x {config.folds} fold(s), "
          f"{config.epochs} fine-tuning epochs each; protocol {setup.make_protocol()}")
    limit = f"no trial launched after {config.time_budget_s / 60:.1f} min" if config.time_budget_s else "no time limit"
    print(f"  {config.trials} trials, {config.objective}-objective, sampler {config.sampler}, priors {(config.prior_signal + ' x' + str(config.prior_candidates)) if config.priors else 'off'}, "
          f"ASHA {'on' if config.asha and config.objective == 'single' and len(setup.units) > 1 else 'off'}, {limit}")
    print(f"  Ray: {config.cpus_per_trial:g} CPU and {config.gpus_per_trial:g} GPU per trial, at most {config.concurrency} at once"
          + (f", cluster {config.address}" if config.address else ", local"))
    protocol = setup.make_protocol()
    print(f"  subjects per target: {protocol.finetune_train} fine-tune, {protocol.finetune_val} validation (trials and every "
          f"choice), {protocol.finetune_test} test (read only by the confirmation)")
    if config.confirm:
        print(f"  then: the {config.confirm} best plans by validation + No-FT, Full-FT, PETITE re-run on test subjects over "
              f"{config.confirm_folds or 1} fold(s) x {config.confirm_seeds or 1} fine-tuning seed(s)")
    else:
        print("  no confirmation on test subjects (--confirm 0): every figure is on validation subjects, in-sample")


def run_search(config: SearchConfig | None = None, *, resume_dir: str | os.PathLike | None = None,
               trials: int | None = None, time_budget_s: float | None = None) -> Path:
    """Run (or resume) a search; returns the run directory.

    Args:
        config: the settings of a new search (ignored when resuming).
        resume_dir: a run directory to continue; its ``run.json`` gives the settings.
        trials: when resuming, a new total number of trials. Defaults to the recorded one.
        time_budget_s: when resuming, a new limit on launching trials. Defaults to the recorded one.
    """
    from autopeft.cli._common import resolve_manifest
    from autopeft.search.priors import PlanPrior, PriorGuide, top_plans
    from autopeft.search.results import finish_run, run_references
    from autopeft.search.space import load_space
    from backbones import build_backbone

    started = time.time()
    if resume_dir is not None:
        run_dir = Path(resume_dir).expanduser().resolve()
        meta_path = run_dir / "run.json"
        if not meta_path.is_file():
            raise ConfigError(f"--resume {resume_dir}: no run.json there; give the folder a search wrote (its --out).")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        config = SearchConfig(**meta["config"])
        if trials is not None:
            config.trials = trials
        if time_budget_s is not None:
            config.time_budget_s = time_budget_s
        meta["sessions"] += 1
    else:
        if config is None:
            raise ValueError("`config` must be given for a new search.")
        config = resolve_defaults(config)
        run_dir = _new_run_dir(config)
        if (run_dir / "run.json").exists():
            raise ConfigError(f"--out {run_dir} already holds a search; continue it with --resume {run_dir} or choose another --out.")
        meta = {"study_name": f"autopeft-{config.backbone}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}", "sessions": 1}
    budget = Budget.parse(config.budget)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = str(resolve_manifest(config.data, progress=config.progress))
    config.data = config.data or None
    if config.concurrency is None:
        cpus = os.cpu_count() or 1
        config.concurrency = max(1, int(cpus // config.cpus_per_trial))
        if config.gpus_per_trial > 0:
            import torch

            config.concurrency = max(1, min(config.concurrency, int(torch.cuda.device_count() / config.gpus_per_trial)))
    meta["config"] = asdict(config)
    from autopeft.report import versions

    meta["versions"] = versions()  # of the latest session; the report shows them beside the report's own
    (run_dir / "run.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")

    scanners = [str(s) for s in config.scanners]
    setup = TrialSetup(
        backbone=config.backbone, preset=config.preset, manifest_path=manifest_path,
        pairs=tuple((s, t) for s in scanners for t in scanners if s != t and config.source in (None, s)), folds=tuple(range(config.folds)),
        epochs=int(config.epochs), seed=config.seed, protocol=dict(config.protocol), pretrain_epochs=config.pretrain_epochs,
        device=config.device, threads=max(1, int(config.cpus_per_trial)), run_dir=str(run_dir), weights=config.weights,
    )
    protocol = setup.make_protocol()
    if config.confirm > 0 and (config.confirm_folds or 1) > protocol.folds:
        raise ConfigError(f"`confirm_folds` ({config.confirm_folds}) must be at most the protocol's {protocol.folds} folds.")
    template = build_backbone(config.backbone, config.preset)
    space = load_space(config.space, template.sites())
    if space.backbone != config.backbone:
        raise ConfigError(f"--space {config.space} is written for {space.backbone!r}, but --backbone is {config.backbone!r}.")
    counter = PlanCounter(template)
    _print_settings(config, setup, budget, counter.total, run_dir, resume_dir is not None)

    _pretrain_sources(config, setup)

    storage, sampler, study = _open_study(run_dir, meta, config, meta["sessions"])
    train_extra = {"epochs": int(config.epochs)}
    prior_model = PlanPrior.for_setup(setup, template, counter, signal=config.prior_signal) if config.priors else None
    guide = None
    if prior_model is not None and config.prior_candidates > 1:
        guide = PriorGuide(space, prior_model, budget, make_sampler=lambda seed: make_sampler(config, seed),
                           candidates=config.prior_candidates, seed=_search_seed(config) + meta["sessions"], train=train_extra)
    if resume_dir is None and config.priors:
        k = config.warm_start if config.warm_start is not None else max(2, min(8, config.trials // 4))
        # Warm-start plans learn at the preset's PEFT rate (that of `autopeft finetune` and the
        # references) unless the space sets its own default: the middle of a wide log range can be
        # several times too slow for a short fine-tuning.
        preset_lr = template.preset.finetune.lr_peft
        for score, params, _plan in top_plans(space, prior_model, budget, k=k, seed=_search_seed(config),
                                              lr=preset_lr, train=train_extra):
            study.enqueue_trial(params, user_attrs={"warm_start": True, "prior": score})
    if resume_dir is not None:
        for params in _mark_interrupted(run_dir, study):
            study.enqueue_trial(params, user_attrs={"requeued": True})

    # No-FT always runs (it only evaluates): its per-pair validation PSNR is the baseline of the
    # objective, the gain over No-FT. Full-FT and PETITE's plan run with references on.
    if not (run_dir / "references.json").is_file():
        run_references(setup, config, run_dir)
    setup = replace(setup, baseline=_baseline(run_dir))

    # --trials counts plans that train: over-budget draws are recorded but cost nothing.
    done = sum(r.get("state") in TERMINAL and r.get("state") != INFEASIBLE for r in records(run_dir))
    remaining = max(config.trials - done, 0)
    # The time budget counts from the start of this session, pre-training and references included,
    # so that it bounds what a user waits for; the limiter still launches one wave of trials.
    deadline = started + config.time_budget_s if config.time_budget_s else None

    def define_space(trial) -> dict[str, Any]:
        plan = space.suggest(trial, train=train_extra)
        count = counter.count(plan)
        limit = budget.limit(count.total)
        trial.set_constraint("budget", float(count.trainable - limit))
        prior = prior_model.score(plan, count) if prior_model is not None else None
        trial.set_user_attr("fraction", count.fraction)
        trial.set_user_attr("trainable", count.trainable)
        if prior is not None:
            trial.set_user_attr("prior", prior)
        config = {"number": trial.number, "plan": plan.to_dict(), "params": dict(trial.params),
                  "trainable": count.trainable, "fraction": count.fraction, "feasible": count.trainable <= limit,
                  "prior": prior, "warm_start": bool(trial.user_attrs.get("warm_start", False))}
        if not config["feasible"]:  # kept in the study and, through the searcher, in the record
            config["reason"] = f"trains {100 * count.fraction:.3f}% of the parameters, over the budget"
            trial.set_user_attr("reason", config["reason"])
        return config

    try:
        _run_trials(config, meta, run_dir, setup, study, storage, sampler, define_space, remaining, deadline, started, guide)
        summary = finish_run(run_dir, setup, config, space, prior_model is not None)
        if config.confirm > 0:
            _confirm(config, setup, run_dir, summary)
    except KeyboardInterrupt:
        # Ctrl-C that Ray Tune did not absorb: keep what finished (results, best plan, report), then stop.
        finish_run(run_dir, setup, config, space, prior_model is not None)
        _write_report(run_dir, config.progress, interrupted=True)
        raise
    _write_report(run_dir, config.progress)
    if config.progress:
        print(f"search done in {(time.time() - started) / 60:.1f} min", flush=True)
    return run_dir


def _confirm(config: SearchConfig, setup: TrialSetup, run_dir: Path, summary: dict[str, Any]) -> None:
    """The confirmation stage: pre-train the source models of its folds, re-run the best plans and
    the references on test subjects, record and print the result."""
    from autopeft.search.confirm import run_confirmation
    from autopeft.search.results import record_confirmation

    folds = tuple(range(int(config.confirm_folds or 1)))
    seeds = tuple(config.seed + i for i in range(int(config.confirm_seeds or 1)))
    _pretrain_sources(config, replace(setup, folds=folds))
    if config.concurrency and config.concurrency > 1:
        _start_ray(config)
    confirmation = run_confirmation(run_dir, setup, k=config.confirm, folds=folds, seeds=seeds,
                                    concurrency=config.concurrency or 1, cpus=config.cpus_per_trial,
                                    gpus=config.gpus_per_trial, progress=config.progress)
    record_confirmation(run_dir, setup, summary, confirmation)


def _pretrain_task(setup: TrialSetup, source: str, fold: int) -> dict[str, Any]:
    """Ray task: pre-train one source model into the cache; returns its checkpoint metadata."""
    import torch

    from autopeft.search.trial import source_model

    torch.set_num_threads(max(1, setup.threads))
    _, meta = source_model(setup, source, fold)
    return {"best": meta.get("best"), "seconds": meta.get("seconds")}


def _pretrain_sources(config: SearchConfig, setup: TrialSetup) -> None:
    """Pre-train every source model the pairs need, once, before any trial (trials then read the
    cache). Missing models train side by side as Ray tasks, one per trial's resources, when more
    than one is missing and the resources allow; a single one trains here with its progress bar."""
    from autopeft.data import read_manifest
    from autopeft.pretraining import is_pretrained, source_spec
    from autopeft.search.trial import source_model

    units = [(source, fold) for fold in setup.folds for source in sorted({s for s, _ in setup.pairs})]
    manifest = read_manifest(setup.manifest_path)
    missing = [] if setup.weights else [(source, fold) for source, fold in units if not is_pretrained(source_spec(
        setup.backbone, source, manifest=manifest, preset=setup.preset, fold=fold, epochs=setup.pretrain_epochs,
        seed=setup.seed, protocol=setup.make_protocol()))]
    if len(missing) > 1 and (config.concurrency or 1) > 1:
        import ray

        _start_ray(config)
        task = ray.remote(num_cpus=config.cpus_per_trial, num_gpus=config.gpus_per_trial)(_pretrain_task)
        names = ", ".join(f"scanner {s} (fold {f})" for s, f in missing)
        print(f"pre-training {len(missing)} source models side by side (Ray tasks, at most {config.concurrency} at once): {names}",
              flush=True)
        from tqdm.auto import tqdm

        started = time.time()
        pending = {task.remote(setup, source, fold): (source, fold) for source, fold in missing}
        with tqdm(total=len(missing), desc="pre-train source models", unit="model", disable=not config.progress) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=5.0)
                bar.refresh()  # the elapsed time moves while the tasks train
                if not done:
                    continue
                source, fold = pending.pop(done[0])
                best = ray.get(done[0]).get("best") or {}
                bar.update(1)
                bar.write(f"  source model of scanner {source} (fold {fold}) ready after {(time.time() - started) / 60:.1f} min: "
                          f"validation PSNR {best.get('psnr', float('nan')):.3f} dB")
    for source, fold in units:
        source_model(setup, source, fold, progress=config.progress)


def _write_report(run_dir: Path, progress: bool, *, interrupted: bool = False) -> None:
    """``report.html``; a report that cannot be drawn must not lose the search's results, which
    are on disk already, so its error is printed with the command that retries it."""
    from autopeft.report import write_report

    try:
        path = write_report(run_dir)
    except Exception as err:  # noqa: BLE001 - reported to the user, with the retry command
        print(f"report not written ({type(err).__name__}: {err}); retry with: autopeft report {run_dir}", flush=True)
        return
    if progress or interrupted:
        print(f"report: {path}" + (" (search interrupted; continue it with --resume)" if interrupted else ""), flush=True)


def _start_ray(config: SearchConfig) -> None:
    """A local Ray (or the cluster at ``config.address``); with ``config.dashboard`` Ray's
    dashboard on loopback, its URL and how to sign in printed (token auth stays on)."""
    import ray

    if ray.is_initialized():
        return
    options: dict[str, Any] = {"include_dashboard": config.dashboard}
    if config.dashboard:
        options["dashboard_host"] = "127.0.0.1"  # this machine only; forward the port with ssh -L
    context = ray.init(address=config.address, log_to_driver=False, configure_logging=False,
                       **options, **({} if config.address else {"num_cpus": os.cpu_count()}))
    if config.dashboard:
        url = getattr(context, "dashboard_url", None)
        if not url:
            print("Ray dashboard: not available (install ray[default] for it).", flush=True)
            return
        url = url if url.startswith("http") else f"http://{url}"
        if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
            auth = "token authentication is disabled (RAY_AUTH_MODE=disabled)"
        else:
            auth = ("it asks for a token: paste the contents of ~/.ray/auth_token (the cluster's token; "
                    "scripts send 'Authorization: Bearer <token>')")
        print(f"Ray dashboard: {url}/ ; {auth}", flush=True)


def _run_trials(config: SearchConfig, meta: dict[str, Any], run_dir: Path, setup: TrialSetup, study, storage, sampler,
                define_space, remaining: int, deadline: float | None, started: float, guide=None) -> None:
    """Ray Tune over the remaining trials (nothing when none remain)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from autopeft.search._searcher import StudySearcher

    if remaining <= 0:
        return
    _start_ray(config)
    progress_cb, limiter_cls = _ray_helpers(run_dir, config.trials, deadline, started, config.progress)
    multi = config.objective == "multi"
    # The objective: the mean validation PSNR gain over No-FT, per pair; PSNR is kept beside it.
    metric, mode = (["gain", "fraction"], ["max", "min"]) if multi else ("gain", "max")

    def infeasible(trial_config: dict[str, Any]) -> None:
        record = new_record(trial_config, setup, state=INFEASIBLE, reason=trial_config["reason"])
        write_record(run_dir, trial_config["number"], record)
        if config.progress:
            progress_cb.line(record)

    max_infeasible = MAX_INFEASIBLE_DRAWS_PER_TRIAL * remaining
    searcher = StudySearcher(study, define_space, metric=metric, mode=mode, max_infeasible=max_infeasible,
                             on_infeasible=infeasible, guide=guide)
    search_alg = limiter_cls(searcher, max_concurrent=config.concurrency, deadline_at=deadline, wanted=remaining)
    units = len(setup.units)
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=units, grace_period=1, reduction_factor=2)
                 if config.asha and not multi and units > 1 else FIFOScheduler())
    resources = {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial}
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_trainable, setup=setup), resources),
        # The limiter ends the run (plans launched, deadline); this is the most trials it allows.
        tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, num_samples=remaining, reuse_actors=True,
                                    **({} if multi else {"metric": metric, "mode": mode})),
        run_config=tune.RunConfig(
            name=f"tune-{meta['sessions']}", storage_path=str(run_dir / "ray"), verbose=0,
            callbacks=[progress_cb], failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    phase_started = time.time()
    tuner.fit()
    _record_slots(run_dir, config, phase_started, time.time())
    if searcher.gave_up:
        print(f"stopping: {searcher.infeasible} plans drawn over the budget; raise the budget or narrow the space "
              "(see 'autopeft space --budget ... --sample N')", flush=True)


def _record_slots(run_dir: Path, config: SearchConfig, phase_started: float, phase_ended: float) -> None:
    """Slot utilisation of this session's trial phase: trial seconds over slots x wall time."""
    busy = 0.0
    for record in records(run_dir):
        begin, seconds = float(record.get("started") or 0.0), float(record.get("seconds") or 0.0)
        if record.get("state") != INFEASIBLE and begin >= phase_started:
            busy += min(seconds, max(phase_ended - begin, 0.0))
    wall = max(phase_ended - phase_started, 1e-9)
    slots = {"concurrency": config.concurrency, "phase_seconds": round(wall, 1), "trial_seconds": round(busy, 1),
             "busy_share": busy / (wall * max(config.concurrency or 1, 1))}
    path = run_dir / "slots.json"
    sessions = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
    atomic_write_text(path, json.dumps(sessions + [slots], indent=1))
    if config.progress:
        print(f"trial slots {100 * slots['busy_share']:.0f}% busy over the trial phase ({slots['phase_seconds'] / 60:.1f} min, "
              f"{config.concurrency} slot(s))", flush=True)
