"""Source models and importance maps, produced once before any trial, where every node reads them.

Trials never pre-train (a missing source model is an error naming its spec). The driver finds the
models the pairs need in its cache or the artifact store; missing ones are pre-trained as Ray tasks
(one trial's resources each, side by side when the resources allow) or, when a single one is
missing on a one-node search, here with its progress bar. With an artifact store (a search's
``--storage-path``) every model and the warm start's importance maps are put there for the other
nodes.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import ray
import torch
from tqdm.auto import tqdm

from autopeft._io import cache_root
from autopeft.artifacts import ArtifactStore
from autopeft.pretraining import is_pretrained, model_file
from autopeft.runner._tasks import as_they_finish
from autopeft.runner.trial import TrialSetup, source_model

__all__ = ["prepare_sources", "publish_importance"]


def _pretrain_task(setup: TrialSetup, source: str, fold: int) -> dict[str, Any]:
    """Ray task: pre-train one source model into this node's cache (and the artifact store)."""
    torch.set_num_threads(max(1, setup.threads))
    setup = replace(setup.on_node(), pretrain=True)
    _, meta = source_model(setup, source, fold)
    if setup.artifacts:
        ArtifactStore(setup.artifacts).publish(setup.source_files()[(source, fold)])
    return {"best": meta.get("best"), "seconds": meta.get("seconds")}


def prepare_sources(config, setup: TrialSetup, *, options: dict[str, Any], progress: bool) -> None:
    """Every source model of ``setup``'s pairs in this process's cache and, with ``setup.artifacts``,
    in the store, before any trial reads it.

    Args:
        config: the search's settings (``concurrency``).
        setup: the trial set-up; its ``pretrain`` flag is ignored here (this is where models train).
        options: ``ray.remote`` options of one pre-training task (a trial's resources).
        progress: progress bar and one line per model.
    """
    store = ArtifactStore(setup.artifacts) if setup.artifacts else None
    specs = setup.source_specs()
    files = {unit: model_file(spec) for unit, spec in specs.items()}
    # is_pretrained also moves an entry an earlier autopeft keyed by the raw scanner name.
    missing = [unit for unit, relative in files.items()
               if not is_pretrained(specs[unit]) and not (store is not None and store.fetch(relative))]
    # In Ray tasks when the store exists (the nodes with the trial's resources may be other machines)
    # or when several can train side by side; a single one on one machine trains here, with its bar.
    if missing and (store is not None or (len(missing) > 1 and (config.concurrency or 1) > 1)):
        _pretrain_remotely(setup, missing, options, store=store, files=files, progress=progress)
    local = replace(setup, pretrain=True)
    for source, fold in setup.sources:
        source_model(local, source, fold, progress=progress)
        if store is not None and (source, fold) in files:
            store.publish(files[(source, fold)])


def _pretrain_remotely(setup: TrialSetup, missing: list[tuple[str, int]], options: dict[str, Any], *,
                       store: ArtifactStore | None, files: dict[tuple[str, int], str], progress: bool) -> None:
    """Pre-train the ``missing`` source models as Ray tasks, each asking for ``options``; with a
    ``store``, each model is fetched from it into this process's cache as soon as its task is done."""
    task = ray.remote(**options)(_pretrain_task)
    names = ", ".join(f"scanner {s} (fold {f})" for s, f in missing)
    print(f"pre-training {len(missing)} source models side by side (Ray tasks, as many at once as a trial's resources "
          f"fit): {names}", flush=True)
    started = time.time()
    running = {task.remote(setup, source, fold): (source, fold) for source, fold in missing}
    with tqdm(total=len(missing), desc="pre-train source models", unit="model", disable=not progress) as bar:
        for (source, fold), result in as_they_finish(running, bar):
            best = result.get("best") or {}
            if store is not None:
                store.fetch(files[(source, fold)])
            bar.update(1)
            bar.write(f"  source model of scanner {source} (fold {fold}) ready after "
                      f"{(time.time() - started) / 60:.1f} min: validation PSNR {best.get('psnr', float('nan')):.3f} dB")


def publish_importance(setup: TrialSetup) -> None:
    """Put the importance maps this process computed (the warm start's priors) in the artifact
    store, so that trials of SH-PEFT plans on other nodes read them instead of computing them."""
    if not setup.artifacts:
        return
    store = ArtifactStore(setup.artifacts)
    for relative in setup.importance_files():
        if (cache_root() / relative).is_file():
            store.publish(relative)
