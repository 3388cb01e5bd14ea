"""Before any stage runs: are the services this run talks to reachable? Seconds, not minutes, to say no.

A dead tracking server would otherwise cost minutes of urllib3 retries and end in a traceback from inside
mlflow; a dead Prefect API a traceback ending ``Failed to reach API``. Checked with plain sockets and HTTP
(no mlflow or prefect import), each with a short timeout; a failure is one line naming the service, the
address, where that address came from, and what to do.

An existing Dask cluster (``orchestration.dask_address``) is asked through ``distributed``, imported only then:
its scheduler must answer and every worker must be able to run the sweep's tasks.
"""

from __future__ import annotations

import contextlib
import os
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import tomllib

from diffprune.common.errors import DiffpruneError, first_line
from diffprune.common.version import VERSION
from diffprune.pipeline.config import Params
from diffprune.tasks.store import check as check_store

TIMEOUT_S = 3.0


class ServiceUnreachable(DiffpruneError):
    """A service named by the environment or params.yaml does not answer (exit status 2: fix the setting)."""


def _answers(url: str) -> str | None:
    """None if an HTTP server answers at ``url`` (any status: it is up), else why not."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S):
            return None
    except urllib.error.HTTPError:
        return None  # it answered, if only to refuse
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return str(reason) if not isinstance(reason, TimeoutError) else f"no answer within {TIMEOUT_S:.0f} s"


def tracking(params: Params) -> None:
    """The MLflow tracking store: an http(s) server must answer; a sqlite file's folder must be writable."""
    if not params.tracking.enabled:
        return
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.uri
    origin = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "params.yaml tracking.uri"
    if uri.startswith(("http://", "https://")):
        why = _answers(uri.rstrip("/") + "/health")
        if why:
            fix = ("start the server, or unset MLFLOW_TRACKING_URI to use tracking.uri from params.yaml"
                   if origin == "MLFLOW_TRACKING_URI" else "start the server, or set tracking.uri (or --set "
                   "tracking.enabled=false to run without tracking)")
            raise ServiceUnreachable(f"MLflow tracking server {uri} (from {origin}) is unreachable: {why}; {fix}")
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).resolve().parent
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ServiceUnreachable(f"MLflow tracking store {uri} (from {origin}): {existing} is not writable; "
                                     "choose another tracking.uri or fix the folder's permissions")


def store(params: Params) -> None:
    """The content-addressed store: a URL store's server must answer, with its bucket and the credentials
    accepted (:class:`~diffprune.tasks.store.StoreUnreachable`, exit 2); a path store is created when written."""
    check_store(params.orchestration.store)


def prefect_api() -> None:
    """A Prefect server named by PREFECT_API_URL (environment or the active Prefect profile) must answer."""
    url, origin = os.environ.get("PREFECT_API_URL"), "PREFECT_API_URL"
    if not url:
        url, origin = _profile_api_url()
    if not url or not url.startswith(("http://", "https://")):
        return  # none set: the flow starts its own temporary server
    why = _answers(url.rstrip("/") + "/health")
    if why:
        unset = "unset PREFECT_API_URL" if origin == "PREFECT_API_URL" else "`prefect config unset PREFECT_API_URL`"
        raise ServiceUnreachable(f"Prefect API {url} (from {origin}) is unreachable: {why}; start it "
                                 f"(`prefect server start`), or {unset} so that the run starts a temporary "
                                 "local server")


def _profile_api_url() -> tuple[str | None, str]:
    home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect"))
    try:
        profiles = tomllib.loads((home / "profiles.toml").read_text())
    except (OSError, ValueError):
        return None, ""
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    url = profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL")
    return url, f"PREFECT_API_URL of Prefect profile '{active}' in {home / 'profiles.toml'}"



class ClusterNotReady(ServiceUnreachable):
    """An existing Dask cluster answers, but cannot run this sweep's tasks as they are (exit 2: fix the cluster)."""


DASK_ORIGIN = "params.yaml orchestration.dask_address"
DASK_CONNECT_S = 5.0


def require_shared_api(address: str) -> str:
    """The Prefect API URL this run reports to, which an existing cluster's workers must report to too. With
    none set, a run starts a temporary server on this host's 127.0.0.1 and ends it with the flow: out of the
    workers' reach, and gone before anyone looks at their task runs. Refused in one line."""
    url = os.environ.get("PREFECT_API_URL") or _profile_api_url()[0]
    if not url:
        raise ClusterNotReady(
            f"Dask cluster {address} (from {DASK_ORIGIN}) needs a Prefect server that outlives the run and that "
            "every worker reaches: start one (`prefect server start --host 0.0.0.0`), then export "
            "PREFECT_API_URL=http://<its host>:4200/api here and in every `dask worker`'s environment")
    return url


