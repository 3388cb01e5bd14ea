"""Before any stage runs: are the services this run talks to reachable? Seconds, not minutes, to say no.

A dead tracking server would otherwise cost minutes of urllib3 retries and end in a traceback from inside
mlflow; a dead Prefect API a traceback ending ``Failed to reach API``. Checked with plain sockets and HTTP
(no mlflow or prefect import), each with a short timeout; a failure is one line naming the service, the
address, where that address came from, and what to do.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

import tomllib

from diffprune.common.errors import DiffpruneError
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

