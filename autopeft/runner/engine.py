"""The search engine: Ray Tune runs trials, Optuna samples plans, ASHA stops weak trials early.

Flow of :func:`run_search`, one unit per step:

1. open the session (:mod:`~autopeft.runner._session`): join Ray (local, or the cluster at
   ``address``), settle the configuration for where the trials run (tiny preset on CPUs, paper on
   GPUs; concurrency from ``ray.cluster_resources()``) and write ``<run>/run.json``;
2. on a cluster, check that every node able to run a trial reads the storage path and the scans
   (:mod:`~autopeft.runner._cluster`), shipping the scans through the artifact store if not;
3. have every source model once, before any trial (:mod:`~autopeft.runner._sources`: Ray tasks,
   put in the artifact store for the other nodes);
4. open the Optuna study in ``<run>/study.db``; on a first session enqueue the baseline portfolio
   (:mod:`~autopeft.search.portfolio`: PETITE's Table-1 rows that fit the budget, each at a
   learning-rate ladder), then the plans with the best importance prior
   (:mod:`~autopeft.search._plans`); on a resumed one the interrupted plans again;
5. fine-tune the reference plans (No-FT always: its per-pair validation PSNR is the baseline of
   the objective; Full-FT, its learning rate chosen on validation from a ladder, and PETITE's
   plan as published, for the results table);
6. run the trials through Ray Tune (:mod:`~autopeft.runner._tune`): the objective is the mean
   validation PSNR gain over No-FT, ASHA stops on the pair-epochs (or pairs) done, the driver's
   callback keeps the records and weights;
7. finish: ``results.csv``, ``best_plan.yaml`` (with the margin over the best baseline), the
   Pareto plans and best weights, the confirmation of the ``confirm`` best plans and the best
   baseline on test subjects with fine-tuning seeds the search never trained with
   (:mod:`~autopeft.runner.confirm`), an exact replay of the recommended trial as a
   reproducibility check, and the example slices. What is written up from the records (results,
   best plan, tables, example slices) goes through the caller's :class:`RunOutputs`
   (:class:`autopeft.report.SearchOutputs`), and ``report.html`` is drawn from the run directory by
   the caller (``autopeft search`` does): the report sits above the runner.

Everything before the confirmation sees validation subjects only. The run directory is written by
this process only (:mod:`autopeft.runs`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from ray.tune.schedulers import ASHAScheduler

from autopeft.artifacts import ArtifactStore, is_uri
from autopeft.backbones import build_backbone
from autopeft.backbones.network import load_run_network, registered_ref, save_run_network
from autopeft.data import resolve_manifest
from autopeft.errors import ConfigError
from autopeft.peft import named_plans
from autopeft.runner._cluster import Cluster, check_nodes, start_ray, task_options, trial_resources, tune_resources
from autopeft.runner._session import Session, open_session, open_study, requeue_interrupted
from autopeft.runner._sources import prepare_sources, publish_importance
from autopeft.runner._tune import TuneRun, run_trials, scheduler_for
from autopeft.runner.confirm import confirmation_seeds, replay_check, run_confirmation
from autopeft.runner.references import run_references
from autopeft.runner.trial import TrialSetup, setup_from_config
from autopeft.runs import INFEASIBLE, TERMINAL, records
from autopeft.search._plans import plan_definer, warm_start
from autopeft.search.auto_space import AUTO_SPACES
from autopeft.search.budget import Budget, PlanCounter
from autopeft.search.config import SearchConfig, resolve_defaults
from autopeft.search.options import default_prior_beta
from autopeft.search.portfolio import enqueue_portfolio, portfolio, table1_plans
from autopeft.search.priors import PriorGuide
from autopeft.search.sampler import make_sampler, search_seed
from autopeft.search.signals import prior_for
from autopeft.search.space import load_space

__all__ = ["RunOutputs", "SearchInterrupted", "run_search"]

_ARTIFACTS = "autopeft-artifacts"  # the artifact store's folder under a --storage-path


class RunOutputs(Protocol):
    """What a search writes up from its records at its end, handed to :func:`run_search` by the
    layer above (:class:`autopeft.report.SearchOutputs`): the runner trains and records, and never
    imports the report."""

    def finish(self, run_dir: Path, setup: TrialSetup, config: SearchConfig, prior: Mapping[str, Any] | None) -> dict[str, Any]:
        """Results chosen on validation (results.csv, best_plan.yaml, pareto/, best_weights/,
        summary.json, which records ``prior``: the prior signal and its own cost, None without
        priors); returns the summary."""
        ...

    def confirmed(self, run_dir: Path, setup: TrialSetup, summary: dict[str, Any], confirmation: Mapping[str, Any]) -> None:
        """The confirmation on test subjects added to the results and printed."""
        ...

    def examples(self, run_dir: Path, setup: TrialSetup, best: Mapping[str, Any] | None, *, split: str) -> Any:
        """The report's example slices of the best plan on one ``split`` subject."""
        ...


