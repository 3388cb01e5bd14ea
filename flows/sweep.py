"""The sweep flow: importance criteria × MACs targets × seeds, sharing one prepared dataset and teacher.

Branches fan out as independent task futures; a score is computed once per criterion and seed and reused by
every target (same cache key). The task runner is local threads by default, or a Dask cluster
(``orchestration.task_runner: dask``); or each group of branches is a flow run of a work pool's workers on any
host (``orchestration.branches: deployment``, :mod:`diffprune.flows.branches`). It ends with one paper-style
comparison table.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from diffprune.common.atomic import atomic_file, write_json
from diffprune.evaluation import paired
from diffprune.evaluation.report import branch_label, branch_method, comparison
from diffprune.flows.artifacts import publish_grids, publish_table
from diffprune.flows.context import RunContext, shared_stages, stage_params, summary_of, wiring
from diffprune.pipeline.config import Params, load_params
from diffprune.pipeline.table import LIBRARY, STAGES, SWEPT, TABLE
from diffprune.pruning.criteria import CRITERIA
from diffprune.tasks import store


def branches(params: Params) -> list[dict]:
    """Every (criterion, thr, variant, scoring batches, target, seed) combination; thresholds apply where a
    criterion uses one, variants and scoring batches where it has a gradient pass. Seeds vary slowest: a
    sweep stopped half-way has compared every method on the first seeds. Branches of one seed are paired:
    the same scoring batch and noise, the same pruning and fine-tuning seed."""
    out, sw = [], params.sweep
    for seed in sw.seeds:
        for target in sw.target_macs:
            for criterion in sw.criteria:
                row = CRITERIA[criterion]
                for thr in sw.thresholds if row.uses_threshold else (params.score.thr,):
                    for variant in sw.variants if row.needs_gradients else (params.score.variant,):
                        for n_batches in sw.score_batches if row.needs_gradients else (params.score.n_batches,):
                            shown = variant if row.needs_gradients else None
                            out.append({"criterion": criterion, "thr": thr, "variant": variant, "n_batches": n_batches,
                                        "target_macs": target, "seed": seed,
                                        "method": branch_method(criterion, thr, shown, n_batches),
                                        "label": branch_label(criterion, thr, target, seed, shown, n_batches)})
    return out


def branch_changes(branch: dict) -> dict[str, dict]:
    """What a branch sets in each swept stage's params: the table's ``swept`` fields, from the branch's values
    of the same name (a field the branch does not name is cleared: a MACs target replaces the ratio)."""
    return {s.name: {field: branch.get(field) for field in s.swept} for s in TABLE if s.swept}


@flow(name="diffprune-sweep", log_prints=True)
def sweep_flow(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    ctx = RunContext.open(params_file, overrides, "sweep")
    params, run_name = ctx.params, ctx.run_name
    try:
        shared = ctx.run_stages(shared_stages(SWEPT))
        if params.orchestration.branches == "deployment":  # flow runs on a work pool's workers, any host
            from diffprune.flows.branches import through_pool

            rows = through_pool(ctx, branches(params), shared)
        else:
            rows = _local(ctx, params, shared)
        if params.registration.enabled and ctx.tracker:
            _register(ctx, rows)
        table = _publish(rows, params, run_name)
        ctx.finish(all(r.get("fid") is not None for r in rows), report=table["markdown"])
    except BaseException:
        ctx.finish(False)
        raise
    if (lost := ctx.lost_error()) is not None:
        raise lost  # the comparison table is written; the tracking of it is incomplete
    return {"rows": rows, "table": table["markdown"], "table_file": table["file"], "cache_hits": dict(ctx.hits)}


def _local(ctx: RunContext, params: Params, shared: dict) -> list[dict]:
    """Every branch's own stages as task futures of this flow's task runner; one row per branch."""
    submitted, chains = {}, []
    for b in branches(params):
        refs, chain, changes = dict(shared), {}, branch_changes(b)
        for stage in (s.name for s in LIBRARY if s.name not in shared):
            stage_args = {**stage_params(params, stage), **changes.get(stage, {})}
            inputs = wiring(stage, refs)
            # Identical work is submitted once: a criterion is scored once per seed for every target.
            sig = (stage, json.dumps(stage_args, sort_keys=True), tuple((n, id(v)) for n, v in inputs.items()))
            if sig not in submitted:
                submitted[sig] = ctx.stage_task(stage).submit(params=stage_args, inputs=inputs, run=ctx.settings)
            refs[stage] = chain[stage] = submitted[sig]
        chains.append((b, chain))
    wait([f for _, chain in chains for f in chain.values()])
    return [_row(ctx, b, chain, shared) for b, chain in chains]


def _row(ctx: RunContext, branch: dict, chain: dict, shared: dict) -> dict:
    """One branch's headline numbers, or its failure (other branches still report)."""
    refs = dict(shared)
    for stage, future in chain.items():
        state = future.state
        if not state.is_completed():
            get_run_logger().error("%s: %s failed: %s", branch["label"], stage, state.message)
            return {**branch, "failed_stage": stage, "error": str(state.message)}
        refs[stage] = future.result()
        ctx.record(stage, refs[stage], state.name == "Cached", label=f"{branch['label']}/{stage}")
    grid = store.folder(ctx.settings.store, refs["evaluate"]) / "output" / STAGES["evaluate"].images[0]
    return {**summary_of(ctx.settings.store, refs), **branch, "grid": str(grid)}


