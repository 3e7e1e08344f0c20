"""The installed layout: backbones/ and search_spaces/ live inside the autopeft namespace."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import autopeft

ROOT = Path(__file__).resolve().parents[1]


def _declared() -> tuple[list[str], dict[str, str]]:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return setuptools["packages"], setuptools["package-dir"]


def test_every_package_folder_is_declared_under_the_autopeft_namespace():
    packages, package_dir = _declared()
    found = []
    for init in ROOT.glob("**/__init__.py"):
        folder = init.parent.relative_to(ROOT)
        if folder.parts[0] in {"autopeft", *(p for p in package_dir.values())}:
            found.append(folder)
    names = set()
    for folder in found:
        top = folder.parts[0]
        mapped = next((name for name, path in package_dir.items() if path == top), top)
        names.add(".".join([mapped, *folder.parts[1:]]))
    assert names == set(packages)
    assert all(name == "autopeft" or name.startswith("autopeft.") for name in packages)


def test_backbones_and_spaces_import_from_the_namespace_only():
    import autopeft.backbones
    import autopeft.search_spaces

    assert Path(autopeft.backbones.__file__).parent == ROOT / "backbones"
    assert (Path(autopeft.search_spaces.SPACES_DIR) / "unetr.yaml").is_file()
    assert Path(autopeft.__file__).parent == ROOT / "autopeft"


def test_the_installed_environment_has_no_generic_top_level_names(tmp_path):
    # Run away from the repository (whose folders the current directory would expose), as a user would.
    probe = "import importlib.util as u; print([n for n in ('backbones', 'search_spaces') if u.find_spec(n)])"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