def run_search(config: SearchConfig | None = None, *, outputs: RunOutputs, resume_dir: str | os.PathLike | None = None,
               trials: int | None = None, time_budget_s: float | None = None) -> Path:
    """Run (or resume) a search; returns the run directory.

    Args:
        config: the settings of a new search (ignored when resuming).
        outputs: what writes the results up from the records (:class:`autopeft.report.SearchOutputs`).
        resume_dir: a run directory to continue; its ``run.json`` gives the settings.
        trials: when resuming, a new total number of trials. Defaults to the recorded one.
        time_budget_s: when resuming, a new limit on launching trials. Defaults to the recorded one.
    """
    started = time.time()

    def resolve(new: SearchConfig) -> SearchConfig:
        start_ray(new)
        return resolve_defaults(new, cluster_gpus=Cluster.read().gpus if new.address else None)

    if resume_dir is not None:
        load_run_network(resume_dir)  # a user's network by reference: registered before any look-up
    session = open_session(config, resume_dir, trials=trials, time_budget_s=time_budget_s, resolve=resolve)
    config = session.config
    plans = _PlanSpace.load(config)
    start_ray(config)
    cluster = Cluster.read()
    run_dir = session.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_run_network(run_dir, config.backbone, config.preset)
    budget = Budget.parse(config.budget)
    manifest_path = str(resolve_manifest(config.data, progress=config.progress))
    config.data = config.data or None
    if config.concurrency is None:
        config.concurrency = max(1, cluster.slots(trial_resources(config)))
    session.save()

    default_storage = config.storage_path is None
    storage = str(run_dir / "ray") if default_storage else _storage(config.storage_path)
    setup = _trial_setup(config, manifest_path, run_dir, artifacts=None if default_storage else f"{storage}/{_ARTIFACTS}")
    _print_settings(config, setup, budget, plans.counter.total, run_dir, session.resumed, cluster, storage,
                    space=plans.space)
    if config.address:
        setup = _reach_nodes(config, cluster, setup, storage, default_storage)
    return _search(session, setup, plans, budget, storage, started, outputs)


@dataclass(frozen=True)
class _PlanSpace:
    """The backbone the plans are counted on, the search space, and the counter."""

    template: Any
    space: Any
    counter: Any

    @classmethod
    def load(cls, config: SearchConfig) -> _PlanSpace:
        template = build_backbone(config.backbone, config.preset)
        space = load_space(config.space, template.sites(), model=template)
        if space.backbone != config.backbone:
            raise ConfigError(f"`space` {config.space} is written for {space.backbone!r}, but `backbone` is {config.backbone!r}.")
        return cls(template, space, PlanCounter(template))


def _storage(path: str) -> str:
    return path.rstrip("/") if is_uri(path) else str(Path(path).expanduser().resolve())


def _trial_setup(config: SearchConfig, manifest_path: str, run_dir: Path, *, artifacts: str | None) -> TrialSetup:
    ref = registered_ref(config.backbone, config.preset)
    # Trials never pre-train: the driver has put every source model in the store before they start.
    return replace(setup_from_config(asdict(config), manifest_path=manifest_path, run_dir=run_dir),
                   artifacts=artifacts, pretrain=False, network=ref.to_json() if ref is not None else None)