def _register(ctx: RunContext, rows: list[dict]) -> None:
    """Every finished branch's model as a version of the registry, each through the gate. Worst FID ratio
    first: a version is compared with the champion before it, so the champion only moves to a better branch
    and ends on the best one that passes (unless an earlier run's is clearly better)."""
    from diffprune.tracking.register import registry_link

    done, outcomes = [r for r in rows if "error" not in r], {}
    for row in sorted(done, key=lambda r: -math.inf if r.get("fid_ratio") is None else r["fid_ratio"], reverse=True):
        label = row["label"]
        refs = {s.name: store.reference(s.name, ctx.keys.get(f"{label}/{s.name}") or ctx.keys[s.name])
                for s in LIBRARY}
        outcome = ctx.register(refs, {**summary_of(ctx.settings.store, refs), "branch": label}, f"{label}/register")
        if outcome:
            outcomes[label] = outcome

    def aliases_now(tracker) -> None:  # a later branch takes `candidate` (and maybe `champion`) from an earlier one
        for o in outcomes.values():
            o["aliases"] = sorted(tracker.client.get_model_version(o["name"], o["version"]).aliases)

    ctx.tracked("reading the registered versions' aliases", aliases_now)
    for row in done:
        if (o := outcomes.get(row["label"])) is not None:
            row.update(registered=o["model_uri"], aliases=",".join(o["aliases"]),
                       gate="passed" if o["gate"]["passed"] else "refused", registry=registry_link(o))


def _publish(rows: list[dict], params: Params, run_name: str) -> dict:
    done = [r for r in rows if "error" not in r]
    teacher_row = ({"criterion": "teacher", "thr": None, "target_macs": 1.0, "params": done[0]["teacher_params"],
                    "macs": done[0]["teacher_macs"], "fid": done[0]["teacher_fid"],
                    "fid_std": done[0]["teacher_fid_std"], "ssim": 1.0, "finetune_steps": None} if done else None)
    markdown = "# diffprune sweep\n\n" + comparison(([teacher_row] if teacher_row else []) + done)
    if len({r["seed"] for r in done}) > 1:
        markdown += "\n## Paired by seed\n\n" + paired.render(done)
    if any("registered" in r for r in rows):
        markdown += "\n## Registered\n\n" + "\n".join(
            f"- {r['label']}: {r['registry']}"
            for r in rows if "registered" in r) + "\n"
    for r in rows:
        if "error" in r:
            markdown += f"\n- {r['label']}: failed in {r['failed_stage']}: {r['error']}"
    out = store.beside(params.orchestration.store, params.orchestration.store_cache) / "reports"
    write_json(out / f"sweep-{run_name}.json", rows)
    with atomic_file(out / f"sweep-{run_name}.csv") as fh:
        writer = csv.DictWriter(fh, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    with atomic_file(out / f"sweep-{run_name}.md") as fh:
        fh.write(markdown)
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown=markdown, key="diffprune-sweep", description="criteria × targets comparison")
    publish_table([{k: v for k, v in r.items() if not isinstance(v, list | dict)} for r in rows],
                  "diffprune-sweep-table", "one row per branch")
    publish_grids({f"{r['label']} (rows: teacher, then pruned, same noise)": Path(r["grid"]) for r in done},
                  "diffprune-sweep-samples")
    return {"markdown": markdown, "file": str(out / f"sweep-{run_name}.md")}


def task_runner(params: Params):
    o = params.orchestration
    if o.dask_address:
        from diffprune.flows.preflight import require_shared_api

        # Task runs execute in the cluster's worker processes, on other hosts: they report to the Prefect API
        # this run uses, so it must be one that outlives the flow and every host reaches (checked here as well
        # as in the preflight: sweep() is also called directly). The cluster's own workers and threads, not
        # max_workers, bound how many stages run at once.
        require_shared_api(o.dask_address)
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=o.dask_address)
    if o.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(cluster_kwargs={"n_workers": o.max_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": ":0"})
    # A thread per task: waiting tasks hold their thread, so the pool must not be the cap on running
    # stages; orchestration.max_workers caps those (tasks/execute.py), inline stages run one at a time.
    per_branch = len(LIBRARY) - len(shared_stages(SWEPT))
    return ThreadPoolTaskRunner(max_workers=len(branches(params)) * per_branch)


def sweep(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    """Run the sweep flow with the configured task runner (what ``diffprune sweep`` calls)."""
    params = load_params(params_file, overrides or [])
    configured = sweep_flow.with_options(task_runner=task_runner(params))
    with _shared_api() if params.orchestration.task_runner == "dask" else contextlib.nullcontext():
        return configured(params_file=params_file, overrides=overrides or [])


@contextlib.contextmanager
def _shared_api():
    """Dask workers are separate processes: without an API URL each would start its own temporary
    Prefect server (over a minute per run). Start one here and point every process at it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # A URL from the active Prefect profile counts too: with an existing cluster the workers were checked
    # against it, and a temporary server here (on 127.0.0.1) would be out of their reach.
    if os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(timeout=int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")))
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()
