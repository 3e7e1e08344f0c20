"""Search how to fine-tune a backbone for new scanners under a parameter budget.

The search first trains its baseline portfolio: each of PETITE's Table-1 rows that fits the budget
(LayerNorm, BitFit, LoRA, Adapters, SSF, VPT, PETITE's winner) at 3 learning rates spanning the
space's range, as ordinary trials (--no-portfolio skips them): the obvious hand-made answer, tuned
as the search is, which the search must beat. Each later trial samples a plan from the search
space (Optuna TPE inside Ray Tune), fine-tunes it from
the cached pre-trained source model on every (source -> target) pair of the chosen scanners and
scores the targets' validation subjects; ASHA stops weak trials early, judged on the pair-epochs
they trained (--fidelity pairs: after each pair). Every choice
(scheduler, sampler, priors, best plan, Pareto front) sees validation subjects only. At the end the
--confirm best plans, the best Table-1 row (lr tuned) and the references (No-FT; Full-FT, its
learning rate chosen on validation from 3; PETITE's plan as published) are re-run from scratch on
every pair x fold x fine-tuning seed (seeds the search never trained with) and scored on the
targets' test subjects, which nothing read before: the final table gives test PSNR/SSIM/NRMSE as
mean [95% CI] (bootstrap over folds, then subjects) and paired differences against Full-FT,
PETITE and the best Table-1 row on the same subjects (Wilcoxon signed-rank p). Plans over the
budget never train (recorded as infeasible). An importance prior (--priors on: squared gradients
of the source model on the target's training scans) picks the first plans and, for every later
trial, one of --prior-candidates draws of the sampler, favouring the best-scored the more strongly
the fewer trials have finished (--prior-beta). Priors are off by default: on the lab's three fresh
scenarios no signal helped on every one (docs/lab.md). Without flags beyond --backbone and --budget it uses the built-in
simulated data and, on a CPU, the tiny preset with a run sized to end within about 20 minutes on
2 cores; on a GPU the paper preset. It prints what it chose.

outputs (in --out, default runs/<backbone>-<time>):
  report.html       the study report (written at the end and on Ctrl-C; 'autopeft report' rewrites it)
  study.db          the Optuna study (SQLite; 'autopeft dashboard RUN_DIR' serves it)
  results.csv       one row per trial: state, fidelity reached, plan, % params, validation PSNR/SSIM/NRMSE
  confirmation.csv  per test subject: plan, pair, fold, seed, PSNR/SSIM/NRMSE; summary.json: the CIs and tests
  best_plan.yaml    the recommended plan and why ('autopeft finetune --plan' and apply_plan read it)
  pareto/           plans on the PSNR vs % params front; best_weights/: its trained parts per pair
  trials/           one JSON record per trial (states: FINISHED, STOPPED early, FAILED, INFEASIBLE), written by
                    this process only: trials on other Ray nodes hand their results back through Ray
  weights/          each trial's trained parts; examples/: the report's example slices
  ray/              Ray Tune's storage, unless --storage-path (needed on a cluster of several machines)

examples:
  autopeft search --backbone unetr --budget 1%
  autopeft search --backbone cvtgan --budget 0.5% --trials 40 --time-budget 30m --objective multi
  autopeft search --resume runs/unetr-20250101-120000        # after Ctrl-C or a killed process
  autopeft search --backbone unetr --budget 1% --dashboard   # Ray's dashboard on 127.0.0.1:8265
  autopeft search --backbone unetr --budget 1% --address auto --gpus-per-trial 0.5 \
      --storage-path /shared/autopeft                          # on a Ray cluster (see README: Running on a cluster)
  autopeft search --backbone unetr --budget 1% --data data/mybids --weights unetr_mct.pt --source "Biograph mCT"
  autopeft search --backbone monai:BasicUNet --net-args '{"features": [8, 8, 16, 16, 32, 8]}' --budget 1%
  autopeft search --backbone bundle:my_bundle --weights my_bundle --source 1 --budget 1%

With --data the default scanners are the data's own: all of them on a GPU, on a CPU the two with
the most subjects (printed with the reason). --weights FILE_OR_DIR --source S starts from your own
model pre-trained on scanner S (no pre-training) and searches the pairs S -> every other scanner.
"""

from __future__ import annotations

