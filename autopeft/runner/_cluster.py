"""Where a search's trials run: the Ray cluster, its resources, and what its nodes can read.

On a cluster of several machines a trial runs where Ray places it, so the search checks before any
trial that every node able to run one reads the storage path (Ray Tune's checkpoints and the
artifact store) and the scans. Scans a node cannot read are shipped through the artifact store
when a ``--storage-path`` is given; otherwise the search stops and names the fix.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from autopeft._plugins import PLUGINS_ENV
from autopeft.artifacts import is_uri
from autopeft.backbones.network import NETWORKS_ENV
from autopeft.data import read_manifest
from autopeft.errors import ConfigError, DataError

__all__ = ["Cluster", "start_ray", "trial_resources", "tune_resources", "task_options", "check_nodes"]


@dataclass(frozen=True)
class Cluster:
    """The alive nodes of the Ray cluster and their resources (``ray.nodes()``, ``ray.cluster_resources()``)."""

    nodes: tuple[dict[str, Any], ...]
    resources: dict[str, float]

    @classmethod
    def read(cls) -> Cluster:
        nodes = tuple(n for n in ray.nodes() if n.get("Alive"))
        return cls(nodes=nodes, resources=dict(ray.cluster_resources()))

    @property
    def cpus(self) -> float:
        return float(self.resources.get("CPU", 0.0))

    @property
    def gpus(self) -> float:
        return float(self.resources.get("GPU", 0.0))

    def slots(self, per_trial: dict[str, float]) -> int:
        """How many trials of ``per_trial`` resources fit at once, over the nodes that can run one."""
        total = 0
        for node in self.nodes:
            have = node.get("Resources") or {}
            fits = [int(have.get(name, 0.0) // amount) for name, amount in per_trial.items() if amount > 0]
            total += min(fits) if fits else 0
        return total

    def trial_nodes(self, per_trial: dict[str, float]) -> list[dict[str, Any]]:
        """The nodes with enough of every resource for one trial."""
        return [n for n in self.nodes if all((n.get("Resources") or {}).get(k, 0.0) >= v for k, v in per_trial.items() if v > 0)]

    def describe(self) -> str:
        return f"{len(self.nodes)} node(s), {self.cpus:g} CPUs, {self.gpus:g} GPUs"


def trial_resources(config) -> dict[str, float]:
    """Ray resources of one trial: its CPUs, GPUs and any custom resources (``--trial-resources``)."""
    return {"CPU": float(config.cpus_per_trial), "GPU": float(config.gpus_per_trial), **config.trial_resources}


def tune_resources(config) -> dict[str, float]:
    """:func:`trial_resources` as ``tune.with_resources`` takes them."""
    return {"cpu": float(config.cpus_per_trial), "gpu": float(config.gpus_per_trial), **config.trial_resources}


def task_options(config) -> dict[str, Any]:
    """``ray.remote`` options that give a task (pre-training, confirmation) one trial's resources."""
    return {"num_cpus": config.cpus_per_trial, "num_gpus": config.gpus_per_trial,
            **({"resources": dict(config.trial_resources)} if config.trial_resources else {})}


def start_ray(config) -> None:
    """A local Ray (or the cluster at ``config.address``); with ``config.dashboard`` Ray's
    dashboard on loopback, its URL and how to sign in printed (token auth stays on)."""
    if ray.is_initialized():
        return
    options: dict[str, Any] = {"include_dashboard": config.dashboard}
    if config.dashboard:
        options["dashboard_host"] = "127.0.0.1"  # this machine only; forward the port with ssh -L
    forwarded = {name: os.environ[name] for name in (PLUGINS_ENV, NETWORKS_ENV) if os.environ.get(name)}
    if forwarded:  # workers on other nodes do not inherit the driver's environment
        options["runtime_env"] = {"env_vars": forwarded}
    context = ray.init(address=config.address, log_to_driver=False, configure_logging=False,
                       **options, **({} if config.address else {"num_cpus": os.cpu_count()}))
    if config.dashboard:
        url = getattr(context, "dashboard_url", None)
        if not url:
            print("Ray dashboard: not available (install ray[default] for it).", flush=True)
            return
        url = url if url.startswith("http") else f"http://{url}"
        if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
            auth = "token authentication is disabled (RAY_AUTH_MODE=disabled)"
        else:
            auth = ("it asks for a token: paste the contents of ~/.ray/auth_token (the cluster's token; "
                    "scripts send 'Authorization: Bearer <token>')")
        print(f"Ray dashboard: {url}/ ; {auth}", flush=True)


