"""Sweep branches as flow runs of a work pool (``orchestration.branches: deployment``), so that workers on any
number of hosts share a sweep.

The parent (``diffprune sweep``) computes the shared stages itself, groups the branches that share a stage of
their own (a criterion scored once per seed for every MACs target: one group), and starts one run of the
``diffprune-sweep-branch`` deployment per group with ``run_deployment``. Each group's run runs its stages one
at a time on one worker slot (one GPU), publishes per branch the store references of its stages (or where it
failed) as a Prefect table artifact of its flow run, and fails if a branch did. ``run_deployment`` returns
metadata, not values: the parent reads the artifacts back over the API every host shares, checks each
reference against the shared store, and builds the same rows as a local sweep; a failed or crashed group
reports its error in its branches' rows and the others still report theirs.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY

from diffprune.common.errors import DiffpruneError
from diffprune.flows.context import RunContext, stage_params, summary_of, wiring
from diffprune.pipeline.config import Params, params_from
from diffprune.pipeline.table import LIBRARY, STAGES
from diffprune.tasks import store

BRANCH_FLOW = "diffprune-sweep-branch"
ARTIFACT = "diffprune-sweep-branch"  # the table artifact a branch run leaves: one row per branch and stage
POLL_S = 2.0
IDLE_WARNING_S = 60.0  # runs still waiting for a worker after this long: say how to start one


def branch_deployment(pool: str) -> str:
    """The sweep-branch deployment of a work pool (``diffprune deploy`` names it after the pool)."""
    return f"{BRANCH_FLOW}/{pool}"


def _own_stages(shared: dict) -> list[str]:
    return [s.name for s in LIBRARY if s.name not in shared]


def _stage_args(params: Params, branch: dict, stage: str) -> dict:
    from diffprune.flows.sweep import branch_changes  # sweep imports this module lazily: no import cycle

    return {**stage_params(params, stage), **branch_changes(branch).get(stage, {})}


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def groups(params: Params, todo: list[dict], shared: dict[str, dict]) -> list[list[dict]]:
    """The branches, grouped so that no stage is in two groups: each stage of a branch is named by its params
    and its inputs' names (a shared stage's key, or an own stage's name), and branches sharing one share a group.
    Otherwise two workers would compute the same stage at once, and only one of them would be kept."""
    out: list[list[dict]] = []
    owner: dict[str, int] = {}  # stage signature → index into out
    for branch in todo:
        sigs: dict[str, str] = {name: ref["key"] for name, ref in shared.items()}
        for stage in _own_stages(shared):
            sigs[stage] = _digest([stage, _stage_args(params, branch, stage), wiring(stage, sigs)])
        mine = [sigs[s] for s in _own_stages(shared)]
        found = sorted({owner[s] for s in mine if s in owner})
        if not found:
            out.append([])
            found = [len(out) - 1]
        target = found[0]
        for other in found[1:]:  # this branch joins groups that were apart until now: merge them
            out[target] += out[other]
            out[other] = []
            owner.update({s: target for s, o in owner.items() if o == other})
        out[target].append(branch)
        owner.update(dict.fromkeys(mine, target))
    return [g for g in out if g]


@flow(name=BRANCH_FLOW, log_prints=True)
def sweep_branch(params: dict, branches: list[dict], shared: dict[str, dict],
                 params_file: str = "params.yaml") -> list[dict]:
    """Run the own stages of ``branches`` (a group of a sweep), fed by the sweep's ``shared`` references; one
    outcome per branch: its references and cache hits, or the stage it failed in."""
    given = params_from(params)
    # The parent records every stage in its own MLflow run, as a local sweep does: no tracking here.
    untracked = given.model_copy(update={"tracking": given.tracking.model_copy(update={"enabled": False})})
    ctx = RunContext(untracked, str(flow_run.name or "sweep-branch"), source=params_file)
    states: dict[str, object] = {}  # a stage of several branches of the group runs once
    outcomes = []
    for branch in branches:
        refs, own, hits = dict(shared), {}, {}
        outcome = {"label": branch["label"], "refs": own, "cached": hits}
        for stage in _own_stages(shared):
            args, inputs = _stage_args(given, branch, stage), wiring(stage, refs)
            sig = _digest([stage, args, inputs])
            if sig not in states:  # stages one at a time: a worker slot is one GPU
                states[sig] = ctx.stage_task(stage)(params=args, inputs=inputs, run=ctx.settings, return_state=True)
            state = states[sig]
            if not state.is_completed():
                outcome = {"label": branch["label"], "failed_stage": stage, "error": str(state.message)}
                get_run_logger().error("%s: %s failed: %s", branch["label"], stage, state.message)
                break
            refs[stage] = own[stage] = state.result()
            hits[stage] = state.name == "Cached"
        outcomes.append(outcome)
    _publish(outcomes)
    failed = [o for o in outcomes if "error" in o]
    if failed:  # the run shows failed in the UI; the parent has read the outcomes either way
        raise DiffpruneError("; ".join(f"{o['label']}: {o['failed_stage']} failed: {o['error']}" for o in failed))
    return outcomes


def _publish(outcomes: list[dict]) -> None:
    from prefect.artifacts import create_table_artifact

    rows = []
    for o in outcomes:
        if "error" in o:
            rows.append({"branch": o["label"], "stage": o["failed_stage"], "key": None, "cache": None,
                         "error": o["error"]})
        else:
            rows += [{"branch": o["label"], "stage": s, "key": ref["key"], "cache": "hit" if o["cached"][s] else
                      "computed", "error": None} for s, ref in o["refs"].items()]
    create_table_artifact(table=rows, key=ARTIFACT, description="sweep branches: store keys of their stages")


def _outcomes(client, run_id) -> dict[str, dict]:
    """A finished branch run's outcomes by branch label, from its artifact (empty if it left none: it crashed)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    found = client.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]), key=ArtifactFilterKey(any_=[ARTIFACT])))
    out: dict[str, dict] = {}
    for artifact in found[:1]:
        for row in json.loads(artifact.data):
            o = out.setdefault(row["branch"], {"refs": {}, "cached": {}})
            if row["error"] is not None:
                o.update(failed_stage=row["stage"], error=row["error"])
            else:
                o["refs"][row["stage"]] = store.reference(row["stage"], row["key"])
                o["cached"][row["stage"]] = row["cache"] == "hit"
    return out