def dask_cluster(params: Params) -> None:
    """An existing Dask cluster (orchestration.dask_address): the scheduler answers within seconds, it has
    workers, and on every worker diffprune (the same version) and prefect-dask import, PREFECT_API_URL is this
    run's, and the store is the one this run writes. One line names the address, or each worker that is not
    ready and what it lacks."""
    address = params.orchestration.dask_address
    if not address:
        return
    why = _tcp_refuses(address)
    if why:
        raise ServiceUnreachable(f"Dask scheduler {address} (from {DASK_ORIGIN}) is unreachable: {why}; start it "
                                 "(`dask scheduler --port 8786`) or fix the address, or unset "
                                 "orchestration.dask_address to run the sweep on this host")
    api_url = require_shared_api(address)
    from distributed import Client

    try:
        client = Client(address, timeout=DASK_CONNECT_S, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise ServiceUnreachable(f"Dask scheduler {address} (from {DASK_ORIGIN}) does not answer as a Dask "
                                 f"scheduler within {DASK_CONNECT_S:.0f} s: {first_line(exc)}") from None
    try:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        if not workers:
            raise ClusterNotReady(f"Dask cluster {address} (from {DASK_ORIGIN}) has no workers: start at least "
                                  f"one (`dask worker {address}` with PREFECT_API_URL={api_url} exported)")
        with _store_marker(params) as (marker, token):
            found = _on_workers(client, _worker_probe, params.orchestration.store, marker, token)
    finally:
        client.close()
    problems = []
    for worker, info in sorted(found.items()):
        name = workers.get(worker, {}).get("name")
        label = f"worker {worker}" + (f" ({name})" if name not in (None, "", worker) else "")
        lacks = _lacks(info, api_url)
        if lacks:
            problems.append(f"{label}: {lacks}")
    if problems:
        raise ClusterNotReady(f"Dask cluster {address} (from {DASK_ORIGIN}): {len(problems)} of {len(found)} "
                              f"workers cannot run the sweep: {'; '.join(problems)}")


def _tcp_refuses(address: str) -> str | None:
    """Why a plain TCP connection to the scheduler fails (None: it connects, or the protocol is not TCP-based).
    A socket answers a dead address at once; distributed's own connect retries until its timeout."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.scheme not in ("tcp", "tls"):
        return None
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        return str(exc)
    if not host or not port:
        return "no host:port in the address (expected e.g. tcp://host:8786)"
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT_S):
            return None
    except TimeoutError:
        return f"no answer within {TIMEOUT_S:.0f} s"
    except OSError as exc:
        return exc.strerror or str(exc)


@contextlib.contextmanager
def _store_marker(params: Params) -> Iterator[tuple[str | None, str | None]]:
    """For a path store: a file the workers must read back, so that a path that merely exists on their hosts
    (an unshared local folder of the same name) is told from the shared mount. None for a URL store."""
    root = params.orchestration.store
    if "://" in root:
        yield None, None
        return
    folder = Path(root).resolve()
    token = uuid.uuid4().hex
    marker = folder / f".dask-preflight-{token}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(token)
    except OSError as exc:
        raise ServiceUnreachable(f"store {folder} (from params.yaml orchestration.store) is not writable: "
                                 f"{exc.strerror or exc}") from None
    try:
        yield str(marker), token
    finally:
        marker.unlink(missing_ok=True)


def _on_workers(client, probe: Callable[..., dict], *args: object) -> dict[str, dict | BaseException]:
    """``probe(*args)`` on every worker, shipped by value: a module reference would fail to unpickle on a
    worker without diffprune, before the probe could say so. A worker's failure comes back as its exception."""
    import cloudpickle

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        return client.run(probe, *args, on_error="return")
    finally:
        cloudpickle.unregister_pickle_by_value(module)


def _worker_probe(store: str, marker: str | None, token: str | None) -> dict:
    """Runs on a Dask worker (by value, stdlib only until diffprune is known to import): what its task runs
    would see."""
    import importlib.util
    import os
    import socket
    from pathlib import Path

    info: dict = {"host": socket.gethostname(), "pid": os.getpid(),
                  "api_url": os.environ.get("PREFECT_API_URL") or _profile_api_url()[0]}
    try:
        from diffprune.common.version import VERSION
    except Exception as exc:
        info["import_error"] = f"{type(exc).__name__}: {exc}"
        return info
    info["diffprune"] = VERSION
    # The task runner travels with each task run's context; unpickling it needs prefect-dask on the worker.
    info["prefect_dask"] = importlib.util.find_spec("prefect_dask") is not None
    if marker is not None:
        try:
            seen = Path(marker).read_text() == token
        except OSError as exc:
            seen, why = False, exc.strerror or str(exc)
        else:
            why = "another folder of that name"
        if not seen:
            info["store"] = (f"store {Path(marker).parent} there is not this run's ({why}): mount the same folder "
                             "at the same path on every worker, or use an s3:// store")
    else:
        try:
            from diffprune.tasks.store import check

            check(store)
        except Exception as exc:
            info["store"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return info


def _lacks(info: dict | BaseException, api_url: str) -> str | None:
    """What a worker's probe says it lacks, in a few words (None: ready)."""
    if isinstance(info, BaseException):
        return f"the check failed there: {first_line(info)}"
    if "import_error" in info:
        return (f"diffprune is not importable ({info['import_error']}); install the same diffprune on every "
                "worker's Python")
    lacks = []
    if info.get("diffprune") != VERSION:
        lacks.append(f"diffprune {info.get('diffprune')} there, {VERSION} here")
    if not info.get("prefect_dask"):
        lacks.append("prefect-dask is not installed")
    theirs = info.get("api_url")
    if (theirs or "").rstrip("/") != api_url.rstrip("/"):
        lacks.append(f"PREFECT_API_URL is {theirs or 'unset'}, not this run's {api_url} (export it before "
                     "`dask worker`)")
    if info.get("store"):
        lacks.append(str(info["store"]))
    return ", ".join(lacks) or None
