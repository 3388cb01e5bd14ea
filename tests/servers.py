"""Real servers for the tests, on loopback, bounded in time and always stopped: SeaweedFS's S3 gateway and an
MLflow tracking server that proxies artifacts to it.

``weed mini`` runs master, volume, filer, S3 gateway and admin in one process, each on an HTTP port and a
gRPC port 10000 above it. Every port is chosen free, so that parallel test workers each run their own.
Started with credentials, the gateway enforces them (a wrong secret is refused, as on a real store).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

SERVICES = ("master", "volume", "filer", "s3", "admin")


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str
    key: str
    secret: str

    @property
    def env(self) -> dict[str, str]:
        """What a client needs: the standard AWS variables."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.key,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": "us-east-1"}


def port_free(port: int) -> bool:
    """Whether ``port`` can be bound on loopback now."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _ports(n: int) -> list[int]:
    """``n`` ports whose gRPC twins (port + 10000) are free too; below the ephemeral range, so outgoing
    connections do not take them meanwhile."""
    chosen: list[int] = []
    while len(chosen) < n:
        port = random.randrange(20000, 22000)
        if port not in chosen and port_free(port) and port_free(port + 10000):
            chosen.append(port)
    return chosen


@contextlib.contextmanager
def seaweed(folder: Path, bucket: str = "diffprune-tests", timeout_s: float = 30.0) -> Iterator[S3Server]:
    """A ``weed mini`` S3 server with ``bucket``, data in ``folder``; killed (its whole process group) on exit."""
    weed = Path(sys.executable).with_name("weed")
    key, secret = "diffprune-test", "diffprune-test-secret"
    for attempt in range(3):  # another process may take a chosen port before weed binds it
        ports = dict(zip(SERVICES, _ports(len(SERVICES)), strict=True))
        data = folder / f"try{attempt}"
        data.mkdir(parents=True)
        argv = [str(weed), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-bucket={bucket}",
                "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                f"-s3.localSocket={data}/s3.sock", f"-filer.localSocket={data}/filer.sock",
                *(f"-{name}.port={port}" for name, port in ports.items())]
        log = data / "weed.log"
        env = {**os.environ, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=data,
                                    start_new_session=True)
        try:
            server = S3Server(f"http://127.0.0.1:{ports['s3']}", bucket, key, secret)
            if _wait_ready(server, proc, timeout_s):
                yield server
                return
            if b"Port allocation failed" not in log.read_bytes():
                raise RuntimeError(f"weed mini did not serve bucket {bucket} within {timeout_s:.0f} s:\n"
                                   + log.read_text(errors="replace")[-3000:])
        finally:
            _stop(proc)
    raise RuntimeError("weed mini: no free ports after 3 tries")


def _wait_ready(server: S3Server, proc: subprocess.Popen, timeout_s: float) -> bool:
    """True once the bucket answers a signed HEAD; False if the server exits first."""
    import botocore.session
    from botocore.config import Config

    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=server.endpoint, aws_access_key_id=server.key, aws_secret_access_key=server.secret,
        region_name="us-east-1", config=Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1}))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            client.head_bucket(Bucket=server.bucket)  # the bucket is created shortly after the port opens
            return True
        except Exception:
            time.sleep(0.25)
    return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait_s)
            return


@dataclass(frozen=True)
class Server:
    url: str  # what clients use: MLFLOW_TRACKING_URI, or PREFECT_API_URL (…/api)
    pgid: int  # its process group: empty once the server is stopped
    log: Path


def free_port() -> int:
    """A free port below the ephemeral range, so that outgoing connections do not take it meanwhile."""
    while True:
        port = random.randrange(22000, 24000)  # beside _ports' range, so the two never pick the same ports
        if port_free(port):
            return port


@contextlib.contextmanager
def serve(argv_for: Callable[[int], list[str]], health_path: str, folder: Path, env: dict, name: str,
          timeout_s: float) -> Iterator[Server]:
    """Start ``argv_for(port)`` in its own process group until ``health_path`` answers 200; stopped on exit (its
    whole group, on failure too). A port taken between the choice and the bind gets another try."""
    for attempt in range(3):
        port = free_port()
        log = folder / f"{name}-{attempt}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv_for(port), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=folder,
                                    start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            if wait_http(base + health_path, proc, timeout_s):
                yield Server(base, proc.pid, log)
                return
            text = log.read_text(errors="replace")
            if "address already in use" not in text.lower():
                raise RuntimeError(f"{name} did not answer {health_path} within {timeout_s:.0f} s:\n{text[-3000:]}")
        finally:
            stop_group(proc)
    raise RuntimeError(f"{name}: no free port after 3 tries")


@dataclass(frozen=True)
class MlflowServer:
    url: str  # the tracking URI clients use
    artifacts: str  # where the server keeps proxied artifacts: s3://bucket/prefix
    pgid: int  # its process group: empty once the server is stopped


@contextlib.contextmanager
def mlflow_server(folder: Path, s3: S3Server, prefix: str = "mlflow",
                  timeout_s: float = 120.0) -> Iterator[MlflowServer]:
    """An ``mlflow server`` with a SQLite backend in ``folder`` that proxies artifacts to ``s3`` under ``prefix``
    (``--artifacts-destination``); clients need neither S3 credentials nor the endpoint. Its job runner (huey
    consumers, started by default since MLflow 3.x) is switched off; the whole process group is stopped on exit."""
    mlflow = Path(sys.executable).with_name("mlflow")
    artifacts = f"s3://{s3.bucket}/{prefix}"
    env = {**os.environ, **s3.env, "MLFLOW_S3_ENDPOINT_URL": s3.endpoint,
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    folder.mkdir(parents=True, exist_ok=True)

    def argv(port: int) -> list[str]:
        return [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{folder}/mlflow-{port}.db", "--artifacts-destination", artifacts]

    with serve(argv, "/health", folder, env, "mlflow", timeout_s) as server:
        yield MlflowServer(server.url, artifacts, server.pgid)


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float) -> bool:
    """True once ``url`` answers 200; False if the server exits first or the time runs out."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.25)
    return False


def group_alive(pgid: int) -> bool:
    """Whether any process of the process group ``pgid`` is still running."""
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def stop_group(proc: subprocess.Popen, wait_s: float = 10.0) -> None:
    """Stop the whole process group that ``proc`` leads, its children included even once the leader has exited:
    SIGTERM, then SIGKILL for whatever is left after ``wait_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.2)
            if proc.poll() is not None and not group_alive(proc.pid):
                return
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(wait_s)