def through_pool(ctx: RunContext, todo: list[dict], shared: dict[str, dict]) -> list[dict]:
    """Every branch as (part of) a flow run on the work pool; waits for all, then one row per branch."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    params, log = ctx.params, get_run_logger()
    require_cluster(params)  # `diffprune sweep` checked it before any stage; other callers get it here
    name = branch_deployment(params.schedule.work_pool)
    content = params.model_dump(mode="json", by_alias=True)
    parent = str(flow_run.id or "")

    def submit(i: int, group: list[dict], attempt: int):
        # Created without waiting (timeout=0), then polled together: every group is queued at once. The
        # idempotency key makes a retried parent find its runs instead of starting them again.
        key = f"{parent}-{i}" + (f"-{attempt}" if attempt else "")
        run = run_deployment(name, parameters={"params": content, "branches": group, "shared": shared,
                                               "params_file": f"sweep {ctx.run_name}"},
                             timeout=0, idempotency_key=key if parent else None,
                             flow_run_name=f"{ctx.run_name}-{i}-{group[0]['label']}"[:100])
        log.info("%s: flow run %s on work pool %s%s", ", ".join(b["label"] for b in group), run.name,
                 params.schedule.work_pool, f" (attempt {attempt + 1})" if attempt else "")
        return run

    runs = [(group, submit(i, group, 0)) for i, group in enumerate(groups(params, todo, shared))]
    attempts = [0] * len(runs)
    silence_s = 3 * (PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() or 180)
    rows = []
    with get_client(sync_client=True) as client:
        pending, started, warned = set(range(len(runs))), time.monotonic(), False
        while pending:
            waiting = 0
            for i in sorted(pending):
                group, run = runs[i]
                current = client.read_flow_run(run.id)
                state = current.state
                if state is not None and state.is_running() and _silent_for(client, current) > silence_s:
                    # Its worker is gone (a process worker leaves the run Running: Prefect #16746); say so
                    # in the run's state, then start the group again below like any crashed run.
                    from prefect.states import Crashed

                    client.set_flow_run_state(run.id, Crashed(message=f"no heartbeat for {silence_s:.0f} s: its "
                                                                      "worker is gone"), force=True)
                    state = client.read_flow_run(run.id).state
                if state is not None and state.is_final():
                    if state.is_crashed() and attempts[i] < params.orchestration.retries:
                        attempts[i] += 1  # another worker takes it: finished stages are cache hits, a fine-tune
                        log.warning("%s ended %s (%s); starting it again", run.name, state.name, state.message)
                        runs[i] = (group, submit(i, group, attempts[i]))  # resumes from the shared checkpoint
                        continue
                    pending.discard(i)
                waiting += state is None or state.is_scheduled()
            if waiting and not warned and time.monotonic() - started > IDLE_WARNING_S:
                warned = True  # no time-out: a busy pool is not an error, but an empty one needs a person
                log.warning("%d branch runs still wait for a worker: is one polling? `prefect worker start --pool %s "
                            "--limit 1` on a host with diffprune installed", waiting, params.schedule.work_pool)
            time.sleep(POLL_S if pending else 0)
        for group, run in runs:
            final = client.read_flow_run(run.id)
            outcomes = _outcomes(client, run.id)
            for branch in group:
                rows.append(_row(ctx, branch, shared, outcomes.get(branch["label"]), final))
    return rows


def _silent_for(client, run) -> float:
    """Seconds since a running flow run last showed life: its newest heartbeat event (the flow engine sends
    one every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds), or its entering the Running state."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    since = run.state.timestamp
    page = client.read_events(filter=EventFilter(
        event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
        resource=EventResourceFilter(id=[f"prefect.flow-run.{run.id}"]),
        occurred=EventOccurredFilter(since=since)), limit=1)
    last = max([since, *(e.occurred for e in page.events)])
    return (datetime.now(timezone.utc) - last).total_seconds()


