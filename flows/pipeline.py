"""The main job: prepare → teacher → score → prune → finetune → evaluate → register, as cached tasks.

``diffprune run`` (what ``make run`` calls) runs this flow on ``params.yaml`` plus ``--set`` overrides;
``diffprune serve`` serves it on the cron schedule of ``params.yaml``'s ``schedule`` group.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from diffprune.common.atomic import atomic_file
from diffprune.evaluation.report import render
from diffprune.flows.context import Steps, publish_report, stage_params, summary_of, wiring
from diffprune.pipeline.table import LIBRARY
from diffprune.tasks.register import register
from diffprune.tasks.store import folder, manifest_of


@flow(name="diffprune-pipeline", log_prints=True)
def pipeline(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    """Run (or find cached) every stage of the stage table; returns the headline numbers and where to look."""
    steps = Steps.open(params_file, overrides, "pipeline")
    params, run_name = steps.params, steps.run_name
    try:
        refs = steps.chain(tuple(s.name for s in LIBRARY))
        summary = summary_of(steps.run["store"], refs)
        registered = None
        if params.registration.enabled and steps.tracker:
            registered = steps.track("register", lambda _: _register(steps, params, wiring("register", refs), summary))
        links = _links(steps, registered)
        report = render(summary, title=f"diffprune run {run_name}", links=links)
        out = Path(params.orchestration.store).parent / "reports"
        grids = [folder(steps.run["store"], refs[s.name]) / "output" / image
                 for s in LIBRARY for image in s.images]
        report_file = publish_report(report, grids, "diffprune-report", out / f"{run_name}.md")
        with atomic_file(out / "latest.md") as fh:
            fh.write(report)
        steps.finish(True, {k: v for k, v in summary.items() if isinstance(v, int | float)}, report)
    except BaseException:
        steps.finish(False)
        raise
    hits = sum(steps.hits.values())
    get_run_logger().info("%d of %d stages were cache hits", hits, len(steps.hits))
    if (lost := steps.lost_error()) is not None:
        raise lost
    return {"summary": summary, "registered": registered, "report": str(report_file), "cache_hits": dict(steps.hits),
            "keys": dict(steps.keys), "mlflow_run_id": steps.tracker.run_id if steps.tracker else None,
            "tracking_uri": steps.tracker.uri if steps.tracker else None,
            "mlflow_url": _experiment_url(steps)}


def _register(steps: Steps, params, inputs: dict[str, dict], summary: dict) -> dict:
    nested = None
    if steps.tracker:
        nested = steps.tracker.client.create_run(steps.tracker.experiment_id, run_name="register", tags={
            "mlflow.parentRunId": steps.tracker.run_id, "diffprune.stage": "register"}).info.run_id
    # No retries: a retry after a half-done registration would add a second version.
    state = register(params=stage_params(params, "register"), inputs=inputs, summary=summary, run=steps.run,
                     extra={"tracking_uri": steps.tracker.uri}, mlflow_run_id=steps.tracker.run_id, return_state=True)
    ref = state.result()
    cached = state.name == "Cached"
    outcome = manifest_of(steps.run["store"], ref)["summary"]
    steps.hits["register"], steps.keys["register"] = cached, ref["key"]
    get_run_logger().info("register: %s (key %s)", "cache hit" if cached else "computed", ref["key"])
    if nested:
        client = steps.tracker.client
        client.set_tag(nested, "diffprune.cache", "hit" if cached else "miss")
        client.set_tag(nested, "diffprune.registered_version", f"{outcome['name']}/{outcome['version']}")
        client.log_dict(nested, outcome, "register.json")
        client.set_terminated(nested)
        steps.tracker.link_model(outcome, nested)
    return outcome


def _experiment_url(steps: Steps) -> str | None:
    if not steps.tracker:
        return None
    from diffprune.tracking.runs import ui_url

    return ui_url(steps.tracker.uri, steps.tracker.experiment_id)


def _links(steps: Steps, registered: dict | None) -> dict[str, str]:
    links = {}
    if steps.tracker:
        from diffprune.tracking.runs import ui_url  # MLflow is imported only when tracking is on

        t = steps.tracker
        links["MLflow run"] = f"{ui_url(t.uri, t.experiment_id, t.run_id)} (`mlflow ui --backend-store-uri {t.uri}`)"
    if registered:
        gate = "passed" if registered["gate"]["passed"] else "refused: " + "; ".join(
            r for r in registered["gate"]["reasons"] if "fail" in r.lower()) or "refused"
        links["Registry"] = (f"`{registered['model_uri']}` aliases {', '.join(registered['aliases'])} "
                             f"(gate {gate})")
    return links
