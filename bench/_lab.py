"""What bench/table.py and bench/replay.py share: the declared scenarios, plan ids, the table's files.

Kept torch-free at import time so that ``--help`` and the tests of the pure parts stay fast.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS_FILE = ROOT / "bench" / "scenarios.yaml"
RESULTS = ROOT / "bench" / "results"
TABLES = RESULTS / "tables"
ROLES = ("tuning", "lab", "confirm")


def load_declared(path: Path = SCENARIOS_FILE) -> dict[str, Any]:
    """``bench/scenarios.yaml`` read with ``yaml.safe_load`` and checked field by field."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise SystemExit(f"{path}: cannot read the declared scenarios ({error}); restore it from git (git checkout -- {path}).")
    for section in ("scenarios", "table", "replay", "decisions"):
        if not isinstance((data or {}).get(section), dict):
            raise SystemExit(f"{path}: the `{section}` section is missing or not a mapping; restore the file from git.")
    for name, spec in data["scenarios"].items():
        missing = [k for k in ("role", "backbone", "scanners", "data_seed") if k not in (spec or {})]
        if missing:
            raise SystemExit(f"{path}: scenarios.{name} lacks {', '.join(missing)}.")
        if spec["role"] not in ROLES:
            raise SystemExit(f"{path}: scenarios.{name}.role must be one of {', '.join(ROLES)}, but got {spec['role']!r}.")
    return data


def scenario(name: str, declared: dict[str, Any]) -> dict[str, Any]:
    """The declared scenario ``name`` (with its name), or an error listing the declared ones."""
    import difflib

    scenarios = declared["scenarios"]
    if name not in scenarios:
        near = difflib.get_close_matches(name, list(scenarios), n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise SystemExit(f"--scenario: {name!r} is not declared in {SCENARIOS_FILE}.{hint} Declared: {', '.join(scenarios)}.")
    return {"name": name, **scenarios[name], "scanners": [str(s) for s in scenarios[name]["scanners"]]}


def plan_id(plan: dict[str, Any]) -> str:
    """A plan's stable id: the SHA-256 of its dict (``Plan.to_dict()``, learning rate and epochs
    included) as sorted JSON, 12 hex digits. The same plan drawn by the replay's study gets the
    same id as in the table."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode("utf-8")).hexdigest()[:12]


def code_version() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict[str, Any]:
    import os
    import platform

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}


def curve_columns(epochs: int) -> list[str]:
    """The table's learning-curve columns: validation PSNR after epochs 1 .. E."""
    return [f"val_e{e}" for e in range(1, epochs + 1)]


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
