"""Model checkpoints: safetensors weights with JSON metadata, written atomically.

Nothing here unpickles: weights are safetensors; optimizer state for resuming is loaded with
``torch.load(weights_only=True)`` and only ever read back from files autopeft itself wrote. A
user's own weights (``--weights``: safetensors, a PyTorch state dict or a MONAI bundle folder) are
read by :func:`read_user_weights` the same way: a pickle that holds anything but tensors and plain
containers is refused before any of it runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from autopeft._io import atomic_write, atomic_write_bytes, atomic_write_text
from autopeft.backbones import build_backbone, registered_backbones
from autopeft.errors import CheckpointError

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "read_metadata",
    "atomic_write_bytes",  # re-exported from autopeft._io, where they live
    "atomic_write_text",
    "save_state",
    "load_state",
]

_META_KEY = "autopeft"


def save_checkpoint(module: nn.Module, path: str | os.PathLike, metadata: dict[str, Any]) -> None:
    """Save ``module.state_dict()`` as safetensors with ``metadata`` (JSON-serialisable) attached."""
    tensors = {name: t.detach().contiguous().cpu() for name, t in module.state_dict().items()}
    meta = {_META_KEY: json.dumps(metadata, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata stored in an autopeft checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(_META_KEY)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"Checkpoint {path} is corrupt or not a safetensors file ({err}); delete it to retrain."
        ) from err
    if raw is None:
        raise CheckpointError(f"Checkpoint {path} has no autopeft metadata; it was not written by autopeft.")
    return json.loads(raw)


def load_checkpoint(
    module: nn.Module, path: str | os.PathLike, *, expect: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Load weights into ``module`` strictly and return the checkpoint's metadata.

    Args:
        module: receives the weights; every key and shape must match (nothing is skipped).
        path: the ``.safetensors`` file.
        expect: metadata fields that must match (e.g. ``{"backbone": "unetr", "preset": "tiny"}``).

    Raises:
        CheckpointError: missing, corrupt or mismatched checkpoint, naming what differs.
    """
    path = Path(path)
    metadata = read_metadata(path)
    for field, wanted in (expect or {}).items():
        if metadata.get(field) != wanted:
            raise CheckpointError(
                f"Checkpoint {path} was made for {field}={metadata.get(field)!r}, "
                f"but {field}={wanted!r} was asked for."
            )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"Checkpoint {path} is corrupt ({err}); delete it to retrain.") from err
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    if missing or unexpected or wrong_shape:
        def _head(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")

        problems = [
            f"missing {_head(missing)}" if missing else "",
            f"unexpected {_head(unexpected)}" if unexpected else "",
            f"shape differs for {_head(wrong_shape)}" if wrong_shape else "",
        ]
        raise CheckpointError(
            f"Checkpoint {path} does not match the model ({'; '.join(p for p in problems if p)}). "
            "Was it made for another backbone or preset?"
        )
    module.load_state_dict(tensors, strict=True)
    return metadata


def save_state(state: dict, path: str | os.PathLike) -> None:
    """Save resume state (optimizer, epoch) atomically; tensors and plain types only."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | os.PathLike) -> dict:
    """Load resume state written by ``save_state``; never unpickles arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a bad file
        raise CheckpointError(f"Resume state {path} is unreadable ({err}); delete it to restart.") from err


# A user's own weights ---------------------------------------------------------------------------
__all__ += ["weights_file", "file_sha256", "read_user_weights", "fit_user_weights"]

# Files a MONAI bundle folder may keep its weights in, in the order they are looked for.
BUNDLE_WEIGHT_FILES: tuple[str, ...] = ("models/model.safetensors", "models/model.pt", "model.safetensors", "model.pt")
# Keys under which training scripts commonly nest the state dict of a checkpoint.
_NESTED_STATE_KEYS: tuple[str, ...] = ("state_dict", "model", "model_state_dict", "network", "net")


def weights_file(path: str | os.PathLike) -> Path:
    """The weights file ``--weights`` names: the file itself, or a MONAI bundle folder's
    ``models/model.safetensors`` (or ``models/model.pt``).

    Raises:
        CheckpointError: nothing usable is there.
    """
    candidate = Path(path).expanduser()
    if candidate.is_dir():
        for name in BUNDLE_WEIGHT_FILES:
            if (candidate / name).is_file():
                return candidate / name
        raise CheckpointError(
            f"--weights {path}: the folder holds none of {', '.join(BUNDLE_WEIGHT_FILES)}. Give a MONAI bundle "
            "folder, a .safetensors file or a PyTorch state dict (.pt/.pth)."
        )
    if not candidate.is_file():
        raise CheckpointError(f"--weights {path}: no such file or folder. Give a .safetensors file, a PyTorch state dict or a MONAI bundle folder.")
    return candidate


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tensor_mapping(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def read_user_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a user's checkpoint, without running any code from it.

    Reads safetensors, or a PyTorch file with ``torch.load(weights_only=True)`` (which refuses every
    pickled object but tensors and plain containers, before anything runs). A state dict nested
    under ``state_dict``/``model``/``network`` is unwrapped, and a ``module.`` prefix (DataParallel)
    dropped.

    Args:
        path: a weights file or a MONAI bundle folder (see :func:`weights_file`).

    Raises:
        CheckpointError: unreadable, a pickle payload that is not a plain state dict, or no tensors.
    """
    file = weights_file(path)
    with open(file, "rb") as handle:
        head = handle.read(8)
    is_zip_or_pickle = head[:2] == b"PK" or head[:1] == b"\x80"
    if file.suffix == ".safetensors" or not is_zip_or_pickle:
        try:
            tensors: Any = load_file(str(file))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(
                f"--weights {file}: not a readable safetensors file ({err}). Give a .safetensors file, a PyTorch "
                "state dict (.pt) or a MONAI bundle folder."
            ) from err
    else:
        try:
            tensors = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            found = re.search(r"GLOBAL [\w.]+", str(err))
            what = f"it would call {found.group(0).split()[1]}" if found else "not a plain state dict"
            raise CheckpointError(
                f"--weights {file}: refused, the pickle holds Python objects besides tensors ({what}); nothing in it "
                "was run. "
                "autopeft never runs code from a checkpoint: save the plain state dict "
                "(torch.save(model.state_dict(), path)) or convert it to safetensors."
            ) from None
        except Exception as err:  # noqa: BLE001 - torch raises several types for a bad file
            raise CheckpointError(f"--weights {file}: not a readable PyTorch file ({type(err).__name__}: {err}).") from err
    if not _tensor_mapping(tensors) and isinstance(tensors, dict):
        nested = [key for key in _NESTED_STATE_KEYS if _tensor_mapping(tensors.get(key))]
        if nested:
            tensors = tensors[nested[0]]
    if not _tensor_mapping(tensors):
        kind = f"a dict with keys {', '.join(map(str, list(tensors)[:8]))}" if isinstance(tensors, dict) else type(tensors).__name__
        raise CheckpointError(
            f"--weights {file}: not a plain state dict (name -> tensor); it holds {kind}. Save "
            "model.state_dict() (or nest it under 'state_dict')."
        )
    if all(key.startswith("module.") for key in tensors):
        tensors = {key[len("module."):]: value for key, value in tensors.items()}
    return dict(tensors)


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


def _fit_forms(model: nn.Module) -> dict[str, tuple[str, dict[str, tuple[int, ...]]]]:
    """Ways a file may hold ``model``: the whole backbone, or its network alone (a prefix added)."""
    forms = {"backbone": ("", _shapes(model))}
    net = getattr(model, "net", None)
    if isinstance(net, nn.Module) and net is not model and getattr(model, "discriminator", None) is None:
        prefix = next((f"{name}." for name, child in model.named_children() if child is net), "")
        forms["network"] = (prefix, _shapes(net))
    return forms


def _mismatch(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> tuple[list[str], list[str], list[str]]:
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    wrong = sorted(k for k in set(shapes) & set(tensors) if tuple(tensors[k].shape) != shapes[k])
    return missing, unexpected, wrong


def fit_user_weights(tensors: dict[str, torch.Tensor], model: nn.Module, source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``tensors`` as a state dict of ``model`` (a backbone), or an error that says what differs.

    The file may hold the backbone's whole state dict or, for a backbone without a discriminator,
    its network's alone (e.g. the state dict of MONAI's UNETR).

    Raises:
        CheckpointError: listing the missing, unexpected and mis-shaped names, and the registered
            backbones and presets the file fits instead (or comes closest to).
    """
    best: tuple[int, str, list[str], list[str], list[str]] | None = None
    for form, (prefix, shapes) in _fit_forms(model).items():
        missing, unexpected, wrong = _mismatch(tensors, shapes)
        if not (missing or unexpected or wrong):
            return {prefix + key: value for key, value in tensors.items()}
        score = len(missing) + len(unexpected) + len(wrong)
        if best is None or score < best[0]:
            best = (score, form, missing, unexpected, wrong)
    assert best is not None
    _, form, missing, unexpected, wrong = best
    parts = [f"missing {len(missing)}: {_names(missing)}" if missing else "",
             f"unexpected {len(unexpected)}: {_names(unexpected)}" if unexpected else "",
             f"shape differs for {len(wrong)}: " + _names([f"{k} {tuple(tensors[k].shape)} (model {tuple(_fit_forms(model)[form][1][k])})" for k in wrong]) if wrong else ""]
    name = getattr(model, "name", "") or type(model).__name__
    preset = getattr(getattr(model, "preset", None), "name", "?")
    hint = _closest_fit(tensors)
    raise CheckpointError(
        f"--weights {source} does not fit {name}/{preset} (compared as its {form} state dict; "
        f"{'; '.join(p for p in parts if p)}). {hint}"
    )


def _closest_fit(tensors: dict[str, torch.Tensor]) -> str:
    """Which registered backbone and preset a set of tensors fits (built on the meta device: free)."""
    scored = []
    for name, presets in registered_backbones().items():
        for preset in presets:
            try:
                with torch.device("meta"):
                    candidate = build_backbone(name, preset)
            except Exception:  # noqa: BLE001 - a backbone that cannot build on meta is skipped
                continue
            for form, (_, shapes) in _fit_forms(candidate).items():
                missing, unexpected, wrong = _mismatch(tensors, shapes)
                matched = len(set(tensors) & set(shapes)) - len(wrong)
                scored.append((not (missing or unexpected or wrong), matched / max(len(shapes), len(tensors)), name, preset, form))
    exact = [f"--backbone {n} --preset {p}" for ok, _, n, p, _ in scored if ok]
    if exact:
        return f"It fits {' or '.join(exact)}: pass those."
    close = sorted(scored, key=lambda row: row[1], reverse=True)[:1]
    if close and close[0][1] > 0:
        _, share, n, p, form = close[0]
        return (f"It fits no registered backbone exactly; closest: {n}/{p} ({100 * share:.0f}% of the names and shapes agree, "
                f"as its {form}). Was it trained with other options?")
    return "It fits no registered backbone ('autopeft backbones' lists them)."
