"""Serve a search run's Optuna study in optuna-dashboard (live: it reads study.db as trials land).

The dashboard shows every trial's parameters, values and user attributes (the 'state' attribute
tells FINISHED from STOPPED early: ASHA-stopped trials are PRUNED in Optuna, their running gains
kept as intermediate values; over-budget draws are PRUNED too, with no value, their 'state'
INFEASIBLE and their budget constraint kept), with history, importance and parallel-coordinate plots. It listens on 127.0.0.1 (this
machine only) unless --host says otherwise; the study database is opened read-write, so do not
expose it to a network you do not trust. Stop it with Ctrl-C.

For a remote machine, keep the default host and forward the port:
  ssh -L 8080:127.0.0.1:8080 user@remote   then open http://127.0.0.1:8080/ here.

Ray's own dashboard (cluster, workers, logs) is 'autopeft search --dashboard'.

examples:
  autopeft dashboard runs/unetr-20250101-120000
  autopeft dashboard runs/unetr-20250101-120000 --port 8081
"""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the folder 'autopeft search' wrote (its --out)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on")


def run(args: argparse.Namespace) -> int:
    from autopeft.errors import ConfigError
    from autopeft.report import load_run
    from autopeft.runs import study_path, study_storage_url

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be in 1..65535, but got {args.port}.")
    run_dir = load_run(args.run_dir).run_dir
    if not study_path(run_dir).is_file():
        raise ConfigError(f"{run_dir} has no study.db yet: the search has not opened its study (wait until pre-training ends).")
    from optuna_dashboard import run_server

    host_text = f"[{args.host}]" if ":" in args.host else args.host
    print(f"optuna-dashboard for {run_dir.name}: http://{host_text}:{args.port}/  (Ctrl-C to stop)", flush=True)
    run_server(study_storage_url(run_dir), host=args.host, port=args.port)
    return 0
