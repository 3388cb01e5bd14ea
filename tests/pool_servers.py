"""A Prefect server and process-pool workers for the tests, on loopback, bounded in time and always stopped.

Every process started here carries a marker in its environment, inherited by whatever it starts: Prefect runs
each flow run in its own session (``start_new_session``), so stopping a worker's process group would leave its
flow runs behind. Tear-down finds the marked processes and stops them by id.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from servers import free_port, wait_http

MARKER = "DIFFPRUNE_TEST_PROCESS"
BIN = Path(sys.executable).parent


def marked(marker: str) -> list[int]:
    """The ids of live processes whose environment holds ``MARKER=marker``."""
    needle = f"{MARKER}={marker}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
    return found


def stop_marked(marker: str, wait_s: float = 10.0) -> None:
    """SIGTERM every marked process, then SIGKILL whatever is left after ``wait_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in marked(marker):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while marked(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not marked(marker):
            return


@dataclass
class Cluster:
    """What the tests get: the API URL, the environment that reaches it, and the processes' folders."""

    api: str
    env: dict[str, str]  # for any client process: PREFECT_API_URL and the caller's extras
    folder: Path
    marker: str
    procs: dict[str, subprocess.Popen]

    def start(self, name: str, argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
        """Start a marked background process, its output in ``<folder>/<name>.log``."""
        cwd.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"{name}.log", "wb") as out:
            proc = subprocess.Popen(argv, cwd=cwd, env={**env, MARKER: self.marker}, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str, tail: int = 4000) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")[-tail:]

    def worker(self, name: str, pool: str, home: Path, env: dict[str, str]) -> subprocess.Popen:
        """``prefect worker start --pool pool --limit 1`` in its own working folder and PREFECT_HOME (a host)."""
        worker_env = {**self.env, **env, "PREFECT_HOME": str(home / "prefect"),
                      "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_HEARTBEAT_SECONDS": "5"}
        return self.start(name, [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--name", name,
                                 "--limit", "1"], home, worker_env)

    def wait_worker(self, name: str, timeout_s: float = 120.0) -> None:
        """Until the worker's log says it polls (it has created or found its pool)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            proc = self.procs[name]
            assert proc.poll() is None, f"worker {name} exited:\n{self.log(name)}"
            if "started!" in self.log(name, 100_000):
                return
            time.sleep(0.5)
        raise AssertionError(f"worker {name} did not start within {timeout_s:.0f} s:\n{self.log(name)}")


@contextlib.contextmanager
def prefect_cluster(folder: Path, timeout_s: float = 180.0) -> Iterator[Cluster]:
    """``prefect server start`` on 127.0.0.1 (SQLite in its own PREFECT_HOME); workers are added with
    :meth:`Cluster.worker`. Every marked process is stopped on exit, on failure too."""
    marker = uuid.uuid4().hex
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    base.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS": "false",
                 "DO_NOT_TRACK": "true", "PATH": f"{BIN}:{os.environ.get('PATH', '')}"})
    try:
        for attempt in range(3):  # another process may take the chosen port before the server binds it
            port = free_port()
            api = f"http://127.0.0.1:{port}/api"
            cluster = Cluster(api, {**base, "PREFECT_API_URL": api}, folder, marker, {})
            server_env = {**base, "PREFECT_HOME": str(folder / f"server{attempt}"),
                          "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port)}
            proc = cluster.start(f"server{attempt}", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                                      "--port", str(port)], folder, server_env)
            if wait_http(f"{api}/health", proc, timeout_s):
                yield cluster
                return
            if "address already in use" not in cluster.log(f"server{attempt}").lower():
                raise RuntimeError(f"prefect server did not answer within {timeout_s:.0f} s:\n"
                                   + cluster.log(f"server{attempt}"))
            stop_marked(marker)
        raise RuntimeError("prefect server: no free port after 3 tries")
    finally:
        stop_marked(marker)