import argparse

from autopeft.cli._common import ArgumentGroup, add_amp_argument, add_network_arguments, add_weights_argument


def configure(parser: argparse.ArgumentParser) -> None:
    _what_to_search(parser.add_argument_group("what to search"))
    _strategy(parser.add_argument_group("search strategy"))
    _data_and_models(parser.add_argument_group("data and models"))
    _confirmation(parser.add_argument_group("references and confirmation (test subjects)"))
    _execution(parser.add_argument_group("resources, cluster and display"))
    add_network_arguments(parser)


def _what_to_search(group: ArgumentGroup) -> None:
    group.add_argument("--backbone", help="registered backbone (see 'autopeft backbones'); required unless --resume")
    group.add_argument("--budget", help="parameter budget: 1%%, 0.005 or 250k; required unless --resume")
    group.add_argument("--preset", default=None, help="backbone preset (default: paper on a GPU, tiny on a CPU)")
    group.add_argument("--space", default=None, help="search space: a shipped name (unetr, cvtgan; per block: unetr-blocks, cvtgan-blocks), a YAML file, or one generated from the sites: auto-grouped, auto-blocks (default: <backbone>, else auto-grouped)")
    group.add_argument("--scanners", default=None, help="comma-separated scanner ids; every ordered pair is used (default: the data's own: all on a GPU, the two with the most subjects on a CPU; built-in data: 1,5 on CPU)")
    group.add_argument("--trials", type=int, default=None, help="plans to train; plans drawn over the budget are recorded but not counted (default: 48 on CPU, 64 on GPU)")
    group.add_argument("--time-budget", default=None, help="launch no trial after this long from the start (pre-training included; running trials finish): 30m, 2h, 900s (default: 15m on CPU when --trials is not given)")
    group.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs per pair (default: the preset's)")
    group.add_argument("--folds", type=int, default=1, help="cross-validation folds each pair runs on")
    group.add_argument("--seed", type=int, default=0, help="seeds splits, crops, initialisation and the sampler")
    group.add_argument("--out", default=None, help="run directory (default: runs/<backbone>-<time>)")
    group.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted search in RUN_DIR")
    group.add_argument("--objective", default="single", choices=("single", "multi"), help="single: max mean validation PSNR gain over No-FT; multi: that gain vs %% params Pareto front")


def _strategy(group: ArgumentGroup) -> None:
    from autopeft.search.options import (
        DEFAULT_FIDELITY, DEFAULT_PRIOR_SIGNAL, FIDELITIES, PRIOR_BETA_PER_TRIAL, PRIOR_CANDIDATES, PRIOR_SIGNALS, SAMPLERS,
    )

    group.add_argument("--sampler", default="tpe", choices=SAMPLERS, help="Optuna sampler: TPE, a Gaussian process (GPSampler) or random search")
    group.add_argument("--priors", default="off", choices=("on", "off", *PRIOR_SIGNALS),
                        help="importance priors: the warm start, then a pick among --prior-candidates draws of the sampler "
                             "for every trial. Signals: sensitivity: squared gradients of the source weights (SPT/GPS); "
                             "shpeft: SH-PEFT's hybrid importance; gradient: gradient energy reaching each candidate "
                             "(block, method) module at injection; audit: each candidate's validation-PSNR drop when "
                             "switched off after a brief fine-tuning (costs about one ASHA rung per method and pair); "
                             f"count, early: baselines (bigger plans; early blocks first). on: {DEFAULT_PRIOR_SIGNAL}. "
                             "off (the default): the sampler alone, the Table-1 portfolio first. Off because no signal met the "
                             "lab's declared rule: replayed 100 times on each of three fresh lab scenarios (validation regret, "
                             "paired against priors off), the best, sensitivity, shortened the regret area by 1%% pooled "
                             "(95%% CI 0.4 to 2%%; 2.5%% on UNETR) but lengthened it on cvtgan-3-5-d3 (by 2%%); gradient and "
                             "audit lengthened it by about 10%% (mostly their own cost), shpeft, count and early by 0 to 3%%. "
                             "A noisy oracle prior helps (3%% pooled). Held out, with the real engine (10 paired seeds, test), "
                             "sensitivity did not help either (area 11%% and 5%% longer, CIs across 0); see docs/lab.md")
    group.add_argument("--prior-candidates", type=int, default=PRIOR_CANDIDATES,
                        help="sampler draws per trial among which the prior picks (1: the prior only warm-starts). "
                             "Default: %(default)s")
    group.add_argument("--prior-beta", type=float, default=None, metavar="BETA",
                        help="how strongly the prior picks among the draws, fading as trials finish: a draw is picked with "
                             "probability proportional to exp(BETA / n * z), z its prior's rank as a normal score among the "
                             "draws, n the trials finished. 0: the sampler's choice alone; large: the best prior while n "
                             f"is small. Default: trials x {PRIOR_BETA_PER_TRIAL:g} (piBO's), declared before any lab run, not tuned")
    group.add_argument("--warm-start", type=int, default=None, help="plans enqueued first by prior (default: trials/4, 2 to 8)")
    group.add_argument("--no-asha", action="store_true", help="let every trial run all its pairs")
    group.add_argument("--fidelity", default=DEFAULT_FIDELITY, choices=FIDELITIES,
                        help="what ASHA judges trials on: epochs (pair-epochs; trials also score mid-pair at ASHA's rungs) or pairs "
                             "(after each pair; every trial trains the pairs in the same order). Default: %(default)s")


def _data_and_models(group: ArgumentGroup) -> None:
    group.add_argument("--data", default=None, help="a directory with manifest.csv, or the CSV (default: built-in simulated data)")
    add_weights_argument(group)
    group.add_argument("--source", default=None, help="with --weights: the scanner your model was pre-trained on; the pairs are it -> every other scanner")
    group.add_argument("--pretrain-epochs", type=int, default=None, help="epochs of the source models (default: the preset's)")


def _confirmation(group: ArgumentGroup) -> None:
    group.add_argument("--no-references", action="store_true", help="skip the No-FT / Full-FT / PETITE reference rows")
    group.add_argument("--no-portfolio", action="store_true",
                        help="skip the baseline portfolio (PETITE's Table-1 rows within the budget at 3 learning rates, "
                             "trained first)")
    group.add_argument("--confirm", type=int, default=3, metavar="K",
                        help="re-run the K best plans by validation and the references on test subjects at the end; 0 skips it (default: 3)")
    group.add_argument("--confirm-folds", type=int, default=None, metavar="N",
                        help="folds the confirmation re-runs on (default: 3 on a GPU, 2 on a CPU, or --folds if more)")
    group.add_argument("--confirm-seeds", type=int, default=None, metavar="N",
                        help="fine-tuning seeds per fold in the confirmation, from --seed + 1 on: none that the search "
                             "trained with (default: 3 on a GPU, 2 on a CPU)")


def _execution(group: ArgumentGroup) -> None:
    group.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (also its torch threads)")
    group.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial, fractions allowed (default: 1 when a GPU is found)")
    group.add_argument("--concurrency", type=int, default=None, help="trials at once (default: what the resources allow); 1 also runs the confirmation in this process, one job at a time, otherwise the confirmation runs as many jobs at once as the resources allow")
    group.add_argument("--address", default=None, help="join a Ray cluster ('auto', or HEAD:6379); default: a local Ray")
    group.add_argument("--storage-path", default=None, metavar="DIR_OR_URI",
                        help="Ray Tune's storage and the shared artifacts (source models, importance maps, shipped scans): a "
                        "folder every node mounts, or a URI such as s3://bucket/path (default: RUN_DIR/ray, one machine only)")
    group.add_argument("--trial-resources", default=None, metavar="JSON",
                        help="custom Ray resources each trial asks for, e.g. '{\"autopeft_worker\": 1}' to keep trials on the "
                        "nodes started with --resources '{\"autopeft_worker\": N}'")
    group.add_argument("--max-failures", type=int, default=2,
                        help="retries of a trial whose worker process or node dies (it goes on from its last pair)")
    group.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    add_amp_argument(group, what="pre-training, trials, references and confirmation (kept on --resume)")
    group.add_argument("--quiet", action="store_true", help="no progress bars")
    group.add_argument("--dashboard", action="store_true",
                        help="start Ray's dashboard on 127.0.0.1 and print its URL (sign in with the token in ~/.ray/auth_token)")


def run(args: argparse.Namespace) -> int:
    from autopeft.cli._flags import flag_errors, flags_of
    from autopeft.errors import ConfigError
    from autopeft.search import Budget
    from autopeft.report import SearchOutputs
    from autopeft.runner import run_search
    from autopeft.search.config import SearchConfig, parse_duration

    flags = flags_of(SearchConfig, time_budget_s="--time-budget", references="--no-references", portfolio="--no-portfolio", asha="--no-asha",
                     progress="--quiet", prior_signal="--priors", resume_dir="--resume")
    with flag_errors(flags):  # the settings' own checks, named by their flags
        time_budget = parse_duration(args.time_budget)
        if args.resume:
            _with_report(lambda: run_search(resume_dir=args.resume, trials=args.trials, time_budget_s=time_budget,
                                            outputs=SearchOutputs()),
                         progress=not args.quiet)
            return 0
        if not args.backbone or not args.budget:
            raise ConfigError("--backbone and --budget are required for a new search (or give --resume RUN_DIR).")
        Budget.parse(args.budget)
        from autopeft.cli._common import resolve_backbone

        args.backbone, args.preset = resolve_backbone(args, on_data=True)  # its settings printed, --quiet or not
        # The engine fills the defaults once it knows the cluster's resources (GPUs may be elsewhere).
        config = _config(args, time_budget)
        _with_report(lambda: run_search(config, outputs=SearchOutputs()), progress=not args.quiet)
    return 0


def _with_report(search, *, progress: bool) -> None:
    """Run ``search`` and draw its run's ``report.html``, also after Ctrl-C. A report that cannot
    be drawn loses nothing (the results are on disk): its error is printed with the retry command."""
    from autopeft.report import write_report
    from autopeft.runner import SearchInterrupted

    def draw(run_dir, interrupted: bool) -> None:
        try:
            path = write_report(run_dir)
        except Exception as err:  # noqa: BLE001 - reported to the user, with the retry command
            print(f"report not written ({type(err).__name__}: {err}); retry with: autopeft report {run_dir}", flush=True)
            return
        if progress or interrupted:
            print(f"report: {path}" + (" (search interrupted; continue it with --resume)" if interrupted else ""), flush=True)

    try:
        run_dir = search()
    except SearchInterrupted as stop:
        draw(stop.run_dir, True)
        raise
    draw(run_dir, False)


def _config(args: argparse.Namespace, time_budget: float | None):
    from pathlib import Path

    from autopeft.search.config import SearchConfig
    from autopeft.search.options import DEFAULT_PRIOR_SIGNAL

    return SearchConfig(
        weights=str(Path(args.weights).expanduser().resolve()) if args.weights else None, source=args.source,
        backbone=args.backbone, budget=args.budget, preset=args.preset, space=args.space,
        scanners=[s.strip() for s in args.scanners.split(",") if s.strip()] if args.scanners else None,
        trials=args.trials, time_budget_s=time_budget, epochs=args.epochs, folds=args.folds, seed=args.seed,
        out=args.out, objective=args.objective, sampler=args.sampler, priors=args.priors != "off",
        prior_signal=DEFAULT_PRIOR_SIGNAL if args.priors in ("on", "off") else args.priors, prior_candidates=args.prior_candidates,
        prior_beta=args.prior_beta,
        warm_start=args.warm_start, cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
        concurrency=args.concurrency, address=args.address, storage_path=args.storage_path,
        trial_resources=_resources(args.trial_resources), max_failures=args.max_failures, data=args.data, pretrain_epochs=args.pretrain_epochs,
        references=not args.no_references, portfolio=not args.no_portfolio, asha=not args.no_asha, fidelity=args.fidelity, device=args.device,
        amp=args.amp, progress=not args.quiet,
        dashboard=args.dashboard, confirm=args.confirm, confirm_folds=args.confirm_folds, confirm_seeds=args.confirm_seeds,
    )


def _resources(text: str | None) -> dict[str, float]:
    """``--trial-resources``: a JSON object of resource name -> amount."""
    import json

    from autopeft.errors import ConfigError

    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--trial-resources must be a JSON object such as '{{\"autopeft_worker\": 1}}', but got {text!r} "
                          f"({err.msg}).") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--trial-resources must be a JSON object of resource name -> amount, but got {text!r}.")
    return {str(k): v for k, v in value.items()}
