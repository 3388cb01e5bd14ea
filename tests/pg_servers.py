"""Servers a team shares, on PostgreSQL, for the integration tests: a throwaway PostgreSQL cluster (Debian's
``postgresql`` binaries, which .ci/run installs), and the MLflow and Prefect servers with their databases in it.
Everything listens on loopback, waits at most ``timeout_s`` for readiness and is always stopped (process groups;
the cluster with ``pg_ctl stop -m immediate``), its folders removed.

The servers start through tests/servers.py's :func:`~servers.serve`.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from servers import Server, free_port, serve

PG_USER = "postgres"  # the database superuser initdb creates (-U); --auth=trust, so no password on loopback


def pg_bindir() -> Path | None:
    """Where ``initdb``/``pg_ctl``/``psql`` are: on PATH, else Debian's /usr/lib/postgresql/<version>/bin (the
    package does not put the server binaries on PATH); the newest version wins. None if PostgreSQL is missing."""
    on_path = shutil.which("initdb")
    if on_path and Path(on_path).resolve().with_name("pg_ctl").exists():
        return Path(on_path).resolve().parent
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb") if p.parent.parent.name.isdigit()]
    return max(found, key=lambda b: int(b.parent.name)) if found else None




@dataclass(frozen=True)
class PgCluster:
    bindir: Path
    port: int
    host: str = "127.0.0.1"

    def url(self, database: str, driver: str = "postgresql") -> str:
        """An SQLAlchemy URL: ``postgresql`` (psycopg 3 under SQLAlchemy 2.1, MLflow) or ``postgresql+asyncpg``
        (Prefect's async driver)."""
        return f"{driver}://{PG_USER}@{self.host}:{self.port}/{database}"

    def sql(self, database: str, statement: str) -> list[list[str]]:
        """Rows of ``statement`` run by psql over TCP (unaligned, tab-separated), so that tests read the tables
        the servers wrote without going through the servers."""
        out = subprocess.run([str(self.bindir / "psql"), "-h", self.host, "-p", str(self.port), "-U", PG_USER,
                              "-d", database, "-v", "ON_ERROR_STOP=1", "-X", "-A", "-t", "-F", "\t", "-c", statement],
                             capture_output=True, text=True, timeout=30, env={**os.environ, "PGCONNECT_TIMEOUT": "5"})
        if out.returncode != 0:
            raise RuntimeError(f"psql {statement!r} on {database}: {out.stderr.strip()}")
        return [line.split("\t") for line in out.stdout.splitlines() if line]


def _as_owner(user: str | None) -> list[str]:
    """The prefix that runs a command as ``user``: PostgreSQL refuses to run as root ("root" execution of the
    PostgreSQL server is not permitted), so as root the cluster runs as an unprivileged user."""
    if user is None:
        return []
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    return [runuser, "-u", user, "--"]


def _owner() -> str | None:
    """None when not root (the cluster runs as us); else Debian's ``postgres`` user (the package creates it),
    or ``nobody`` where PostgreSQL came from elsewhere."""
    if os.geteuid() != 0:
        return None
    for name in (PG_USER, "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL as")


@contextlib.contextmanager
def postgres(databases: tuple[str, ...] = ("mlflow", "prefect"), timeout_s: int = 60) -> Iterator[PgCluster]:
    """A fresh PostgreSQL cluster on 127.0.0.1 at a free port with ``databases``; stopped and removed on exit.

    Its folder is made by mkdtemp under the system temp dir, not under pytest's tmp_path: pytest's folders are
    private to the user running the tests (mode 0700), and as root the server runs as another user."""
    bindir = pg_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL's initdb/pg_ctl not found (Debian: apt-get install postgresql)")
    user = _owner()
    run_as = _as_owner(user)
    root = Path(tempfile.mkdtemp(prefix="diffprune-pg-"))  # short: the socket path must stay under 107 bytes
    data, log = root / "data", root / "server.log"
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    # cwd=root: as another user, a cwd it cannot enter (root's) makes initdb and pg_ctl complain.
    run = dict(cwd=root, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    started = False
    try:
        # --no-sync and the fsync settings below: a throwaway cluster has nothing to keep across a crash.
        # --locale=C: the machine may have no other locale generated.
        done = subprocess.run([*run_as, str(bindir / "initdb"), "-D", str(data), "-U", PG_USER, "--auth=trust",
                               "--encoding=UTF8", "--locale=C", "--no-sync"], timeout=120, **run)
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        for _attempt in range(3):  # another process may take the chosen port before the server binds it
            port = free_port()
            options = (f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
                       "-c full_page_writes=off")
            done = subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
                                   "-w", "-t", str(timeout_s), "start"], timeout=timeout_s + 30, **run)
            started = True  # pg_ctl may have started a server even when it gave up waiting: always stop
            if done.returncode == 0:
                break
            server_log = log.read_text(errors="replace") if log.exists() else ""
            if "could not bind" not in server_log and "already in use" not in server_log:
                raise RuntimeError(f"pg_ctl start failed:\n{done.stderr[-2000:]}\n{server_log[-3000:]}")
            _pg_stop(run_as, bindir, data, run)
            started = False
        else:
            raise RuntimeError("PostgreSQL: no free port after 3 tries")
        cluster = PgCluster(bindir, port)
        for name in databases:
            cluster.sql("postgres", f'CREATE DATABASE "{name}"')
        yield cluster
    finally:
        if started:
            _pg_stop(run_as, bindir, data, run)
        shutil.rmtree(root, ignore_errors=True)


