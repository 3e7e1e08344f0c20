"""Where autopeft writes, and how: the cache root, and atomic writes.

Every file autopeft writes for others to read (run records, caches, reports, bundles, data) is
written to a temporary file beside the target and then ``os.replace``d onto it, so a reader or an
interrupted run sees either the old file or the new one, never half of one. Temporary names are
unique per process and call (two processes writing the same file each replace it whole) and start
with ``.partial-`` so that leftovers of a killed process are recognisable.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["PARTIAL_PREFIX", "atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "cache_root"]

PARTIAL_PREFIX = ".partial-"


def cache_root() -> Path:
    """``$AUTOPEFT_CACHE``, or ``~/.cache/autopeft`` when it is unset or empty."""
    return Path(os.environ.get("AUTOPEFT_CACHE") or Path.home() / ".cache" / "autopeft").expanduser()


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any], *, keep_suffix: bool = False) -> Path:
    """Have ``write(tmp)`` write a temporary file beside ``path``, then move it onto ``path``.

    Args:
        path: the file to write; its folder is created.
        write: writes the whole content to the path it is given.
        keep_suffix: end the temporary name with ``path``'s suffixes, for writers that choose the
            format by name (nibabel: ``.nii.gz``). Defaults to False: it ends in ``.tmp``, so a
            reader globbing ``*.json`` never picks a file up while it is being written.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tail = "".join(path.suffixes) if keep_suffix else ".tmp"
    tmp = path.with_name(f"{PARTIAL_PREFIX}{path.name}.{os.getpid()}-{secrets.token_hex(4)}{tail}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1, **dumps: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically; ``dumps`` go to :func:`json.dumps`
    (e.g. ``default=str``, ``sort_keys=True``)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, **dumps))
