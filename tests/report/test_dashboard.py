"""`autopeft dashboard` serves a run's Optuna study on loopback (a real optuna-dashboard server in a
subprocess, asked over HTTP), and refuses folders that are not runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest

from autopeft.errors import ConfigError
from autopeft.runs import study_storage_url

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _other_address() -> str | None:
    """This machine's address on its default route (no packet is sent), or None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


@pytest.fixture()
def study_run(tmp_path) -> Path:
    """A run directory holding only what the dashboard reads: run.json and study.db."""
    (tmp_path / "run.json").write_text(json.dumps({"study_name": "dash", "sessions": 1, "config": {}}))
    study = optuna.create_study(storage=study_storage_url(tmp_path), study_name="dash", direction="maximize")
    study.optimize(lambda t: t.suggest_float("lr", 1e-4, 1e-2, log=True), n_trials=3)
    return tmp_path


def test_dashboard_serves_the_study_on_loopback(study_run):
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from autopeft.cli import main; sys.exit(main())", "dashboard", str(study_run), "--port", str(port)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ),
    )
    try:
        deadline, body, status = time.time() + 60, "", None
        while time.time() < deadline and status is None:
            if process.poll() is not None:
                pytest.fail(f"the dashboard exited with {process.returncode}: {process.stdout.read()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                    status, body = response.status, response.read().decode("utf-8", "replace")
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.3)
        assert status == 200, "no answer from the dashboard within 60 s"
        assert "<html" in body.lower()
        # The study itself is served: its API lists the study by name.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as response:
            assert "dash" in response.read().decode()
        # ... and only there: this machine's other address is refused (where it has one).
        other = _other_address()
        if other is not None:
            with pytest.raises(OSError):
                socket.create_connection((other, port), timeout=2).close()
    finally:
        process.terminate()
        try:
            output, _ = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    assert f"http://127.0.0.1:{port}/" in output


def test_dashboard_refuses_a_folder_without_a_study(tmp_path):
    from autopeft.cli import main

    (tmp_path / "run.json").write_text(json.dumps({"study_name": "x", "sessions": 1, "config": {}}))
    assert main(["dashboard", str(tmp_path)]) == 2  # a ConfigError, reported as a usage error
    with pytest.raises(ConfigError, match="run.json"):
        from autopeft.report import load_run

        load_run(tmp_path / "missing")


def test_dashboard_rejects_a_bad_port(study_run):
    from autopeft.cli import main

    assert main(["dashboard", str(study_run), "--port", "70000"]) == 2
