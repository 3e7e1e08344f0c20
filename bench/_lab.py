"""What the lab's benches share (bench/table.py, replay.py, and rediscovery.py's ``--lab``): the
declared scenarios, plan ids, the table's files, the variants and their fading strengths.

Kept torch-free at import time so that ``--help`` and the tests of the pure parts stay fast.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS_FILE = ROOT / "bench" / "scenarios.yaml"
RESULTS = ROOT / "bench" / "results"
TABLES = RESULTS / "tables"
ROLES = ("tuning", "lab", "confirm")
BASELINE = "no-priors"  # the variant every other is paired against: TPE, the portfolio first, no prior


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


def declared_betas(horizon_trials: int) -> dict[str, float]:
    """The declared fading strengths (decisions.prior_default): name suffix -> beta."""
    h = horizon_trials
    return {"-bh/10": h / 10, "-bh/3": h / 3, "-bh": float(h)}


def variant_list(signals: Sequence[str], betas: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Every variant: name -> {sampler, prior (None, signal name, oracle, inverted/permuted), beta}.
    The controls run at the middle beta."""
    out: dict[str, dict[str, Any]] = {BASELINE: {"sampler": "tpe", "prior": None, "beta": None},
                                      "random": {"sampler": "random", "prior": None, "beta": None}}
    for signal in signals:
        for label, beta in betas.items():
            out[f"{signal}{label}"] = {"sampler": "tpe", "prior": signal, "beta": beta}
    for label, beta in betas.items():
        out[f"oracle{label}"] = {"sampler": "tpe", "prior": "oracle", "beta": beta}
    middle = list(betas.items())[len(betas) // 2]
    for signal in signals:
        out[f"inverted-{signal}"] = {"sampler": "tpe", "prior": f"inverted:{signal}", "beta": middle[1]}
        out[f"permuted-{signal}"] = {"sampler": "tpe", "prior": f"permuted:{signal}", "beta": middle[1]}
    return out


def paired(differences: Sequence[float], *, seed: int = 0) -> dict[str, Any]:
    """Mean of paired differences with its t 95% interval and a BCa bootstrap 95% interval."""
    from scipy import stats

    d = np.asarray(differences, dtype=float)
    n = len(d)
    mean = float(d.mean())
    sem = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    if n > 1 and sem > 0:
        low, high = stats.t.interval(0.95, n - 1, loc=mean, scale=sem)
    else:
        low = high = mean if n > 1 else float("nan")
    bca = [float("nan"), float("nan")]
    if n > 2 and np.ptp(d) > 0:
        boot = stats.bootstrap((d,), np.mean, confidence_level=0.95, method="BCa", n_resamples=2000,
                               rng=np.random.default_rng(seed))
        bca = [float(boot.confidence_interval.low), float(boot.confidence_interval.high)]
    return {"mean": mean, "t_ci": [float(low), float(high)], "bca_ci": bca, "n": n}