def _reach_nodes(config: SearchConfig, cluster, setup: TrialSetup, storage: str, default_storage: bool) -> TrialSetup:
    """The nodes that can run a trial read the storage and the scans, or the scans are shipped."""
    if not check_nodes(cluster, config, storage=storage, default_storage=default_storage, manifest_path=setup.manifest_path):
        return setup
    key = ArtifactStore(setup.artifacts).put_data(setup.manifest_path)
    print(f"  some Ray nodes cannot read the scans: shipped once to {setup.artifacts}/{key}", flush=True)
    return replace(setup, data_key=key)


def _search(session: Session, setup: TrialSetup, plans: _PlanSpace, budget: Budget, storage: str, started: float,
            outputs: RunOutputs) -> Path:
    """Steps 3 to 7 of the module docstring."""
    config, run_dir = session.config, session.run_dir
    _prepare_sources(config, setup)
    study = open_study(session)
    train_extra = {"epochs": int(config.epochs)}
    prior_model, guide = _prior_and_guide(session, setup, plans, budget, train_extra)
    publish_importance(setup)
    baselines = _seed_study(session, study, plans, budget, prior_model, train_extra)
    setup = replace(setup, baseline=_baseline(_references(config, setup, run_dir)))
    space, counter = plans.space, plans.counter

    # --trials counts plans that train: over-budget draws are recorded but cost nothing.
    done = sum(r.get("state") in TERMINAL and r.get("state") != INFEASIBLE for r in records(run_dir))
    # The time budget counts from the start of this session, pre-training and references included,
    # so that it bounds what a user waits for; the limiter still launches one wave of trials.
    deadline = started + config.time_budget_s if config.time_budget_s else None
    define = plan_definer(space, counter, budget, prior_model, train=train_extra, portfolio=baselines)
    # What the prior cost to make counts with the trials' cost when searches are compared.
    prior = None if prior_model is None else {"signal": config.prior_signal,
                                              "pair_epochs": float(getattr(prior_model, "cost", 0.0))}
    name = f"tune-{session.number}" if config.storage_path is None else f"{session.meta['study_name']}-{session.number}"
    try:
        run_trials(TuneRun(config=config, run_dir=run_dir, storage=storage, name=name, setup=setup, study=study,
                           define=define, remaining=max(config.trials - done, 0), deadline=deadline, started=started,
                           resources=tune_resources(config), guide=guide))
        summary = outputs.finish(run_dir, setup, config, prior)
        if config.confirm > 0:
            _confirm(config, setup, run_dir, summary, outputs)
        _examples(run_dir, setup, summary, outputs, confirmed=config.confirm > 0)
    except KeyboardInterrupt as interrupt:
        # Ctrl-C that Ray Tune did not absorb: keep what finished (results, best plan), then stop,
        # saying where the run is so that the caller can draw its report.
        outputs.finish(run_dir, setup, config, prior)
        raise SearchInterrupted(run_dir) from interrupt
    if config.progress:
        print(f"search done in {(time.time() - started) / 60:.1f} min", flush=True)
    return run_dir


def _prepare_sources(config: SearchConfig, setup: TrialSetup) -> None:
    """Step 3: every source model the search and its confirmation need, before any trial.

    Args:
        config: the search's settings.
        setup: the trials' settings.
    """
    protocol = setup.protocol
    if config.confirm > 0 and (config.confirm_folds or 1) > protocol.folds:
        raise ConfigError(f"`confirm_folds` ({config.confirm_folds}) must be at most the protocol's {protocol.folds} folds.")
    # The confirmation's folds too, now: their pre-training then counts against the time budget
    # (which bounds the whole wait) instead of coming on top of it at the end.
    folds = tuple(sorted(set(setup.folds) | set(_confirm_folds(config) if config.confirm > 0 else ())))
    prepare_sources(config, replace(setup, folds=folds), options=task_options(config), progress=config.progress)


