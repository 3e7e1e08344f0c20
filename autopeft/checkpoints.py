"""Model checkpoints: safetensors weights with JSON metadata, written atomically.

Nothing here unpickles: weights are safetensors; optimizer state for resuming is loaded with
``torch.load(weights_only=True)`` and only ever read back from files autopeft itself wrote.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from autopeft.errors import CheckpointError

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "read_metadata",
    "atomic_write_bytes",
    "atomic_write_text",
    "save_state",
    "load_state",
]

_META_KEY = "autopeft"


def _atomic_target(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    path = Path(path)
    fd, tmp = _atomic_target(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(module: nn.Module, path: str | os.PathLike, metadata: dict[str, Any]) -> None:
    """Save ``module.state_dict()`` as safetensors with ``metadata`` (JSON-serialisable) attached."""
    path = Path(path)
    tensors = {name: t.detach().contiguous().cpu() for name, t in module.state_dict().items()}
    fd, tmp = _atomic_target(path)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={_META_KEY: json.dumps(metadata, sort_keys=True)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    path = Path(path)
    fd, tmp = _atomic_target(path)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state(path: str | os.PathLike) -> dict:
    """Load resume state written by ``save_state``; never unpickles arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a bad file
        raise CheckpointError(f"Resume state {path} is unreadable ({err}); delete it to restart.") from err
