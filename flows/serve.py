"""The scheduled deployment: the pipeline flow served on the cron schedule of ``params.yaml``.

Schedules need a Prefect server that outlives the process (``prefect server start --host
127.0.0.1`` and ``PREFECT_API_URL``); the temporary server of a plain ``diffprune run`` cannot fire them.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import serve as serve_deployments
from prefect.schedules import Cron

from diffprune.common.errors import DiffpruneError
from diffprune.flows.pipeline import pipeline
from diffprune.pipeline.config import load_params


def deployment(params_file: str = "params.yaml", overrides: list[str] | None = None):
    """The pipeline deployment: its cron, timezone and the params file every scheduled run reads."""
    params = load_params(params_file, overrides or [])
    s = params.schedule
    return pipeline.to_deployment(
        name=s.name,
        schedules=[Cron(s.cron, timezone=s.timezone)],
        parameters={"params_file": str(Path(s.params).resolve()), "overrides": list(overrides or [])},
        tags=["diffprune"],
        description=f"diffprune pipeline on {s.params}, cron '{s.cron}' ({s.timezone})",
    )


def serve(params_file: str = "params.yaml", overrides: list[str] | None = None, once: bool = False) -> dict:
    """Create the deployment and serve it here (runs execute as subprocesses of this process)."""
    if not os.environ.get("PREFECT_API_URL"):
        raise DiffpruneError(
            "schedules need a running Prefect server: start `prefect server start --host 127.0.0.1` and "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api`, then run `diffprune serve` again")
    dep = deployment(params_file, overrides)
    if once:
        return {"deployment_id": str(dep.apply()), "name": f"diffprune-pipeline/{dep.name}"}
    serve_deployments(dep, pause_on_shutdown=False)
    return {}