def _prior_and_guide(session: Session, setup: TrialSetup, plans: _PlanSpace, budget: Budget,
                     train_extra: dict[str, Any]) -> tuple[Any, PriorGuide | None]:
    """Step 4, the prior: the prior signal's model (None without priors), and the guide that lets it
    pick among the sampler's draws (None unless ``prior_candidates`` > 1).

    Args:
        session: the search's session.
        setup: the trials' settings.
        plans: the backbone, space and counter.
        budget: the trainable-parameter budget.
        train_extra: training settings every plan carries (epochs).
    """
    config = session.config
    prior_model = prior_for(config.prior_signal, setup, plans.template, plans.counter, plans.space) if config.priors else None
    if prior_model is not None and config.progress and getattr(prior_model, "cost", 0):
        print(f"prior {config.prior_signal}: {prior_model.cost:g} pair-epochs spent scoring (cached for later searches)",
              flush=True)
    if prior_model is None or config.prior_candidates <= 1:
        return prior_model, None
    # A run.json written before the fading has no prior_beta: the declared default then.
    beta = config.prior_beta if config.prior_beta is not None else default_prior_beta(config.trials)
    guide = PriorGuide(plans.space, prior_model, budget, make_sampler=lambda seed: make_sampler(config, seed), beta=beta,
                       candidates=config.prior_candidates, seed=search_seed(config) + session.number, train=train_extra)
    return prior_model, guide


def _seed_study(session: Session, study: Any, plans: _PlanSpace, budget: Budget, prior_model: Any,
                train_extra: dict[str, Any]) -> list[Any]:
    """Step 4, the study's first trials: on a first session the baseline portfolio, then the prior's
    warm start; on a resumed one, the interrupted trials again.

    Args:
        session: the search's session.
        study: its Optuna study.
        plans: the backbone, space and counter.
        budget: the trainable-parameter budget.
        prior_model: the prior signal's model, or None.
        train_extra: training settings every plan carries (epochs).

    Returns:
        The baseline portfolio (empty without ``portfolio``), which the plan definer also needs.
    """
    config = session.config
    baselines = portfolio(plans.space, plans.counter, budget, train=train_extra) if config.portfolio else []
    if not session.resumed:
        enqueue_portfolio(study, baselines)  # first: every later plan is judged against them
        if config.progress and baselines:
            print(f"baseline portfolio: {len(baselines)} trials first, PETITE's Table-1 rows within the budget at "
                  f"learning rates {', '.join(f'{lr:.2g}' for lr in sorted({e.lr for e in baselines}))}: "
                  f"{', '.join(sorted({e.label for e in baselines}))}", flush=True)
        elif config.progress and config.portfolio and not table1_plans(config.backbone):
            print(f"baseline portfolio: skipped, PETITE's Table-1 rows are plans named for unetr and cvtgan, and "
                  f"{config.backbone} has none (the references No-FT and Full-FT still run)", flush=True)
    if not session.resumed and config.priors:
        warm_start(study, plans.space, prior_model, budget, config, preset_lr=plans.template.preset.finetune.lr_peft,
                   train=train_extra)
    if session.resumed:
        requeue_interrupted(session.run_dir, study)
    return baselines


def _references(config: SearchConfig, setup: TrialSetup, run_dir: Path) -> list[dict[str, Any]]:
    """Step 5: the reference plans' rows. No-FT always runs (it only evaluates): its per-pair
    validation PSNR is the baseline of the objective, the gain over No-FT. Full-FT and PETITE's plan
    run with references on.

    Args:
        config: the search's settings.
        setup: the trials' settings.
        run_dir: the run's folder.
    """
    references_file = run_dir / "references.json"
    if references_file.is_file():  # a resumed search reuses its references
        return json.loads(references_file.read_text(encoding="utf-8"))
    return run_references(setup, config, run_dir, task_options=task_options(config))


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C during a search, after its finished trials were written up; ``run_dir`` says where
    (continue with ``run_search(resume_dir=run_dir)``)."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(str(run_dir))
        self.run_dir = run_dir


def _baseline(rows: list[dict[str, Any]]) -> tuple[tuple[str, str, int, float], ...]:
    """No-FT's validation PSNR per (source, target, fold), from the references' rows."""
    no_ft = next(row for row in rows if row["label"] == "No-FT")
    return tuple((p["source"], p["target"], int(p["fold"]), float(p["psnr"])) for p in no_ft["pairs"])


def _confirm_folds(config: SearchConfig) -> tuple[int, ...]:
    return tuple(range(int(config.confirm_folds or 1)))