def _pg_stop(run_as: list[str], bindir: Path, data: Path, run: dict) -> None:
    """``pg_ctl stop -m immediate`` (no checkpoint: the data is thrown away); the postmaster killed by its pid file
    if pg_ctl could not stop it (its backends exit on their own once the postmaster is gone)."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        done = subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "-t", "30",
                               "stop"], timeout=60, **run)
        if done.returncode == 0 or not (data / "postmaster.pid").exists():
            return
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int((data / "postmaster.pid").read_text().splitlines()[0])
        os.kill(pid, signal.SIGKILL)


# --- MLflow and Prefect servers with their databases in the cluster -------------------------------------------

def _clean_env(**extra: str) -> dict[str, str]:
    """The servers' environment: the test process's, less any client setting another test may have exported
    (the session's Prefect test server, a tracking URI), plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_API_", "MLFLOW_TRACKING_", "MLFLOW_REGISTRY_", "MLFLOW_EXPERIMENT_"))}
    return {**env, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", **extra}


@contextlib.contextmanager
def mlflow_on_postgres(cluster: PgCluster, folder: Path, database: str = "mlflow",
                       timeout_s: float = 60.0) -> Iterator[Server]:
    """``mlflow server`` with its backend store (runs, metrics, the model registry) in ``database`` and the
    artifacts it proxies in ``folder``/artifacts. The job runner (huey consumers, on by default in MLflow 3) is
    switched off: the tests use none of its jobs, and it would add ~8 processes."""
    mlflow = Path(sys.executable).with_name("mlflow")
    env = _clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")

    def argv(port: int) -> list[str]:
        return [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                "--backend-store-uri", cluster.url(database), "--artifacts-destination", str(folder / "artifacts")]

    with serve(argv, "/health", folder, env, "mlflow", timeout_s) as server:
        yield server


@contextlib.contextmanager
def prefect_on_postgres(cluster: PgCluster, folder: Path, database: str = "prefect",
                        timeout_s: float = 60.0) -> Iterator[Server]:
    """``prefect server start`` with its database in ``database`` (asyncpg, Prefect's own dependency) and its own
    PREFECT_HOME; the UI is off (nothing looks at it, and building its static files takes time)."""
    prefect = Path(sys.executable).with_name("prefect")
    env = _clean_env(PREFECT_HOME=str(folder / "prefect-home"),
                     PREFECT_API_DATABASE_CONNECTION_URL=cluster.url(database, "postgresql+asyncpg"),
                     PREFECT_UI_ENABLED="false", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_SERVER_API_PORT", None)

    def argv(port: int) -> list[str]:
        return [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)]

    with serve(argv, "/api/health", folder, env, "prefect", timeout_s) as server:
        yield Server(server.url + "/api", server.pgid, server.log)





