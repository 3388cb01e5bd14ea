"""What every flow does around a task call: options from params, cache-hit logging, MLflow runs, reports."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import deployment, flow_run

from diffprune.common.atomic import atomic_file
from diffprune.common.errors import DiffpruneError
from diffprune.evaluation.report import HEADLINE_STAGES, headline
from diffprune.pipeline.config import Params, load_params
from diffprune.pipeline.table import LIBRARY, STAGES, downstream
from diffprune.tasks import store
from diffprune.tasks.stages import TASKS

T = TypeVar("T")


def run_settings(params: Params) -> dict:
    """The JSON-able settings every stage task receives (never part of a cache key)."""
    o = params.orchestration
    return {"store": str(Path(o.store).resolve()), "executor": o.executor, "timeouts_min": dict(o.timeouts_min),
            "train_processes": o.train_processes, "max_workers": o.max_workers}


def stage_params(params: Params, stage: str) -> dict:
    return getattr(params, STAGES[stage].group).model_dump(mode="json")


def shared_stages(varied: tuple[str, ...]) -> tuple[str, ...]:
    """The library stages that neither vary nor read a varied stage: computed once for every branch."""
    affected = set(varied).union(*(downstream(v) for v in varied))
    return tuple(s.name for s in LIBRARY if s.name not in affected)


def wiring(stage: str, refs: dict) -> dict:
    """A stage's inputs, named as its table entry names them, from the references (or futures) by stage."""
    return {name: refs[upstream] for name, upstream in STAGES[stage].inputs}


def prefect_tags() -> dict[str, str]:
    tags = {"prefect.flow_run_id": str(flow_run.id or ""), "prefect.flow_run_name": str(flow_run.name or ""),
            "mlflow.source.type": "JOB", "mlflow.source.name": f"prefect flow {flow_run.flow_name or 'diffprune'}"}
    if deployment.name:
        tags["prefect.deployment"] = str(deployment.name)
    return tags


class TrackingLost(DiffpruneError):
    """MLflow went away mid-run: the stages finished and are cached, but the run is not (fully) recorded."""

    exit_code = 4


class Steps:
    """Runs stage tasks with the configured retries, logs hits and misses, mirrors each stage to MLflow."""

    def __init__(self, params: Params, run_name: str):
        self.params, self.run_name = params, run_name
        self.run = run_settings(params)
        self.hits: dict[str, bool] = {}
        self.keys: dict[str, str] = {}
        self.tracker = None
        self.lost: str | None = None  # why tracking stopped mid-run, if it did
        if params.tracking.enabled:
            from diffprune.tracking.runs import Tracker, code_tags  # MLflow only when tracking is on

            self.tracker = Tracker(params.tracking, run_name, {**code_tags(), **prefect_tags()})

    @classmethod
    def open(cls, params_file: str, overrides: list[str] | None, kind: str) -> Steps:
        """Validated params plus the MLflow parent run, named after the Prefect flow run."""
        return cls(load_params(params_file, overrides or []), str(flow_run.name or kind))

    def chain(self, stages: tuple[str, ...], refs: dict | None = None) -> dict[str, dict]:
        """Run ``stages`` in table order, each fed by the references of the stages before it."""
        refs = dict(refs or {})
        for stage in stages:
            refs[stage] = self.call(stage, wiring(stage, refs))
        return refs

    def task(self, stage: str):
        o = self.params.orchestration
        return TASKS[stage].with_options(retries=o.retries, retry_delay_seconds=o.retry_delay_s)

    def call(self, stage: str, inputs: dict[str, dict], params: dict | None = None) -> dict:
        state = self.task(stage)(params=params or stage_params(self.params, stage), inputs=inputs, run=self.run,
                                 return_state=True)
        ref = state.result()
        self.note(stage, ref, state.name == "Cached")
        return ref

    def note(self, stage: str, ref: dict, cached: bool, label: str | None = None) -> dict:
        """Log the outcome and mirror the stage to a nested MLflow run; returns its manifest."""
        label = label or stage
        manifest = store.manifest_of(self.run["store"], ref)
        self.hits[label], self.keys[label] = cached, ref["key"]
        folder = store.folder(self.run["store"], ref)
        get_run_logger().info("%s: %s (key %s, %s)", label, "cache hit" if cached else "computed", ref["key"], folder)
        tags = {"diffprune.cache_key": ref["key"], "diffprune.cache": "hit" if cached else "miss",
                "diffprune.code_version": manifest.get("code", ""), "diffprune.label": label, **prefect_tags()}
        self.track(label, lambda t: t.log_stage(stage, manifest["params"], manifest["summary"], folder / "metrics",
                                                folder / "output", tags, cached_key=ref["key"] if cached else None))
        return manifest

    def track(self, what: str, call: Callable[[Any], T]) -> T | None:
        """``call(tracker)`` unless tracking is off or lost. A tracking server that dies mid-run must not cost
        the run its stages: the first failure is logged once, tracking stops, and the stages go on (their
        outputs are cached either way); :meth:`lost_error` then tells how to record the run."""
        if self.tracker is None:
            return None
        try:
            return call(self.tracker)
        except DiffpruneError:
            raise
        except Exception as exc:  # MLflow and its HTTP client raise many types for one cause: unreachable
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            self.lost = f"{what}: {type(exc).__name__}: {first}"
            get_run_logger().warning("MLflow tracking failed at %s; the remaining stages run untracked", self.lost)
            self.tracker = None
            return None

    def lost_error(self) -> TrackingLost | None:
        if self.lost is None:
            return None
        return TrackingLost(f"MLflow tracking failed during the run ({self.lost}); every stage finished and its "
                            f"outputs are in the store ({self.params.orchestration.store}): run the same command "
                            "again once the tracking server is back: every stage will be a cache hit, and the run "
                            "will be recorded and the model registered")

    def finish(self, ok: bool, metrics: dict | None = None, report: str | None = None) -> None:
        def close(tracker) -> None:
            tracker.set_tags({f"diffprune.key.{label}": key for label, key in self.keys.items()})
            tracker.set_tags({"diffprune.cache_hits": f"{sum(self.hits.values())}/{len(self.hits)}"})
            if metrics:
                tracker.log_metrics(metrics)
            if report:
                tracker.log_text(report, "report.md")
            tracker.finish(ok)

        self.track("finishing the run", close)


def summary_of(root: str, refs: dict[str, dict]) -> dict:
    """The headline numbers of one chain (references by stage) from the store at ``root``."""
    return headline({stage: store.manifest_of(root, refs[stage])["summary"] for stage in HEADLINE_STAGES})


def publish_report(markdown: str, grids: list[Path], key: str, out_file: Path) -> Path:
    """The report as a Prefect markdown artifact, the grids as an image artifact, and a file on disk."""
    create_markdown_artifact(markdown=markdown, key=key, description="teacher vs pruned model")
    publish_grids({g.stem.replace("_", " "): g for g in grids}, f"{key}-samples")
    with atomic_file(out_file) as fh:
        fh.write(markdown)
    return out_file


def publish_grids(grids: dict[str, Path], key: str) -> None:
    """Sample grids inlined as PNG data (the UI shows no local files; image artifacts need public URLs)."""
    images = [f"### {title}\n\n![{title}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"
              for title, path in grids.items() if path.is_file()]
    if images:
        create_markdown_artifact(markdown="\n\n".join(images), key=key,
                                 description="sample grids (same noise for teacher and pruned model)")


def publish_table(rows: list[dict], key: str, description: str) -> None:
    create_table_artifact(table=rows, key=key, description=description)
