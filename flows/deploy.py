"""``diffprune deploy``: the pipeline and the sweep-branch flows as deployments of a Prefect work pool, so that
workers on any host run them; ``diffprune serve`` stays the one-host path.

Nothing of the deploying host is needed at run time: the params travel by content in the deployments'
parameters (re-deploy after editing them), and the code is the installed package (module-path entrypoints, no
image, no pull step), so any worker with diffprune installed can run them. A process pool's runs get the
worker's own working directory (job variable ``working_dir: .``) instead of a temporary one, so that relative
paths in the params (``orchestration.store_cache``, reports) stay on that host between runs.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.deployments.runner import EntrypointType
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.schedules import Cron

from diffprune.common.errors import DiffpruneError
from diffprune.flows.branches import branch_deployment, sweep_branch
from diffprune.flows.pipeline import pipeline
from diffprune.flows.store_cmd import PARAMS_FILE, params_file_tag
from diffprune.pipeline.config import Params, load_params


def ensure_pool(name: str) -> str:
    """The work pool's type, creating it as a process pool (with Prefect's default job template) if missing."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            return client.read_work_pool(name).type
        except ObjectNotFound:
            pass
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process",
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))
            print(f"created work pool {name} (type process)")
        except ObjectAlreadyExists:  # a worker started meanwhile creates its pool too
            pass
        return client.read_work_pool(name).type


def deployments(params: Params, content: Params, source: str, pool_type: str) -> list:
    """The pipeline deployment (cron from ``schedule``) and the sweep-branch deployment (no schedule: the sweep
    starts its runs), both taking ``content`` as their params."""
    s = params.schedule
    jobs = {**({"working_dir": "."} if pool_type == "process" else {}), **s.job_variables}
    given = {"params": content.model_dump(mode="json", by_alias=True), "params_file": source}
    common = {"entrypoint_type": EntrypointType.MODULE_PATH, "tags": ["diffprune"]}
    return [
        pipeline.to_deployment(name=s.name, schedules=[Cron(s.cron, timezone=s.timezone)], parameters=given,
                               description=f"diffprune pipeline on {source}, cron '{s.cron}' ({s.timezone})",
                               job_variables=dict(jobs), **common),
        # Named after the pool: a sweep finds its branch deployment from schedule.work_pool alone.
        sweep_branch.to_deployment(name=s.work_pool, description="sweep branches (diffprune sweep with "
                                   "orchestration.branches: deployment)", job_variables=dict(jobs), **common),
    ]


def deploy(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    """Create the pool if missing, create or update both deployments on it; print how to start workers."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise DiffpruneError(
            "deployments need a Prefect server that every worker reaches: start `prefect server start --host "
            "<this host>` and `export PREFECT_API_URL=http://<this host>:4200/api`, then run `diffprune deploy` again")
    params = load_params(params_file, overrides or [])
    s = params.schedule
    # As `serve`: scheduled runs use schedule.params (normally this very file), here read once and sent by content.
    same = Path(s.params).resolve() == Path(params_file).resolve()
    content = params if same else load_params(s.params, overrides or [])
    source = params_file_tag(s.params)[PARAMS_FILE]  # how `store gc` groups its runs, as for a local run
    pool_type = ensure_pool(s.work_pool)
    ids = {f"{d.flow_name}/{d.name}": str(d.apply(work_pool_name=s.work_pool))
           for d in deployments(params, content, source, pool_type)}
    api = PREFECT_API_URL.value()
    pipe, branch = f"diffprune-pipeline/{s.name}", branch_deployment(s.work_pool)
    print(f"deployed on work pool {s.work_pool} ({pool_type}): {pipe} (cron '{s.cron}' {s.timezone}, params from "
          f"{s.params} by content) and {branch} (sweep branches)")
    print("start a worker on each host, one per GPU (a run takes its worker's GPU; --limit 1: one run at a time):")
    print(f"  export PREFECT_API_URL={api}   # plus AWS_* for an s3:// store, MLFLOW_TRACKING_URI for a server")
    print(f"  CUDA_VISIBLE_DEVICES=0 prefect worker start --pool {s.work_pool} --limit 1 --name {_host()}-gpu0 &")
    print(f"  CUDA_VISIBLE_DEVICES=1 prefect worker start --pool {s.work_pool} --limit 1 --name {_host()}-gpu1 &")
    print(f"then: prefect deployment run {pipe}   (or wait for the cron); diffprune sweep --set "
          "orchestration.branches=deployment")
    return {"deployments": ids, "work_pool": s.work_pool}


def _host() -> str:
    return os.uname().nodename.split(".")[0]
