"""One trial: a plan fine-tuned on every (source -> target) scanner pair, with running means.

The trial loads each pair's cached pre-trained source model (the driver pre-trains missing ones
before any trial starts), applies the plan, fine-tunes on the target's few training subjects and
scores the target's held-out subjects. After each pair it reports the running means of PSNR, SSIM
and NRMSE: the number of pairs done is the fidelity the scheduler stops on.

Every trial keeps a record, ``<run>/trials/<number>.json`` (written atomically), so that a search
can be resumed and an early-stopped trial is never read as a finished one.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TrialSetup", "PairScore", "run_plan", "read_record", "write_record", "records"]

# Terminal states of a trial record; RUNNING is the only other one.
FINISHED, STOPPED, FAILED, INFEASIBLE, INTERRUPTED = "FINISHED", "STOPPED", "FAILED", "INFEASIBLE", "INTERRUPTED"
TERMINAL = (FINISHED, STOPPED, FAILED, INFEASIBLE)


@dataclass(frozen=True)
class TrialSetup:
    """Everything a trial needs besides its plan (picklable: it travels to Ray workers).

    Args:
        backbone: registered backbone name.
        preset: backbone preset.
        manifest_path: the data set's manifest.
        pairs: (source, target) scanner pairs.
        folds: cross-validation folds each pair runs on.
        epochs: fine-tuning epochs per pair.
        seed: seeds splits, crops and initialisation.
        protocol: subject counts (``autopeft.data.Protocol`` fields).
        pretrain_epochs: epochs of the source models (None: the preset's).
        device: where to train.
        threads: torch threads per trial (its CPU share).
        run_dir: the search's output folder.
        weights: a user's pre-trained model used as every pair's source model (no pre-training).
    """

    backbone: str
    preset: str
    manifest_path: str
    pairs: tuple[tuple[str, str], ...]
    folds: tuple[int, ...] = (0,)
    epochs: int = 20
    seed: int = 0
    protocol: dict[str, int] = field(default_factory=dict)
    pretrain_epochs: int | None = None
    device: str = "cpu"
    threads: int = 1
    run_dir: str = ""
    weights: str | None = None

    @property
    def units(self) -> list[tuple[str, str, int]]:
        """(source, target, fold) in the order a trial runs them."""
        return [(s, t, f) for f in self.folds for s, t in self.pairs]

    def make_protocol(self):
        from autopeft.data import Protocol

        return Protocol(**self.protocol) if self.protocol else Protocol()


@dataclass
class PairScore:
    source: str
    target: str
    fold: int
    psnr: float
    ssim: float
    nrmse: float
    seconds: float


def source_model(setup: TrialSetup, source: str, fold: int, *, progress: bool = False):
    """The cached pre-trained source model (trained now if missing)."""
    from autopeft.pretraining import pretrained_model

    return pretrained_model(
        setup.backbone, source, manifest_path=setup.manifest_path, preset=setup.preset, fold=fold,
        epochs=setup.pretrain_epochs, seed=setup.seed, protocol=setup.make_protocol(), device=setup.device,
        progress=progress, weights=setup.weights,
    )


def run_plan(
    setup: TrialSetup,
    plan,
    *,
    report: Callable[[dict[str, Any]], None] | None = None,
    save_dir: str | os.PathLike | None = None,
    skip: int = 0,
    previous: Sequence[PairScore] = (),
) -> list[PairScore]:
    """Fine-tune ``plan`` on every (source, target, fold) of ``setup`` and score it.

    Args:
        setup: the trial set-up.
        plan: an ``autopeft.peft.Plan`` (its ``train.lr`` is the learning rate; Full-FT plans too).
        report: called after each pair with running means (``psnr``, ``ssim``, ``nrmse``),
            ``pairs_done``, ``fidelity`` (pairs done / pairs) and ``pairs`` (every pair's scores).
        save_dir: where to save the trained parts per pair (``<source>-<target>-fold<k>/``).
        skip: pairs already done (their scores in ``previous``), for resuming a record.
        previous: scores of the pairs skipped.

    Returns:
        One score per pair.

    Raises:
        FloatingPointError: a pair scored NaN (the trial fails with that reason).
    """
    import copy

    import torch

    from autopeft.data import read_manifest
    from autopeft.finetuning import finetune
    from autopeft.peft import apply_plan, count_trainable, save_trained
    from autopeft.search.priors import pair_importance

    manifest = read_manifest(setup.manifest_path)
    lr = float(plan.train.get("lr", 1e-3))
    lam = plan.train.get("shpeft_lambda")
    uses_shpeft = any(spec.method == "shpeft" for spec in plan.sites.values())
    scores = list(previous)
    units = setup.units
    for source, target, fold in units[skip:]:
        started = time.perf_counter()
        pretrained, _ = source_model(setup, source, fold)
        importance = None
        if uses_shpeft:
            task, hybrid = pair_importance(setup, source, target, fold)
            weight = 1.0 if lam is None else float(lam)
            # I(lambda) = I_task + lambda * s * I_agnostic is linear in lambda: from lambda 0 and 1.
            importance = {n: task[n] + weight * (hybrid[n] - task[n]) for n in task}
        model = copy.deepcopy(pretrained)

        def prepare(m, _importance=importance) -> tuple[int, int]:
            apply_plan(m, plan, importance=_importance)
            return count_trainable(m), sum(p.numel() for p in pretrained.net.parameters())

        result = finetune(
            model, target, manifest=manifest, method=plan.name or "trial", prepare=prepare,
            epochs=int(plan.train.get("epochs", setup.epochs)), lr=lr, protocol=setup.make_protocol(),
            fold=fold, seed=setup.seed, device=setup.device, progress=False,
        )
        metrics = result.metrics
        if not all(math.isfinite(metrics[k]) for k in ("psnr", "ssim", "nrmse")):
            raise FloatingPointError(f"pair {source}->{target} (fold {fold}) scored {metrics}: the fine-tuned model outputs NaN.")
        if save_dir is not None and result.trainable > 0 and not plan.full_ft:
            save_trained(model, plan, Path(save_dir) / f"{source}-{target}-fold{fold}")
        scores.append(PairScore(source, target, fold, metrics["psnr"], metrics["ssim"], metrics["nrmse"], time.perf_counter() - started))
        if report is not None:
            report({**running_means(scores), "pairs_done": len(scores), "fidelity": len(scores) / len(units),
                    "pairs": scores_to_json(scores)})
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return scores


def running_means(scores: Sequence[PairScore]) -> dict[str, float]:
    """Means over the pairs done (PETITE averages pairs per source, then sources; with the same
    number of targets per source, as here, that equals the plain mean)."""
    n = max(len(scores), 1)
    return {k: sum(getattr(s, k) for s in scores) / n for k in ("psnr", "ssim", "nrmse")}


# Records --------------------------------------------------------------------------------------
def record_path(run_dir: str | os.PathLike, number: int) -> Path:
    return Path(run_dir) / "trials" / f"{number:04d}.json"


def write_record(run_dir: str | os.PathLike, number: int, record: Mapping[str, Any]) -> None:
    """Write a trial record atomically (temporary file + ``os.replace``)."""
    path = record_path(run_dir, number)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(dict(record), indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)


def read_record(run_dir: str | os.PathLike, number: int) -> dict[str, Any] | None:
    path = record_path(run_dir, number)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def records(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every trial record of a run, by trial number."""
    folder = Path(run_dir) / "trials"
    if not folder.is_dir():
        return []
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))]


def scores_to_json(scores: Sequence[PairScore]) -> list[dict[str, Any]]:
    return [asdict(s) for s in scores]


def scores_from_json(items: Sequence[Mapping[str, Any]]) -> list[PairScore]:
    return [PairScore(**item) for item in items]