def _row(ctx: RunContext, branch: dict, shared: dict, outcome: dict | None, run) -> dict:
    """One branch's headline numbers from the store, or its error (its own, or its run's)."""
    stages = _own_stages(shared)
    if outcome is None or ("error" not in outcome and set(outcome["refs"]) != set(stages)):
        message = run.state.message if run.state else "no state"
        get_run_logger().error("%s: flow run %s ended %s: %s", branch["label"], run.name,
                               run.state.name if run.state else "?", message)
        return {**branch, "failed_stage": f"flow run {run.name}", "error": str(message)}
    if "error" in outcome:
        return {**branch, "failed_stage": outcome["failed_stage"], "error": outcome["error"]}
    refs = dict(shared)
    for stage in stages:
        refs[stage] = outcome["refs"][stage]
        ctx.record(stage, refs[stage], outcome["cached"][stage], label=f"{branch['label']}/{stage}")
    grid = store.folder(ctx.settings.store, refs["evaluate"]) / "output" / STAGES["evaluate"].images[0]
    return {**summary_of(ctx.settings.store, refs), **branch, "grid": str(grid)}


def require_cluster(params: Params) -> None:
    """Branches on a work pool need what every host shares: a URL store and a Prefect server with the
    sweep-branch deployment. One line otherwise."""
    from prefect.settings import PREFECT_API_URL

    if not store.is_url(params.orchestration.store):
        raise DiffpruneError(
            f"orchestration.branches=deployment needs a store every worker reaches: orchestration.store is the "
            f"path {params.orchestration.store}; give an s3://bucket/prefix or file:///shared/mount URL")
    if not PREFECT_API_URL.value():
        raise DiffpruneError("orchestration.branches=deployment needs the Prefect server the workers poll: "
                             "export PREFECT_API_URL=http://<prefect-host>:4200/api")
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    name = branch_deployment(params.schedule.work_pool)
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise DiffpruneError(f"no deployment {name} on {PREFECT_API_URL.value()}: run `diffprune deploy` "
                                 "(and start workers on the pool) first") from None

