"""The main job: prepare → teacher → score → prune → finetune → evaluate → register, as cached tasks.

``diffprune run`` (what ``make run`` calls) runs this flow on ``params.yaml`` plus ``--set`` overrides;
``diffprune serve`` serves it on the cron schedule of ``params.yaml``'s ``schedule`` group; ``diffprune deploy``
puts it on a work pool with that schedule, its params by content.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from diffprune.common.atomic import atomic_file
from diffprune.evaluation.report import render
from diffprune.flows.artifacts import publish_report
from diffprune.flows.context import RunContext, summary_of
from diffprune.pipeline.table import LIBRARY
from diffprune.tasks.store import beside, folder


@flow(name="diffprune-pipeline", log_prints=True)
def pipeline(params_file: str = "params.yaml", overrides: list[str] | None = None, params: dict | None = None) -> dict:
    """Run (or find cached) every stage of the stage table; returns the headline numbers and where to look.
    ``params``: the params by content (what ``diffprune deploy`` gives a worker on any host), used instead of
    reading ``params_file``, which then only names their source."""
    ctx = RunContext.open(params_file, overrides, "pipeline", content=params)
    params, run_name, root = ctx.params, ctx.run_name, ctx.settings.store
    try:
        refs = ctx.run_stages(tuple(s.name for s in LIBRARY))
        summary = summary_of(root, refs)
        registered = None
        if params.registration.enabled and ctx.tracker:
            registered = ctx.register(refs, summary)
        report = render(summary, title=f"diffprune run {run_name}", links=_links(ctx, registered))
        out = beside(params.orchestration.store, params.orchestration.store_cache) / "reports"
        grids = [folder(root, refs[s.name]) / "output" / image for s in LIBRARY for image in s.images]
        report_file = publish_report(report, grids, "diffprune-report", out / f"{run_name}.md")
        with atomic_file(out / "latest.md") as fh:
            fh.write(report)
        ctx.finish(True, {k: v for k, v in summary.items() if isinstance(v, int | float)}, report)
    except BaseException:
        ctx.finish(False)
        raise
    hits = sum(ctx.hits.values())
    get_run_logger().info("%d of %d stages were cache hits", hits, len(ctx.hits))
    if (lost := ctx.lost_error()) is not None:
        raise lost
    tracker = ctx.tracker
    return {"summary": summary, "registered": registered, "report": str(report_file), "cache_hits": dict(ctx.hits),
            "keys": dict(ctx.keys), "mlflow_run_id": tracker.run_id if tracker else None,
            "tracking_uri": tracker.uri if tracker else None, "mlflow_url": _experiment_url(ctx)}


def _experiment_url(ctx: RunContext) -> str | None:
    if not ctx.tracker:
        return None
    from diffprune.tracking.runs import ui_url

    return ui_url(ctx.tracker.uri, ctx.tracker.experiment_id)


def _links(ctx: RunContext, registered: dict | None) -> dict[str, str]:
    links = {}
    if ctx.tracker:
        from diffprune.tracking.runs import ui_url  # MLflow is imported only when tracking is on

        t = ctx.tracker
        links["MLflow run"] = f"{ui_url(t.uri, t.experiment_id, t.run_id)} (`mlflow ui --backend-store-uri {t.uri}`)"
    if registered:
        from diffprune.tracking.register import registry_link

        links["Registry"] = registry_link(registered)
    return links
