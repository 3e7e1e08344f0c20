"""scripts/gpu-check.sh where no GPU is needed: its syntax, its refusal without a GPU, and the search
it would run, parsed by the real command line into the settings it promises. Its summary of a run
(scripts/gpu_check_report.py) is checked on a confirmed CPU run in tests/runner/test_confirmation.py."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from autopeft.cli import build_parser
from autopeft.cli.search import _config
from autopeft.search.config import parse_duration, resolve_defaults

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu-check.sh"


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    # This test's own Python: the script must use the environment it is pointed at.
    environment = {**os.environ, "AUTOPEFT_PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=environment, timeout=120)


def test_the_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True).returncode == 0


def test_without_a_visible_gpu_it_refuses_with_exit_2_and_says_why(tmp_path):
    # CUDA_VISIBLE_DEVICES="" hides every GPU from torch, on a GPU machine too.
    result = _run("--out", str(tmp_path / "check"), CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 2
    assert "no GPU visible" in result.stderr and "sees no GPU" in result.stderr and "CUDA build of torch" in result.stderr
    assert not (tmp_path / "check").exists()  # nothing started


def test_unknown_options_are_refused():
    result = _run("--trials", "9")
    assert result.returncode == 2 and "unknown option '--trials'" in result.stderr


def test_the_search_it_runs_is_the_paper_preset_with_4_trials_on_2_pairs_and_1_confirmation_seed(tmp_path):
    result = _run("--dry-run", "--backbone", "cvtgan", "--gpus-per-trial", "0.5", "--out", str(tmp_path / "check"))
    assert result.returncode == 0, result.stderr
    simulate, search = (shlex.split(line) for line in result.stdout.strip().splitlines())
    parser = build_parser()
    data = parser.parse_args(simulate[1:])
    assert (data.command, data.scanners, data.subjects, data.size) == ("simulate", "1,5", 16, 64)
    args = parser.parse_args(search[1:])
    assert args.command == "search" and args.data == f"{data.out}/manifest.csv"
    config = resolve_defaults(_config(args, parse_duration(args.time_budget)), cluster_gpus=1)
    assert (config.backbone, config.preset, config.device, config.gpus_per_trial) == ("cvtgan", "paper", "cuda", 0.5)
    assert config.trials == 4 and config.scanners == ["1", "5"]  # 2 ordered pairs: 1->5, 5->1
    assert (config.confirm, config.confirm_folds, config.confirm_seeds) == (1, 1, 1)
    assert config.epochs == 20 and config.pretrain_epochs == 20 and config.time_budget_s == 240
    assert config.out == str(tmp_path / "check" / "run")
    assert config.amp is True  # the paper preset's "AMP on"
