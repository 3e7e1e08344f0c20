"""Artifacts every node of a Ray cluster reads: source models, importance maps and the scans.

A search on a cluster keeps them in an :class:`ArtifactStore` under its ``--storage-path`` (a shared
folder, or a URI pyarrow understands: ``s3://``, ``gs://``, ...), beside Ray Tune's own files. Each
node keeps a copy in its local cache (:func:`autopeft.pretraining.cache_root`), laid out as the
store is, so the code that reads the cache does not know where a file came from:

    <store>/pretrained/<spec key>/model.safetensors    a pre-trained source model
    <store>/importance/<...>.safetensors               SH-PEFT importance maps of a pair
    <store>/data/<manifest digest>/manifest.csv        the scans, one folder per manifest row

Keys hash file contents (``manifest_digest``, the source model's spec), never paths or times, so a
copy on another node keys the same; names in them went through ``autopeft._io.path_component``, and
a key with ``..`` or a local copy outside the cache is refused. Every file is written under a
temporary name and moved into place, so readers see it whole or not at all, and two processes
producing the same artifact both succeed (same bytes); a data set's manifest is written last and
marks it complete.
"""

from __future__ import annotations

import csv
import io
import os
import uuid
from pathlib import Path

from pyarrow import fs

from autopeft._io import atomic_write_text, cache_root, path_inside
from autopeft.data import read_manifest
from autopeft.data.simulator import MANIFEST_COLUMNS
from autopeft.errors import DataError
from autopeft.pretraining import manifest_digest

__all__ = ["ArtifactStore", "is_uri"]

_CHUNK = 1 << 20


def is_uri(path: str) -> bool:
    """Whether ``path`` names a remote filesystem (``scheme://...``) rather than a local folder."""
    return "://" in str(path) and not str(path).startswith("file://")


def _local_replace(tmp: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)


class ArtifactStore:
    """Files under ``root`` (a local or shared folder, or a pyarrow URI), mirrored into a local cache.

    Args:
        root: the store's folder or URI.
        cache: the node's local cache root. Defaults to ``autopeft.pretraining.cache_root()``.
    """

    def __init__(self, root: str, *, cache: str | os.PathLike | None = None) -> None:
        self.root = str(root).rstrip("/")
        if is_uri(self.root):
            self._fs, self._base = fs.FileSystem.from_uri(self.root)
        else:
            self._fs = fs.LocalFileSystem()
            self._base = os.path.abspath(self.root.removeprefix("file://"))
        self._cache = Path(cache) if cache is not None else None

    @property
    def cache(self) -> Path:
        return self._cache or cache_root()

    def _remote(self, key: str) -> str:
        parts = str(key).split("/")
        # Keys are made by autopeft (names through path_component); a store or manifest edited by
        # someone else must still not reach outside the store.
        if str(key).startswith("/") or any(part in ("", ".", "..") for part in parts):
            raise DataError(f"artifact `key` must be a relative path without empty, '.' or '..' parts, but got {key!r}.")
        return f"{self._base}/{key}"

    def _local(self, relative: str, folder: Path | None = None) -> Path:
        """``folder / relative`` (``folder``: the cache), checked to lie inside ``folder``."""
        folder = self.cache if folder is None else folder
        return path_inside(folder, folder / relative, what="an artifact's local copy")

    def has(self, key: str) -> bool:
        return self._fs.get_file_info(self._remote(key)).type == fs.FileType.File

    def put(self, source: str | os.PathLike, key: str) -> None:
        """Copy the local file ``source`` to ``key`` (nothing when the store has it already)."""
        if self.has(key):
            return
        remote = self._remote(key)
        self._fs.create_dir(remote.rsplit("/", 1)[0], recursive=True)
        tmp = f"{remote}.tmp-{uuid.uuid4().hex[:8]}"
        # compression=None: pyarrow would otherwise (un)gzip .nii.gz files on the way.
        with open(source, "rb") as handle, self._fs.open_output_stream(tmp, compression=None) as out:
            for chunk in iter(lambda: handle.read(_CHUNK), b""):
                out.write(chunk)
        self._fs.move(tmp, remote)  # a rename on a filesystem: readers never see half a file

    def get(self, key: str, target: str | os.PathLike) -> bool:
        """Copy ``key`` to the local file ``target`` (kept when present); False when the store lacks it."""
        target = Path(target)
        if target.is_file():
            return True
        if not self.has(key):
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        with self._fs.open_input_stream(self._remote(key), compression=None) as handle, open(tmp, "wb") as out:
            while chunk := handle.read(_CHUNK):
                out.write(chunk)
        _local_replace(tmp, target)
        return True

    # The local cache mirrors the store: a cache-relative path is a key.
    def publish(self, relative: str) -> None:
        """Put the cache's file ``relative`` (e.g. ``pretrained/<key>/model.safetensors``) in the store."""
        self.put(self._local(relative), relative)

    def fetch(self, relative: str) -> bool:
        """Bring the store's ``relative`` into this node's cache; False when the store lacks it."""
        return self.get(relative, self._local(relative))

    def put_data(self, manifest_path: str | os.PathLike) -> str:
        """Ship a data set (its manifest, scans and ``scanners.json``) into the store; returns its key."""
        manifest = read_manifest(manifest_path)
        key = f"data/{manifest_digest(manifest)}"
        if self.has(f"{key}/manifest.csv"):
            return key
        rows = []
        for index, row in enumerate(manifest.itertuples(index=False)):
            names = []
            for path in (row.short, row.long):
                # One folder per row keeps each file's name, which the manifest digest includes.
                name = f"{index:05d}/{os.path.basename(path)}"
                self.put(path, f"{key}/{name}")
                names.append(name)
            rows.append([row.subject, row.scanner, *names])
        profiles = Path(manifest_path).parent / "scanners.json"
        if profiles.is_file():
            self.put(profiles, f"{key}/scanners.json")
        local = self.cache / key / "manifest.csv"
        _write_manifest(local, rows)
        self.put(local, f"{key}/manifest.csv")  # last: it marks the data set complete
        return key

    def data(self, key: str) -> Path:
        """This node's copy of the data set ``key`` (fetched on first use); its manifest path."""
        folder = self._local(key)
        if (folder / "manifest.csv").is_file():
            return folder / "manifest.csv"
        tmp = folder / f".manifest.tmp-{uuid.uuid4().hex[:8]}"
        if not self.get(f"{key}/manifest.csv", tmp):
            raise FileNotFoundError(f"the data set {key} is not in the artifact store {self.root}")
        with open(tmp, newline="", encoding="utf-8") as handle:
            for row in list(csv.DictReader(handle)):
                for column in ("short", "long"):
                    self.get(f"{key}/{row[column]}", self._local(row[column], folder))
        self.get(f"{key}/scanners.json", folder / "scanners.json")
        _local_replace(tmp, folder / "manifest.csv")  # last, as in the store
        return folder / "manifest.csv"


def _write_manifest(path: Path, rows: list[list[str]]) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text.getvalue())
