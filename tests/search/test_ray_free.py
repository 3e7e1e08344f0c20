"""The search algorithm needs no Ray: every module of autopeft.search imports, and every name it
offers resolves, in a fresh interpreter where ``import ray`` fails. Ray is the runner's."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import autopeft.search

ROOT = Path(__file__).resolve().parents[2]


def test_every_module_of_the_search_imports_with_ray_unimportable():
    names = sorted(m.name for m in pkgutil.walk_packages(autopeft.search.__path__, "autopeft.search."))
    assert "autopeft.search.space" in names and "autopeft.search.asking" in names
    code = "\n".join([
        "import importlib, sys",
        "sys.modules['ray'] = None  # `import ray` (and ray.*) now raises ImportError",
        f"for name in {names!r}:",
        "    importlib.import_module(name)",
        "import autopeft.search as search",
        "for name in search.__all__:",
        "    getattr(search, name)",
        "assert sys.modules['ray'] is None, 'something put Ray back'",
    ])
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_check_does_fail_on_a_module_that_imports_ray():
    code = "import sys\nsys.modules['ray'] = None\nimport autopeft.runner._searcher"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "ray" in result.stderr
