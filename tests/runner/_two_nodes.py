"""A two-node Ray cluster on 127.0.0.1 for the cluster tests and bench/cluster_overhead.py.

The head node runs beside the driver. The worker node runs in its own mount namespace (``unshare
-m``, as root) with a tmpfs over ``runs/`` and over ``cache/``, so it cannot read the driver's run
directories, data nor artifact cache; ``shared/`` is visible to both and plays the shared
filesystem. Only the worker node has the ``autopeft_worker`` resource. Nodes are stopped by process
id (processes whose command line holds the cluster's own folder), never by a machine-wide ``ray stop``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TwoNodes:
    """A head node and a worker node that cannot see ``runs/`` nor ``cache/`` under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.runs, self.cache, self.shared = root / "runs", root / "cache", root / "shared"
        for folder in (self.runs, self.cache, self.shared):
            folder.mkdir()
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Tests only: a throwaway cluster on loopback needs no token (auth stays on otherwise).
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "AUTOPEFT_CACHE": str(self.cache),
                    "RAY_USAGE_STATS_ENABLED": "0"}

    def start_head(self) -> None:
        subprocess.run([str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(self.port),
                        "--temp-dir", str(self.root / "ray"), "--num-cpus", "1", "--include-dashboard", "false",
                        # Ports of our own: other Ray instances may run on this machine meanwhile.
                        "--dashboard-port", str(_free_port()), "--ray-client-server-port", str(_free_port()),
                        "--disable-usage-stats"],
                       env=self.env, check=True, capture_output=True, timeout=120)

    def start_worker(self) -> None:
        resources = json.dumps({"autopeft_worker": 4})
        command = (f"mount -t tmpfs tmpfs {self.runs} && mount -t tmpfs tmpfs {self.cache} && exec {VENV_BIN / 'ray'} start "
                   f"--address {self.address} --node-ip-address 127.0.0.1 --num-cpus 2 --resources '{resources}' "
                   "--disable-usage-stats")
        before = set(self.worker_nodes())
        started = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", command], env=self.env,
                                 capture_output=True, text=True, timeout=180)
        if started.returncode != 0:
            raise RuntimeError(f"the worker node did not start:\n{started.stdout[-2000:]}\n{started.stderr[-2000:]}")
        deadline = time.time() + 120.0
        while not set(self.worker_nodes()) - before:
            if time.time() > deadline:
                raise TimeoutError(f"the worker node did not join {self.address}")
            time.sleep(1.0)

    def worker_nodes(self) -> list[str]:
        """Ids of the alive nodes with the ``autopeft_worker`` resource (``ray.nodes()``)."""
        script = ("import json, ray; ray.init(address=%r, log_to_driver=False); print(json.dumps([n['NodeID'] for n in "
                  "ray.nodes() if n['Alive'] and 'autopeft_worker' in n['Resources']]))" % self.address)
        out = subprocess.run([sys.executable, "-c", script], env=self.env, capture_output=True, text=True, timeout=120)
        return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else []

    def processes(self, *, name: str = "", other_namespace: bool = False) -> list[int]:
        """Processes whose command line holds this cluster's folder (not this test's own)."""
        own = {os.getpid(), os.getppid()}
        mine = os.readlink("/proc/self/ns/mnt")
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in own:
                continue
            try:
                line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                namespace = os.readlink(entry / "ns" / "mnt")
            except OSError:
                continue
            if str(self.root) in line and name in line and (not other_namespace or namespace != mine):
                found.append(int(entry.name))
        return found

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.processes():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(2.0)

    def search(self, *args: str, log: str, storage: bool = True) -> subprocess.Popen:
        """``autopeft search --address`` (the driver, on the head's side), output in ``root/log``;
        ``--storage-path shared/`` unless ``storage`` is False."""
        command = [str(VENV_BIN / "autopeft"), "search", "--address", self.address, "--trial-resources",
                   json.dumps({"autopeft_worker": 1}), "--quiet", *args]
        if storage:
            command += ["--storage-path", str(self.shared)]
        return subprocess.Popen(command, env=self.env, stdout=open(self.root / log, "w"), stderr=subprocess.STDOUT)


def usable() -> bool:
    """Root, ``unshare`` and the ``ray`` command beside this Python."""
    return os.geteuid() == 0 and shutil.which("unshare") is not None and (VENV_BIN / "ray").is_file()
