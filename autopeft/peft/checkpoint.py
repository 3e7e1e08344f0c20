"""Save only what a plan trained, and load it onto a fresh copy of the pre-trained backbone.

A trained-plan folder holds three files, all written atomically (temporary file + ``os.replace``):

- ``trained.safetensors``: the trained parameters (by their names after injection), SH-PEFT's
  selected indices, and the network's persistent buffers (e.g. BatchNorm running statistics,
  which change whenever the network runs in train mode, even with frozen weights);
- ``plan.yaml``: the plan, so the same layers can be injected again;
- ``meta.json``: format version, backbone and preset, tensor names and shapes, the file's SHA-256,
  and a fingerprint of the frozen pre-trained weights, so that loading onto a different pre-trained
  checkpoint (or a corrupted file) fails instead of silently producing other outputs.

Nothing is pickled: safetensors for tensors, ``yaml.safe_load`` and JSON for the rest.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from autopeft import __version__
from autopeft._io import atomic_write, atomic_write_json, atomic_write_text
from autopeft.errors import CheckpointError, PlanError
from autopeft.peft.apply import apply_plan, network_of, plan_state
from autopeft.peft.plan import Plan
from autopeft.peft.shpeft import sparse_selection_from_state

__all__ = ["save_trained", "load_trained", "TRAINED_FILE", "PLAN_FILE", "META_FILE"]

TRAINED_FILE = "trained.safetensors"
PLAN_FILE = "plan.yaml"
META_FILE = "meta.json"
_FORMAT = "autopeft-trained/1"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _frozen_fingerprint(model: nn.Module, trained: set[str]) -> str:
    """Hash of every frozen parameter of the network (names, shapes, dtypes, bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    net_ids = {id(p) for p in network_of(model).parameters()}
    for name, p in model.named_parameters():
        if name in trained or id(p) not in net_ids:
            continue
        data = p.detach().contiguous().cpu()
        digest.update(f"{name}|{tuple(data.shape)}|{data.dtype}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _trained_tensors(model: nn.Module, trainable_names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    tensors = {name: params[name] for name in trainable_names}
    net_buffer_ids = {id(b) for b in network_of(model).buffers()}
    for module_name, module in model.named_modules():
        for buffer_name, buffer in module.named_buffers(recurse=False):
            persistent = buffer_name not in module._non_persistent_buffers_set
            if buffer is not None and persistent and id(buffer) in net_buffer_ids:
                tensors[f"{module_name}.{buffer_name}" if module_name else buffer_name] = buffer
    # clone: safetensors refuses tensors that share storage (views, tied weights).
    return {name: t.detach().cpu().clone().contiguous() for name, t in tensors.items()}


def save_trained(model: nn.Module, plan: Plan, directory: str | os.PathLike, *,
                 info: dict[str, Any] | None = None) -> Path:
    """Write the trained part of ``model`` with its plan to ``directory`` (created if needed).

    Args:
        model: a backbone ``apply_plan`` was applied to (not merged).
        plan: the plan that was applied (checked against the model's record).
        directory: the output folder.
        info: more metadata for ``meta.json``, e.g. the readable source and target scanner names
            that the folder's name holds only as path components. Defaults to None.

    Returns:
        The folder.
    """
    state = plan_state(model)
    if state is None:
        raise ValueError("`model` must be a model a plan was applied to (apply_plan), but it has no plan.")
    if state.merged:
        raise ValueError("`model` was merged (merge_plan); save the trained part before merging.")
    if plan != state.plan:
        raise ValueError("`plan` must be the plan applied to `model`, but it differs.")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = _trained_tensors(model, state.trainable_names)
    atomic_write(folder / TRAINED_FILE, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_text(folder / PLAN_FILE, plan.to_yaml())
    preset = getattr(getattr(model, "preset", None), "name", None)

    meta: dict[str, Any] = {
        "format": _FORMAT,
        "autopeft_version": __version__,
        "backbone": getattr(model, "name", "") or plan.backbone,
        "preset": preset,
        "trainable_names": state.trainable_names,
        "tensors": {name: list(t.shape) for name, t in tensors.items()},
        "trained_sha256": _sha256(folder / TRAINED_FILE),
        "base_fingerprint": _frozen_fingerprint(model, set(state.trainable_names)),
        "base_param_count": state.base_param_count,
    }
    meta.update({k: v for k, v in (info or {}).items() if k not in meta})
    atomic_write_json(folder / META_FILE, meta, sort_keys=True)
    return folder


def _read(folder: Path) -> tuple[dict[str, Any], Plan, dict[str, torch.Tensor]]:
    missing = [name for name in (TRAINED_FILE, PLAN_FILE, META_FILE) if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{folder} is not a trained-plan folder: {', '.join(missing)} missing (write it with save_trained).")
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{folder / META_FILE} is corrupt: {err}.") from err
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise CheckpointError(f"{folder / META_FILE} is not {_FORMAT} metadata.")
    if _sha256(folder / TRAINED_FILE) != meta.get("trained_sha256"):
        raise CheckpointError(f"{folder / TRAINED_FILE} does not match the checksum in {META_FILE}: the file is corrupt or was replaced.")
    try:
        plan = Plan.from_yaml(folder / PLAN_FILE)
    except PlanError as err:
        raise CheckpointError(f"{folder / PLAN_FILE} is not a valid plan: {err}") from err
    try:
        tensors = load_file(str(folder / TRAINED_FILE))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{folder / TRAINED_FILE} cannot be read: {err}.") from err
    return meta, plan, tensors


def load_trained(base_model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """A copy of ``base_model`` with the saved plan applied and its trained tensors loaded.

    Args:
        base_model: the same pre-trained backbone the plan was trained from (left unchanged).
        directory: a folder written by :func:`save_trained`.

    Returns:
        The fine-tuned model, giving the outputs the saved model gave.

    Raises:
        CheckpointError: missing or corrupt files, another backbone or preset, other pre-trained
            weights, or tensors that do not match the model's names and shapes.
    """
    folder = Path(directory)
    meta, plan, tensors = _read(folder)
    if plan_state(base_model) is not None:
        raise CheckpointError("`base_model` already has a plan applied; pass the pre-trained backbone itself.")
    backbone = getattr(base_model, "name", "") or plan.backbone
    if meta.get("backbone") != backbone:
        raise CheckpointError(f"{folder} was trained on backbone {meta.get('backbone')!r}, but `base_model` is {backbone!r}.")
    preset = getattr(getattr(base_model, "preset", None), "name", None)
    if meta.get("preset") != preset:
        raise CheckpointError(f"{folder} was trained on preset {meta.get('preset')!r}, but `base_model` has preset {preset!r}.")
    model = copy.deepcopy(base_model)
    selection = sparse_selection_from_state(list(tensors), tensors)
    try:
        apply_plan(model, plan, _sparse_selection=selection)
    except PlanError as err:
        raise CheckpointError(f"The plan in {folder} does not fit `base_model`: {err}") from err
    state = plan_state(model)
    if state.trainable_names != meta.get("trainable_names"):
        missing = sorted(set(state.trainable_names) - set(meta.get("trainable_names", [])))
        extra = sorted(set(meta.get("trainable_names", [])) - set(state.trainable_names))
        raise CheckpointError(f"{folder} does not match the model: missing {missing[:5]}, unexpected {extra[:5]}.")
    if _frozen_fingerprint(model, set(state.trainable_names)) != meta.get("base_fingerprint"):
        raise CheckpointError(
            f"{folder} was trained from other pre-trained weights than `base_model`'s; load it onto the "
            "same pre-trained checkpoint it was fine-tuned from."
        )
    _load_tensors(model, tensors, state.trainable_names, folder)
    return model


def _load_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], trainable_names: list[str], folder: Path) -> None:
    params = dict(model.named_parameters())
    targets: dict[str, torch.Tensor] = {name: params[name] for name in trainable_names}
    net_buffer_ids = {id(b) for b in network_of(model).buffers()}
    targets.update({name: b for name, b in model.named_buffers() if id(b) in net_buffer_ids})
    absent = [name for name in trainable_names if name not in tensors]
    if absent:
        raise CheckpointError(f"{folder / TRAINED_FILE} lacks trained tensors: {absent[:5]}.")
    unexpected = [name for name in tensors if name not in targets]
    if unexpected:
        raise CheckpointError(f"{folder / TRAINED_FILE} holds tensors the model lacks: {unexpected[:5]}.")
    with torch.no_grad():
        for name, value in tensors.items():
            target = targets[name]
            if target.shape != value.shape:
                raise CheckpointError(
                    f"{folder / TRAINED_FILE}: {name!r} has shape {tuple(value.shape)}, the model's has {tuple(target.shape)}."
                )
            target.copy_(value.to(device=target.device, dtype=target.dtype))