def _confirm(config: SearchConfig, setup: TrialSetup, run_dir: Path, summary: dict[str, Any], outputs: RunOutputs) -> None:
    """The confirmation stage: the best plans, the best baseline and the references re-run on test
    subjects (their source models were pre-trained before the trials); recorded and printed."""
    seeds = confirmation_seeds(config.seed, int(config.confirm_seeds or 1))
    # --concurrency 1 keeps it in this process; else Ray runs what a trial's resources let fit.
    confirmation = run_confirmation(run_dir, setup, k=config.confirm, folds=_confirm_folds(config), seeds=seeds,
                                    parallel=(config.concurrency or 1) > 1, task_options=task_options(config),
                                    progress=config.progress)
    if confirmation.get("recommended") is not None:
        replay = replay_check(run_dir, setup, confirmation["recommended"]["number"])
        confirmation["replay"] = replay
        if replay is not None and config.progress:
            print(f"reproducibility check (not a reported figure): trial #{replay['number']} replayed with its own seed on "
                  f"validation, fold 0: {replay['replayed_psnr']:.3f} dB vs {replay['recorded_psnr']:.3f} dB recorded "
                  f"(largest pair difference {replay['max_abs_diff_db']:.4f} dB)", flush=True)
    outputs.confirmed(run_dir, setup, summary, confirmation)


def _examples(run_dir: Path, setup: TrialSetup, summary: dict[str, Any], outputs: RunOutputs, *, confirmed: bool) -> None:
    """The report's example slices: a test subject once the confirmation has read them, else a
    validation one (nothing before the confirmation reads test subjects)."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    outputs.examples(run_dir, setup, summary.get("best"), split="test" if confirmed else "val")


def _print_settings(config: SearchConfig, setup: TrialSetup, budget: Budget, total: int, run_dir: Path, resumed: bool,
                    cluster, storage: str, space: Any = None) -> None:
    print(("resuming" if resumed else "search") + f" in {run_dir}")
    generated = f" ({space.source})" if space is not None and space.source.startswith(AUTO_SPACES) else ""
    print(f"  backbone {config.backbone}/{config.preset} on {config.device}; space {config.space}{generated}; budget {budget.describe(total)}")
    print(f"  scanners {', '.join(config.scanners)}: {len(setup.pairs)} source->target pairs x {config.folds} fold(s), "
          f"{config.epochs} fine-tuning epochs each; protocol {setup.protocol}")
    limit = f"no trial launched after {config.time_budget_s / 60:.1f} min" if config.time_budget_s else "no time limit"
    asha = isinstance(scheduler_for(config, setup)[0], ASHAScheduler)
    priors = "off" if not config.priors else f"{config.prior_signal} (pick among {config.prior_candidates} draws" + (
        f", beta {config.prior_beta:g})" if config.prior_beta is not None else ")")
    print(f"  {config.trials} trials, {config.objective}-objective, sampler {config.sampler}, priors {priors}, "
          f"ASHA {'on ' + config.fidelity if asha else 'off'}, {limit}")
    extra = "".join(f", {amount:g} {name}" for name, amount in config.trial_resources.items())
    print(f"  Ray {'cluster ' + config.address if config.address else 'on this machine'}: {cluster.describe()}; "
          f"{config.cpus_per_trial:g} CPU and {config.gpus_per_trial:g} GPU{extra} per trial, at most {config.concurrency} at once, "
          f"{config.max_failures} retries of a trial whose node dies; storage {storage}")
    protocol = setup.protocol
    print(f"  subjects per target: {protocol.finetune_train} fine-tune, {protocol.finetune_val} validation (trials and every "
          f"choice), {protocol.finetune_test} test (read only by the confirmation)")
    if config.confirm:
        baseline = " + the best Table-1 row (lr tuned)" if config.portfolio and table1_plans(config.backbone) else ""
        petite = ", PETITE (as published)" if f"petite-{config.backbone}" in named_plans() else ""
        seeds = ", ".join(map(str, confirmation_seeds(config.seed, int(config.confirm_seeds or 1))))
        print(f"  then: the {config.confirm} best plans by validation{baseline} + No-FT, Full-FT (lr tuned){petite} "
              f"re-run on test subjects over {config.confirm_folds or 1} fold(s) x fine-tuning seed(s) {seeds}")
    else:
        print("  no confirmation on test subjects (--confirm 0): every figure is on validation subjects, in-sample")
