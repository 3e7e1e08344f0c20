"""One trial: a plan fine-tuned on every (source -> target) scanner pair, with running means.

The trial loads each pair's cached pre-trained source model (the driver pre-trains missing ones
before any trial starts) and runs the one fine-tuning recipe (``autopeft.finetuning.finetune_plan``):
fine-tune on the target's few training subjects, score the target's *validation* subjects. Test
subjects are never read here; only the confirmation at the end of a search scores them. After
each pair it reports the running means of PSNR, SSIM and NRMSE, and the pairs and pair-epochs
done: the fidelity the scheduler stops on (``--fidelity pairs`` or ``epochs``). With
``score_at`` it also scores the pair it is training at those pair-epochs, mid-pair.

A trial writes nothing itself: it hands its scores back through ``report`` (Ray Tune's
``tune.report`` in a search), and the driver keeps the record (:mod:`autopeft.runs`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from autopeft._io import path_inside
from autopeft.artifacts import ArtifactStore
from autopeft.backbones.network import NetworkRef, register_network
from autopeft.data import Protocol, read_manifest
from autopeft.finetuning import FinetuneSettings, finetune_plan, importance_file
from autopeft.finetuning import source_model as job_source_model
from autopeft.peft import save_trained
from autopeft.pretraining import model_file, source_spec
from autopeft.runs import pair_folder

__all__ = ["TrialSetup", "setup_from_config", "PairScore", "run_plan", "progress_metrics", "source_model", "running_means",
           "scores_to_json", "scores_from_json"]


@dataclass(frozen=True, kw_only=True)
class TrialSetup(FinetuneSettings):
    """Everything a trial needs besides its plan (picklable: it travels to Ray workers): the
    fine-tuning settings every pair shares (``autopeft.finetuning.FinetuneSettings``: backbone,
    preset, manifest_path, seed, protocol, pretrain_epochs, device, weights, pretrain, amp), and:

    Args:
        pairs: (source, target) scanner pairs.
        folds: cross-validation folds each pair runs on.
        epochs: fine-tuning epochs per pair.
        threads: torch threads per trial (its CPU share).
        run_dir: the search's output folder.
        baseline: No-FT's validation PSNR per ``(source, target, fold)``: a trial's objective is
            its mean PSNR gain over it. Empty until the references have run.
        artifacts: the artifact store every node reads (``autopeft.artifacts``; a search's
            ``--storage-path``), or None where every node shares this machine's cache.
        data_key: the scans' key in that store, when nodes cannot read ``manifest_path``.
        score_at: pair-epochs done (counted over the trial's pairs in its order) after which the
            pair in training is scored on validation and reported mid-pair: the scheduler's rungs
            with ``--fidelity epochs``. Empty: a report after each pair only.
        network: a user's network by reference (``autopeft.backbones.network.NetworkRef`` JSON), registered
            by :meth:`on_node` in the process the setup travels to; None for a registered backbone.

    Each pair's :class:`~autopeft.finetuning.FinetuneJob` comes from ``job(source, target, fold)``
    (inherited): a search's trials (``pretrain`` False there: the driver pre-trains first) and its
    confirmation fine-tune exactly these settings.
    """

    pairs: tuple[tuple[str, str], ...]
    folds: tuple[int, ...] = (0,)
    epochs: int = 20
    threads: int = 1
    run_dir: str = ""
    baseline: tuple[tuple[str, str, int, float], ...] = ()
    artifacts: str | None = None
    data_key: str | None = None
    score_at: tuple[int, ...] = ()
    network: str | None = None

    @property
    def sources(self) -> list[tuple[str, int]]:
        """(source, fold) of every source model the pairs need."""
        return [(source, fold) for fold in self.folds for source in sorted({s for s, _ in self.pairs})]

    def source_specs(self) -> dict:
        """Each source model's ``autopeft.pretraining.SourceSpec`` by (source, fold); none with ``weights``."""
        if self.weights:
            return {}
        manifest = read_manifest(self.manifest_path)
        return {(source, fold): source_spec(self.backbone, source, manifest=manifest, preset=self.preset, fold=fold,
                                            epochs=self.pretrain_epochs, seed=self.seed, protocol=self.protocol,
                                            amp=self.amp)
                for source, fold in self.sources}

    def source_files(self) -> dict[tuple[str, int], str]:
        """Each source model's file by (source, fold), relative to the cache."""
        return {unit: model_file(spec) for unit, spec in self.source_specs().items()}

    def importance_files(self) -> list[str]:
        """The SH-PEFT importance maps of every unit at ``seed``, relative to the cache."""
        specs = self.source_specs()
        return [importance_file(self.job(s, t, f), asdict(specs[(s, f)])) for s, t, f in self.units if (s, f) in specs]

    def on_node(self) -> TrialSetup:
        """This setup as the node it runs on sees it: with an artifact store, the scans (when
        shipped), source models and importance maps are brought into the node's cache first. A
        user's network (``network``) is registered in this process first."""
        if self.network is not None:
            register_network(NetworkRef.from_json(self.network))
        if self.artifacts is None:
            return self
        store = ArtifactStore(self.artifacts)
        setup = replace(self, manifest_path=str(store.data(self.data_key))) if self.data_key else self
        for relative in [*setup.source_files().values(), *setup.importance_files()]:
            store.fetch(relative)  # a missing source model is named by the trial's first load
        return setup

    @property
    def units(self) -> list[tuple[str, str, int]]:
        """(source, target, fold) in the one order every trial trains them: the scheduler compares
        trials at a rung on the same pairs, never one trial's easy pair with another's hard one."""
        return [(s, t, f) for f in self.folds for s, t in self.pairs]

    def gain_of(self, scores: Sequence[PairScore]) -> float | None:
        """Mean PSNR gain over No-FT of ``scores`` (None without a baseline for every pair)."""
        baseline = {(s, t, int(f)): v for s, t, f, v in self.baseline}
        try:
            gains = [score.psnr - baseline[(score.source, score.target, int(score.fold))] for score in scores]
        except KeyError:
            return None
        return sum(gains) / len(gains) if gains else None


def setup_from_config(
    config: Mapping[str, Any],
    *,
    manifest_path: str | os.PathLike,
    run_dir: str | os.PathLike = "",
    device: str | None = None,
    threads: int | None = None,
) -> TrialSetup:
    """The :class:`TrialSetup` of a search's settings, the one way a search and whatever reads its
    run (report, predict, export) build it: every ordered pair of ``scanners`` (only those from
    ``source`` when it is set), folds ``0 .. folds - 1``.

    Args:
        config: the settings, ``dataclasses.asdict(SearchConfig)`` or ``run.json``'s ``config``
            (resolved: ``preset``, ``scanners`` and ``epochs`` set).
        manifest_path: the data set's manifest (``config["data"]`` resolved).
        run_dir: the run directory. Defaults to "".
        device: where to train. Defaults to the settings' ``device``, else ``cpu``.
        threads: torch threads per trial. Defaults to the settings' ``cpus_per_trial`` (at least 1).
    """
    scanners = [str(s) for s in config["scanners"]]
    source = None if config.get("source") is None else str(config["source"])
    return TrialSetup(
        backbone=config["backbone"], preset=config["preset"], manifest_path=str(manifest_path),
        pairs=tuple((s, t) for s in scanners for t in scanners if s != t and source in (None, s)),
        folds=tuple(range(int(config.get("folds", 1)))), epochs=int(config["epochs"]), seed=int(config.get("seed", 0)),
        protocol=Protocol.from_settings(config.get("protocol")), pretrain_epochs=config.get("pretrain_epochs"),
        device=device or config.get("device") or "cpu",
        threads=threads if threads is not None else max(1, int(config.get("cpus_per_trial", 1))),
        run_dir=str(run_dir), weights=config.get("weights"), amp=bool(config.get("amp", False)),
    )


@dataclass
class PairScore:
    """Scores of one (source, target, fold, fine-tuning seed) on one held-out split: the means
    and, in ``subjects``, each subject's PSNR / SSIM / NRMSE."""

    source: str
    target: str
    fold: int
    psnr: float
    ssim: float
    nrmse: float
    seconds: float
    split: str = "val"
    seed: int = 0
    subjects: list[dict[str, Any]] = field(default_factory=list)


def source_model(setup: TrialSetup, source: str, fold: int, *, progress: bool = False):
    """The cached pre-trained source model (trained now if missing and ``setup.pretrain``)."""
    return job_source_model(setup.job(source, source, fold), progress=progress)


def run_plan(
    setup: TrialSetup,
    plan,
    *,
    report: Callable[[dict[str, Any]], None] | None = None,
    save_dir: str | os.PathLike | None = None,
    skip: int = 0,
    previous: Sequence[PairScore] = (),
    split: str = "val",
    train_seed: int | None = None,
) -> list[PairScore]:
    """Fine-tune ``plan`` on every (source, target, fold) of ``setup`` and score it.

    Args:
        setup: the trial set-up.
        plan: an ``autopeft.peft.Plan`` (trained by ``autopeft.finetuning.finetune_plan``).
        report: called after each pair with running means (``psnr``, ``ssim``, ``nrmse``, ``gain``),
            ``pairs_done``, ``epochs_done`` (pair-epochs), ``fidelity`` (pairs done / pairs) and
            ``pairs`` (every pair's scores); also at ``setup.score_at`` mid-pair, the means then
            counting the pair in training at its current score.
        save_dir: where to save the trained parts per pair (``autopeft.runs.pair_folder``:
            ``<source>-<target>-fold<k>/``).
        skip: pairs already done (their scores in ``previous``), for resuming a record.
        previous: scores of the pairs skipped.
        split: the held-out split scored: ``val`` (the search) or ``test`` (the confirmation).
            Defaults to ``val``.
        train_seed: seeds the fine-tuning; the split and the source models keep ``setup.seed``.
            Defaults to ``setup.seed``.

    Returns:
        One score per pair.

    Raises:
        FloatingPointError: a pair scored NaN (the trial fails with that reason).
    """
    scores = list(previous)
    units = setup.units
    epochs_done = skip * setup.epochs
    for source, target, fold in units[skip:]:
        started = time.perf_counter()
        job = setup.job(source, target, fold, train_seed=train_seed)
        before = epochs_done
        # Scored mid-pair only for someone to report to: the scheduler's rungs inside this pair.
        mid_pair = [at - before for at in setup.score_at if before < at < before + setup.epochs] if report is not None else []

        def report_mid_pair(epoch, _unit=(source, target, fold), _before=before, _started=started) -> None:
            if not epoch.metrics:
                return
            # Ends the trial now, as at a pair's end, rather than hand the scheduler a NaN.
            _require_finite(epoch.metrics, *_unit, when=f" after epoch {epoch.epoch}")
            partial = PairScore(*_unit, epoch.metrics["psnr"], epoch.metrics["ssim"], epoch.metrics["nrmse"],
                                time.perf_counter() - _started, split=split)
            report(progress_metrics(setup, scores, total=len(units), epochs_done=_before + epoch.epoch, training=partial))

        model, result = finetune_plan(plan, job, splits=(split,), score_epochs=mid_pair,
                                      on_epoch=report_mid_pair if mid_pair else None)
        epochs_done += len(result.history)
        metrics = result.metrics
        _require_finite(metrics, source, target, fold)
        if save_dir is not None and result.trainable > 0 and not plan.full_ft:
            folder = path_inside(save_dir, Path(save_dir) / pair_folder(source, target, fold), what="a pair's trained parts")
            save_trained(model, plan, folder, info={"source": source, "target": target, "fold": fold})
        scores.append(PairScore(source, target, fold, metrics["psnr"], metrics["ssim"], metrics["nrmse"],
                                time.perf_counter() - started, split=split, seed=job.fine_tuning_seed,
                                subjects=result.subjects[split]))
        if report is not None:
            report(progress_metrics(setup, scores, total=len(units), epochs_done=epochs_done))
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return scores


def _require_finite(metrics: Mapping[str, float], source: str, target: str, fold: int, *, when: str = "") -> None:
    if not all(math.isfinite(metrics[k]) for k in ("psnr", "ssim", "nrmse")):
        raise FloatingPointError(f"pair {source}->{target} (fold {fold}) scored {metrics}{when}: the fine-tuned model outputs NaN.")


def progress_metrics(setup: TrialSetup, scores: Sequence[PairScore], *, total: int, epochs_done: int,
                     training: PairScore | None = None) -> dict[str, Any]:
    """What a trial reports: running means and gain over the pairs done (with ``training``, the
    pair in training at its current score, counted too), ``pairs_done``, ``epochs_done``,
    ``pairs_total``, ``fidelity`` and ``pairs`` (every done pair's scores)."""
    counted = [*scores, training] if training is not None else list(scores)
    return {**running_means(counted), "gain": setup.gain_of(counted), "pairs_done": len(scores),
            "epochs_done": epochs_done, "pairs_total": total, "fidelity": len(scores) / total,
            "pairs": scores_to_json(scores)}


def running_means(scores: Sequence[PairScore]) -> dict[str, float]:
    """Means over the pairs done (PETITE averages pairs per source, then sources; with the same
    number of targets per source, as here, that equals the plain mean)."""
    n = max(len(scores), 1)
    return {k: sum(getattr(s, k) for s in scores) / n for k in ("psnr", "ssim", "nrmse")}


def scores_to_json(scores: Sequence[PairScore]) -> list[dict[str, Any]]:
    return [asdict(s) for s in scores]


def scores_from_json(items: Sequence[Mapping[str, Any]]) -> list[PairScore]:
    return [PairScore(**item) for item in items]
