"""Per-scanner subject splits for pre-training and fine-tuning, with k rotating folds.

PETITE's protocol: pre-train on one source scanner (30 training / 15 validation subjects), then
fine-tune on each other scanner with only 10 training subjects and evaluate on 15, with 3-fold
cross-validation on top. autopeft splits a target's held-out subjects once more, so that what a
search chooses is never scored on the subjects it was chosen on: fine-tuning uses three disjoint
splits, ``train`` (fine-tuning), ``val`` (every trial, the scheduler, the sampler, the priors and
the choice of the best plan) and ``test`` (read only by the confirmation at the end of a search,
and by ``autopeft finetune``). :class:`Protocol` holds the sizes; its defaults scale them down so
a CPU run finishes (pre-train 8/4; fine-tune 4 train / 4 val / 8 test), and :meth:`Protocol.paper`
maps PETITE's 10 train / 15 held-out onto 10 train / 5 val / 10 test.

A split is deterministic for a given (seed, fold): the scanner's subjects are shuffled once by the
seed. Pre-training: fold ``k`` starts its validation block ``k * n // folds`` places into that
order, wrapping around, with the training block right after it. Fine-tuning: the last
``finetune_test`` subjects of that order are the test subjects of *every* fold (a fold's search
must not choose on subjects another fold reports on); folds rotate the validation and training
blocks over the remaining subjects in the same way. Within a fold no two splits share a subject.
A scanner that is a source in some pairs and a target in others serves both roles with its own
subjects, as in PETITE; its test subjects stay out of its fold-0 pre-training split whenever it
has ``needed("pretrain") + finetune_test`` subjects (the built-in CPU data has fewer).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np
import pandas as pd

from autopeft.data.manifest import natural_key, read_manifest
from autopeft.errors import ConfigError, DataError

__all__ = ["Protocol", "split_scanner", "scanners_in"]

Purpose = Literal["pretrain", "finetune"]
_RECORD_KEYS: tuple[str, ...] = ("subject", "scanner", "short", "long")


@dataclass(frozen=True)
class Protocol:
    """Subjects per split, per scanner, and the number of cross-validation folds.

    The defaults are PETITE's 30/15 (pre-train) and 10/15 (fine-tune) scaled down for CPU runs,
    with the 15 held-out fine-tuning subjects split into validation and test; :meth:`paper` gives
    the published sizes (held-out: 5 validation + 10 test).

    Args:
        pretrain_train: training subjects on the source scanner. Defaults to 8.
        pretrain_val: validation subjects on the source scanner. Defaults to 4.
        finetune_train: training subjects on a target scanner. Defaults to 4.
        finetune_val: validation subjects on a target scanner: trials are scored, and plans chosen,
            on these. Defaults to 4.
        finetune_test: test subjects on a target scanner, fixed across folds: read only to confirm
            chosen plans. Defaults to 8.
        folds: cross-validation folds (rotations of the held-out subjects). Defaults to 3.

    Example:
        >>> Protocol.paper().needed("finetune")
        25
        >>> Protocol().sizes("finetune")
        {'train': 4, 'val': 4, 'test': 8}
    """

    pretrain_train: int = 8
    pretrain_val: int = 4
    finetune_train: int = 4
    finetune_val: int = 4
    finetune_test: int = 8
    folds: int = 3

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{field.name}` must be a positive integer, but got {value!r}.")

    @classmethod
    def from_settings(cls, settings: Mapping[str, int] | None) -> Protocol:
        """The protocol of a search's ``protocol`` setting (``SearchConfig.protocol``, ``run.json``'s
        ``config.protocol``): field name -> value, the fields not named at their defaults.

        Args:
            settings: field name -> subjects (or ``folds``); None or empty for the defaults.

        Raises:
            ConfigError: a name is not a field of :class:`Protocol`.
        """
        settings = dict(settings or {})
        names = [field.name for field in fields(cls)]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise ConfigError(f"the protocol setting names {', '.join(unknown)}, which are not protocol fields; use only "
                             f"{', '.join(names)}.")
        return cls(**settings)

    @classmethod
    def paper(cls) -> Protocol:
        """PETITE's sizes: 30 train / 15 val on the source; on a target 10 train and PETITE's 15
        held-out subjects split into 5 validation + 10 test; 3 folds."""
        return cls(pretrain_train=30, pretrain_val=15, finetune_train=10, finetune_val=5, finetune_test=10, folds=3)

    def sizes(self, purpose: Purpose) -> dict[str, int]:
        """Split name -> subjects for ``purpose``: train/val to pre-train, train/val/test to fine-tune."""
        if purpose == "pretrain":
            return {"train": self.pretrain_train, "val": self.pretrain_val}
        if purpose == "finetune":
            return {"train": self.finetune_train, "val": self.finetune_val, "test": self.finetune_test}
        raise ValueError(f"`purpose` must be 'pretrain' or 'finetune', but got {purpose!r}.")

    def needed(self, purpose: Purpose) -> int:
        """Subjects a scanner needs for ``purpose``."""
        return sum(self.sizes(purpose).values())


def scanners_in(manifest: pd.DataFrame | str | os.PathLike[str]) -> list[str]:
    """The scanner ids of a manifest, in natural order ('2' before '10').

    Args:
        manifest: a frame from :func:`~autopeft.data.manifest.read_manifest`, or a manifest path.
    """
    frame = manifest if isinstance(manifest, pd.DataFrame) else read_manifest(manifest)
    return sorted({str(scanner) for scanner in frame["scanner"]}, key=natural_key)


def split_scanner(
    manifest: pd.DataFrame | str | os.PathLike[str],
    scanner: str | int,
    *,
    purpose: Purpose,
    protocol: Protocol | None = None,
    fold: int = 0,
    seed: int = 0,
) -> dict[str, list[dict[str, str]]]:
    """Splits one scanner's subjects for pre-training or fine-tuning.

    Args:
        manifest: a frame from :func:`~autopeft.data.manifest.read_manifest`, or a manifest path.
        scanner: the scanner id (compared as a string, so ``1`` matches ``"1"``).
        purpose: ``"pretrain"`` gives ``train``/``val`` splits, ``"finetune"`` gives
            ``train``/``val``/``test`` (``test`` the same in every fold).
        protocol: split sizes and fold count. Defaults to ``Protocol()`` (the CPU-sized protocol).
        fold: which rotation of the held-out subjects, in ``[0, protocol.folds)``. Defaults to 0.
        seed: shuffles the subjects; the same seed and fold always give the same split. Defaults to 0.

    Returns:
        Split name -> records ``{"subject", "scanner", "short", "long"}`` (absolute paths), each
        split sorted by subject.

    Raises:
        DataError: the scanner is not in the manifest or has too few subjects for the protocol.
    """
    protocol = Protocol() if protocol is None else protocol
    sizes = protocol.sizes(purpose)
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < protocol.folds:
        raise ValueError(f"`fold` must be an integer in [0, {protocol.folds}), but got {fold!r}.")
    frame = manifest if isinstance(manifest, pd.DataFrame) else read_manifest(manifest)
    scanner_id = str(scanner)
    rows = frame[frame["scanner"].astype(str) == scanner_id]
    source = frame.attrs.get("manifest", "the manifest")
    if rows.empty:
        raise DataError(
            f"scanner {scanner_id!r} is not in {source}; its scanners are "
            f"{', '.join(scanners_in(frame))}. Pick one of those."
        )
    subjects = sorted(rows["subject"].astype(str), key=natural_key)
    needed = protocol.needed(purpose)
    if len(subjects) < needed:
        detail = " + ".join(f"{count} {name}" for name, count in sizes.items())
        raise DataError(
            f"scanner {scanner_id!r} in {source} has {len(subjects)} subjects, but {purpose} needs "
            f"{needed} ({detail}). Use fewer subjects per split (a smaller Protocol) or add "
            f"subjects to this scanner (simulated data: simulate at least {needed} per scanner)."
        )

    order = [subjects[i] for i in np.random.default_rng(seed).permutation(len(subjects))]
    chosen: dict[str, list[str]] = {}
    if "test" in sizes:
        # Fixed across folds (no fold chooses on another fold's test subjects), and taken from the
        # end of the order, where the pre-training split of the same scanner (from its start, fold
        # 0) reaches last: disjoint from it when the scanner has enough subjects for both.
        cut = len(order) - sizes["test"]
        chosen["test"], order = order[cut:], order[:cut]
    start = fold * len(order) // protocol.folds
    rotated = order[start:] + order[:start]
    chosen["val"] = rotated[: sizes["val"]]
    chosen["train"] = rotated[sizes["val"] : sizes["val"] + sizes["train"]]
    by_subject = {str(row["subject"]): row for _, row in rows.iterrows()}
    return {
        name: [
            {key: str(by_subject[subject][key]) for key in _RECORD_KEYS}
            for subject in sorted(chosen[name], key=natural_key)
        ]
        for name in sizes
    }
