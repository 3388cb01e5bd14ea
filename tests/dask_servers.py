"""A real dask.distributed cluster for the tests, on loopback, bounded in time and always stopped: ``dask scheduler``
and ``dask worker`` processes, each worker with its own working directory and ``PREFECT_HOME`` (a "host" of its
own, as far as the files it sees go), started the way the README tells users to start them.

Each process leads its own process group (a worker's nanny spawns the worker proper): stopping kills the group.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from servers import free_port, stop_group

DASK = Path(sys.executable).with_name("dask")


@dataclass
class DaskCluster:
    address: str  # tcp://127.0.0.1:PORT, what orchestration.dask_address is set to
    folder: Path  # logs and the workers' "hosts"
    procs: list[subprocess.Popen] = field(default_factory=list)  # scheduler first, then the workers

    def logs(self) -> str:
        """The tail of every process's log, for a failing assertion."""
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted(
            self.folder.rglob("*.log")))


def _worker_env(api_url: str | None, home: Path) -> dict[str, str]:
    """The worker's environment: one thread for torch, its own Prefect home, PREFECT_API_URL as given (None:
    left out, as on a host where nobody exported it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PYTHONPATH")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PREFECT_HOME=str(home / "prefect-home"))
    if api_url is not None:
        env["PREFECT_API_URL"] = api_url
    return env


def _spawn(argv: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)


def _wait_port(port: int, proc: subprocess.Popen, timeout_s: float) -> bool:
    """True once the scheduler accepts connections; False if it exits first or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
        time.sleep(0.2)
    return False


def wait_for_workers(address: str, n: int, timeout_s: float = 60.0) -> None:
    """Until exactly ``n`` workers are connected (a stopped worker leaves the scheduler's list shortly after)."""
    from distributed import Client

    with Client(address, timeout=10, set_as_default=False) as client:
        deadline = time.monotonic() + timeout_s
        while len(client.scheduler_info(n_workers=-1)["workers"]) != n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{address}: {len(client.scheduler_info(n_workers=-1)['workers'])} workers "
                                   f"after {timeout_s:.0f} s, expected {n}")
            time.sleep(0.2)


def start_worker(cluster: DaskCluster, name: str, api_url: str | None) -> subprocess.Popen:
    """One ``dask worker`` (one process, one thread) in its own folder under the cluster's; not waited for."""
    home = cluster.folder / name
    argv = [str(DASK), "worker", cluster.address, "--host", "127.0.0.1", "--nworkers", "1", "--nthreads", "1",
            "--name", name, "--dashboard-address", "127.0.0.1:0", "--local-directory", str(home / "dask")]
    proc = _spawn(argv, cluster.folder / f"{name}.log", _worker_env(api_url, home), home)
    cluster.procs.append(proc)
    return proc


@contextlib.contextmanager
def dask_cluster(folder: Path, api_url: str | None, workers: int = 2,
                 timeout_s: float = 60.0) -> Iterator[DaskCluster]:
    """``dask scheduler`` on a free loopback port and ``workers`` workers (``w0``, ``w1``, …) with
    PREFECT_API_URL=``api_url``; yields once all have joined. Every process group is stopped on exit."""
    folder.mkdir(parents=True, exist_ok=True)
    cluster = None
    try:
        for attempt in range(3):  # another process may take the chosen port before the scheduler binds it
            port = free_port()
            argv = [str(DASK), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                    "--dashboard-address", "127.0.0.1:0"]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            scheduler = _spawn(argv, folder / f"scheduler-{attempt}.log", env, folder)
            cluster = DaskCluster(f"tcp://127.0.0.1:{port}", folder, [scheduler])
            if _wait_port(port, scheduler, timeout_s):
                break
            stop_group(scheduler)
            if scheduler.returncode is not None and "already in use" not in cluster.logs().lower():
                raise RuntimeError(f"dask scheduler did not start within {timeout_s:.0f} s:\n{cluster.logs()}")
        else:
            raise RuntimeError("dask scheduler: no free port after 3 tries")
        for i in range(workers):
            start_worker(cluster, f"w{i}", api_url)
        try:
            wait_for_workers(cluster.address, workers, timeout_s)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{cluster.logs()}") from None
        yield cluster
    finally:
        if cluster is not None:
            for proc in reversed(cluster.procs):  # workers first: they would wait for a stopped scheduler
                stop_group(proc)


def stop_worker(cluster: DaskCluster, proc: subprocess.Popen) -> None:
    stop_group(proc)
    cluster.procs.remove(proc)

