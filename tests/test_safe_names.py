"""Names that come from data never become paths as they are (#24): autopeft._io.path_component,
path_inside and the writers that use them."""

from __future__ import annotations

import doctest
import os
import re

import pytest

from autopeft import _io
from autopeft._io import MAX_COMPONENT, adopt_legacy, atomic_write_text, path_component, path_inside
from autopeft.errors import DataError

# Scanner and subject names a data set may hold: separators, traversal, spaces, options,
# non-ASCII, overlong.
HOSTILE = [
    "Philips Gemini / Allegro",
    "Siemens Biograph HiRez / TruePoint",
    "Evil/" + "../" * 8 + "tmp",
    "..",
    ".",
    "../x",
    "a\\b",
    "C:\\scans",
    "with space",
    "-rf",
    ".hidden",
    "Müller Ωmega 日本",
    "x" * 300,
    "",
    "a\x00b",
    "tab\tnew\nline",
    "Siemens ECAT HR+",
]


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_name_becomes_one_plain_bounded_component(name):
    part = path_component(name)
    assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", part), part
    assert part not in (".", "..") and "/" not in part and "\\" not in part
    assert 0 < len(part) <= MAX_COMPONENT
    assert part != name  # each of these needed changing
    assert part == path_component(name)  # the same name, the same path, in every process


@pytest.mark.parametrize("name", ["1", "HRRT", "Biograph_mCT-2", "sub-001", "a.b", "No-FT", "trial12", "x" * MAX_COMPONENT])
def test_a_safe_name_is_kept_as_it_is_so_caches_keep_their_keys(name):
    assert path_component(name) == name
    assert path_component(path_component(name)) == name


def test_names_never_share_a_component():
    names = HOSTILE + ["Philips Gemini  Allegro", "Philips-Gemini-Allegro", "Philips Gemini/Allegro", "a/b", "a b", "a-b",
                       "x" * 301, "x" * 299, "1", "01"]
    # A kept name that looks like a hashed one is hashed too: a crafted name cannot take another's place.
    names.append(path_component("a b"))
    parts = [path_component(n) for n in names]
    assert len(set(parts)) == len(set(names))


def test_the_readable_part_survives():
    assert path_component("Philips Gemini / Allegro").startswith("Philips-Gemini-Allegro--")
    assert path_component("Müller").startswith("Muller--")
    assert path_component("sub 01").startswith("sub-01--")


def test_docstring_examples_hold():
    failures, attempted = doctest.testmod(_io)
    assert failures == 0 and attempted >= 3


def test_path_inside_refuses_what_leaves_the_root(tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    assert path_inside(root, root / "pretrained" / "a" / "model.safetensors") == root / "pretrained" / "a" / "model.safetensors"
    for escape in (root / ".." / "elsewhere", root / "a" / ".." / ".." / "x", tmp_path / "other", "/etc/passwd"):
        with pytest.raises(DataError, match=r"`path` must lie inside .*, but got"):
            path_inside(root, escape)
    # A symbolic link into the root is the user's own choice (a cache moved to a bigger disk).
    (tmp_path / "big").mkdir()
    os.symlink(tmp_path / "big", root / "pretrained")
    assert path_inside(root, root / "pretrained" / "k" / "model.safetensors")
    with pytest.raises(DataError):
        path_inside(root, root / "pretrained" / ".." / ".." / "x")


def test_atomic_writers_check_their_root_before_writing(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    atomic_write_text(root / "ok.txt", "x", inside=root)
    with pytest.raises(DataError, match="nothing was written"):
        atomic_write_text(root / ".." / "escaped.txt", "x", inside=root)
    assert not (tmp_path / "escaped.txt").exists()


def test_a_legacy_cache_entry_is_moved_once_and_said_once(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(_io, "_ADOPTED", set())
    root = tmp_path / "pretrained"
    old = root / "unetr-tiny-srcPhilips Gemini " / " Allegro-fold0"  # what a '/' in a name made
    old.mkdir(parents=True)
    (old / "model.safetensors").write_bytes(b"w")
    new = root / f"unetr-tiny-src{path_component('Philips Gemini / Allegro')}-fold0"
    assert adopt_legacy(root, old, new, what="source models")
    assert (new / "model.safetensors").read_bytes() == b"w" and not (root / "unetr-tiny-srcPhilips Gemini ").exists()
    assert "source models in the cache are re-keyed" in capsys.readouterr().err
    assert not adopt_legacy(root, old, new, what="source models")  # nothing left to move
    other = root / "old2"
    other.mkdir()
    assert adopt_legacy(root, other, root / "new2", what="source models")
    assert capsys.readouterr().err == ""  # said once
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert not adopt_legacy(root, root / ".." / "elsewhere", root / "new3", what="source models")
    assert outside.is_dir() and not (root / "new3").exists()
