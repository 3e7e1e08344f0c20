"""Where autopeft writes, and how: the cache root, names made into paths, and atomic writes.

Every file autopeft writes for others to read (run records, caches, reports, bundles, data) is
written to a temporary file beside the target and then ``os.replace``d onto it, so a reader or an
interrupted run sees either the old file or the new one, never half of one. Temporary names are
unique per process and call (two processes writing the same file each replace it whole) and start
with ``.partial-`` so that leftovers of a killed process are recognisable.

Names that come from data (a sidecar's scanner name, a manifest's ``subject`` or ``scanner``, a
plan's label) are input from outside: they become paths only through :func:`path_component`, and
writers check with :func:`path_inside` (or ``inside=``) that what they write lies in its root (the
cache, the run directory, ``--out``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sys
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autopeft.errors import DataError

__all__ = [
    "PARTIAL_PREFIX", "MAX_COMPONENT", "atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
    "cache_root", "path_component", "path_inside", "adopt_legacy",
]

PARTIAL_PREFIX = ".partial-"
MAX_COMPONENT = 64
"""The longest :func:`path_component`: a cache key holds a few of them, well under 255 bytes."""

# Names kept as they are: what every filesystem, shell and object store takes without quoting, not
# hidden, not an option (no leading '-' or '.'), and without '--', which marks a hashed name.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9._]+|\.{2,}")  # '-' included: runs of it collapse to one
_HASH_CHARS = 12


def cache_root() -> Path:
    """``$AUTOPEFT_CACHE``, or ``~/.cache/autopeft`` when it is unset or empty."""
    return Path(os.environ.get("AUTOPEFT_CACHE") or Path.home() / ".cache" / "autopeft").expanduser()


def path_component(name: object) -> str:
    """``name`` as one path component that is safe on every filesystem, and distinct per name.

    A name made of ``A-Z a-z 0-9 . _ -`` that starts with a letter, digit or ``_``, holds no
    ``--`` and has at most :data:`MAX_COMPONENT` characters is kept as it is (so caches keyed on
    such names keep their keys). Any other name becomes a readable ASCII stem, ``--`` and 12 hex
    digits of the SHA-256 of the name: no separator, never ``.`` or ``..``, never a leading ``-``
    or ``.``, at most :data:`MAX_COMPONENT` characters. Two names never share a component (short of
    a SHA-256 collision): kept names hold no ``--``, hashed ones end in ``--`` and the hash.

    Args:
        name: any name (a scanner, subject or plan label); ``str(name)`` is used.

    Returns:
        The component.

    Examples:
        >>> path_component("Biograph_mCT-2")
        'Biograph_mCT-2'
        >>> path_component("Philips Gemini / Allegro")
        'Philips-Gemini-Allegro--f2db842bca75'
        >>> path_component("../../etc")
        'etc--74ccf3c5b4c1'
    """
    text = str(name)
    if len(text) <= MAX_COMPONENT and "--" not in text and _SAFE_NAME.fullmatch(text):
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_CHARS]
    # NFKD keeps the letters of accented names readable ("Müller" -> "Muller").
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    stem = re.sub(r"-{2,}", "-", _UNSAFE_RUN.sub("-", ascii_text)).strip("-._")
    stem = stem[: MAX_COMPONENT - 2 - _HASH_CHARS].rstrip("-._") or "name"
    return f"{stem}--{digest}"


def path_inside(root: str | os.PathLike, path: str | os.PathLike, *, what: str = "path") -> Path:
    """``path``, after checking that it lies inside ``root``: the check every writer makes before
    writing a path built from a name (a defence in depth behind :func:`path_component`).

    The path is inside when it resolves (symlinks and ``..`` followed) into ``root`` resolved, or
    when it names a place under ``root`` without any ``..``, so that a user's own symbolic link
    inside ``root`` (a cache folder moved to a bigger disk) still counts as inside.

    Args:
        root: the folder writes must stay in (the cache, a run directory, an ``--out``).
        path: the path to check, absolute or relative to the working directory (as for ``open``).
        what: how messages name the path. Defaults to ``path``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        DataError: the path leaves ``root``.
    """

    path = Path(path).expanduser()
    base = Path(root).expanduser()
    absolute, absolute_base = Path.cwd() / path, Path.cwd() / base  # unchanged when already absolute
    resolved, resolved_base = absolute.resolve(), absolute_base.resolve()
    lexical, lexical_base = Path(os.path.normpath(absolute)), Path(os.path.normpath(absolute_base))
    if resolved == resolved_base or resolved_base in resolved.parents:
        return path
    if ".." not in absolute.parts and (lexical == lexical_base or lexical_base in lexical.parents):
        return path
    raise DataError(
        f"`{what}` must lie inside {resolved_base}, but got {path} (it resolves to {resolved}). A name read from the "
        "data (a scanner, subject or label) reached a path without autopeft._io.path_component; nothing was written. "
        "Please report this as a bug.")


_ADOPTED: set[str] = set()


def adopt_legacy(root: str | os.PathLike, legacy: str | os.PathLike, current: str | os.PathLike, *, what: str) -> bool:
    """Move a cache entry from the path an earlier autopeft gave it (a name used as it was, before
    :func:`path_component`) to its path now, and say so once per kind of entry and process.

    Nothing happens when ``current`` exists, ``legacy`` does not, the two are the same, or
    ``legacy`` lies outside ``root`` (a name with ``..`` never moves files outside the cache).

    Args:
        root: the cache folder both lie in (e.g. ``<cache>/pretrained``).
        legacy: the old path.
        current: the new path.
        what: what the entries are, for the message (``source models``).

    Returns:
        Whether an entry was moved.
    """
    legacy, current = Path(legacy), Path(current)
    try:
        path_inside(root, legacy)
        path_inside(root, current)
        if legacy == current or current.exists() or not legacy.exists():
            return False
    except ValueError:  # outside root, or not a path at all (a NUL in the name)
        return False
    try:
        current.parent.mkdir(parents=True, exist_ok=True)
        os.replace(legacy, current)
    except OSError:  # another process moved it first, or it cannot move: the entry is made again
        return current.exists()
    # A name with '/' made nested folders: remove the ones left empty.
    base = Path(root).resolve()
    for parent in legacy.parents:
        if parent.resolve() == base or base not in parent.resolve().parents:
            break
        try:
            parent.rmdir()
        except OSError:
            break
    if what not in _ADOPTED:
        _ADOPTED.add(what)
        print(f"autopeft: {what} in the cache are re-keyed: names that are not plain letters, digits, '.', '_' and '-' "
              f"now go into paths through autopeft._io.path_component (first: {legacy.name} -> {current.name} in "
              f"{current.parent}); moved, not made again.", file=sys.stderr)
    return True


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any], *, keep_suffix: bool = False,
                 inside: str | os.PathLike | None = None) -> Path:
    """Have ``write(tmp)`` write a temporary file beside ``path``, then move it onto ``path``.

    Args:
        path: the file to write; its folder is created.
        write: writes the whole content to the path it is given.
        keep_suffix: end the temporary name with ``path``'s suffixes, for writers that choose the
            format by name (nibabel: ``.nii.gz``). Defaults to False: it ends in ``.tmp``, so a
            reader globbing ``*.json`` never picks a file up while it is being written.
        inside: the folder ``path`` must lie in (:func:`path_inside`), for a path built from a
            name. Defaults to None (no check).

    Returns:
        ``path``.

    Raises:
        DataError: ``path`` leaves ``inside``; nothing is written.
    """
    if inside is not None:
        path_inside(inside, path)
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


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, inside: str | os.PathLike | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`, ``inside`` as there)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), inside=inside)


def atomic_write_text(path: str | os.PathLike, text: str, *, inside: str | os.PathLike | None = None) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (:func:`atomic_write`, ``inside`` as there)."""
    return atomic_write_bytes(path, text.encode("utf-8"), inside=inside)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1,
                      inside: str | os.PathLike | None = None, **dumps: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (``inside`` as in :func:`atomic_write`);
    ``dumps`` go to :func:`json.dumps` (e.g. ``default=str``, ``sort_keys=True``)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, **dumps), inside=inside)