def _probe(storage_probe: str | None, files: list[tuple[str, int]]) -> dict[str, Any]:
    """Ray task: what this node cannot read (the storage probe file, the scans at their sizes)."""
    unreadable = [path for path, size in files if not (os.path.isfile(path) and os.path.getsize(path) == size)]
    return {"host": socket.gethostname(), "storage": storage_probe is None or os.path.isfile(storage_probe),
            "unreadable": unreadable}


def check_nodes(cluster: Cluster, config, *, storage: str, default_storage: bool, manifest_path: str) -> bool:
    """Check that every node able to run a trial reads ``storage`` and the scans, before any trial.

    Returns:
        True when some node cannot read the scans and they are to be shipped through the artifact
        store (only with a ``--storage-path``).

    Raises:
        ConfigError: a node cannot read a local ``storage`` folder (not shared), or the user's
            ``--weights``.
        DataError: a node cannot read the scans and no ``--storage-path`` was given.
    """
    nodes = cluster.trial_nodes(trial_resources(config))
    if not nodes:
        raise ConfigError(f"no node of the Ray cluster ({cluster.describe()}) has the resources of one trial "
                          f"({trial_resources(config)}); lower --cpus-per-trial / --gpus-per-trial or fix --trial-resources.")
    probe = None
    if not is_uri(storage):
        Path(storage).mkdir(parents=True, exist_ok=True)
        probe = str(Path(storage) / f".autopeft-probe-{secrets.token_hex(4)}")
        Path(probe).write_text("probe", encoding="utf-8")
    manifest = read_manifest(manifest_path)
    files = [(manifest_path, os.path.getsize(manifest_path))]
    files += [(p, os.path.getsize(p)) for row in manifest.itertuples(index=False) for p in (row.short, row.long)]
    weights = [(config.weights, os.path.getsize(config.weights))] if config.weights and os.path.isfile(config.weights) else []
    task = ray.remote(num_cpus=0)(_probe)
    try:
        answers = ray.get([task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                           .remote(probe, files + weights) for n in nodes])
    finally:
        if probe is not None:
            Path(probe).unlink(missing_ok=True)
    blind = [a["host"] + f" ({n['NodeManagerAddress']})" for a, n in zip(answers, nodes) if not a["storage"]]
    if blind:
        where = (f"the default storage path {storage} (inside the run directory)" if default_storage
                 else f"--storage-path {storage}")
        raise ConfigError(f"Ray node(s) {', '.join(blind)} cannot read {where}: trials keep their checkpoints and the "
                          "shared artifacts there. Pass --storage-path with a folder every node mounts (NFS) or a URI "
                          "(s3://bucket/path, gs://...).")
    weights_blind = [a["host"] for a in answers if weights and weights[0][0] in a["unreadable"]]
    if weights_blind:
        raise ConfigError(f"`weights` {config.weights}: Ray node(s) {', '.join(weights_blind)} cannot read it; put it on "
                          "a path every node mounts.")
    data_blind = [(a["host"], a["unreadable"]) for a in answers if a["unreadable"]]
    if not data_blind:
        return False
    if default_storage:
        host, missing = data_blind[0]
        raise DataError(f"--data {config.data or manifest_path}: Ray node {host} cannot read {len(missing)} of its "
                        f"{len(files)} files (first: {missing[0]}). Put the data on a path every node mounts, or pass "
                        "--storage-path (shared storage) and the search ships the scans there.")
    return True
