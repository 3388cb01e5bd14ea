"""The run context of a flow: validated params, the settings its stage tasks get, and what it does around
every task call — retries from params, cache-hit logging, the nested MLflow run of each stage."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from prefect import get_run_logger
from prefect.runtime import deployment, flow_run

from diffprune.common.errors import DiffpruneError
from diffprune.evaluation.report import headline
from diffprune.flows.store_cmd import PARAMS_FILE, params_file_tag
from diffprune.pipeline.config import Params, load_params, params_from
from diffprune.pipeline.table import HEADLINE, LIBRARY, STAGES, downstream
from diffprune.tasks import register as register_task
from diffprune.tasks import store
from diffprune.tasks.results import result_storage
from diffprune.tasks.stages import TASKS, RunSettings

T = TypeVar("T")


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


class RunContext:
    """One flow run: runs stage tasks with the configured retries, logs hits and misses, mirrors each stage
    to a nested MLflow run of the run's parent run (``tracker``; None when tracking is off or was lost)."""

    def __init__(self, params: Params, run_name: str, source: str | None = None):
        self.params, self.run_name = params, run_name
        self.settings = RunSettings.of(params)
        self.hits: dict[str, bool] = {}
        self.keys: dict[str, str] = {}
        self.tracker = None
        self.lost: str | None = None  # why tracking stopped mid-run, if it did
        self.result_storage = result_storage(self.settings.store.root)  # None: Prefect's (local) default
        if params.tracking.enabled:
            from diffprune.tracking.runs import code_tags, start_tracking  # MLflow only when tracking is on

            # A params file read here is tagged by its place in the work tree; params given by content (a
            # deployment's) carry the tag their deploying host computed (``source``).
            file_tag = ({PARAMS_FILE: source} if source else params_file_tag(flow_run.parameters.get("params_file")))
            self.tracker = start_tracking(params.tracking, run_name, {**code_tags(), **prefect_tags(), **file_tag})

    @classmethod
    def open(cls, params_file: str, overrides: list[str] | None, kind: str, content: dict | None = None) -> RunContext:
        """Validated params plus the MLflow parent run, named after the Prefect flow run. ``content``: the params
        themselves (a deployment's, which must not depend on a file of the deploying host); ``params_file`` then
        only names where they came from."""
        if content is None:
            return cls(load_params(params_file, overrides or []), str(flow_run.name or kind))
        given = params_from(content, overrides or [], "params (deployment parameters)")
        return cls(given, str(flow_run.name or kind), source=params_file)

    def run_stages(self, stages: tuple[str, ...], refs: dict | None = None) -> dict[str, dict]:
        """Run ``stages`` in table order, each fed by the references of the stages before it."""
        refs = dict(refs or {})
        for stage in stages:
            refs[stage] = self.run_stage(stage, wiring(stage, refs))
        return refs

    def stage_task(self, stage: str):
        """The stage's Prefect task with the configured retries."""
        o = self.params.orchestration
        return self.shared(TASKS[stage].with_options(retries=o.retries, retry_delay_seconds=o.retry_delay_s))

    def shared(self, task: T) -> T:
        """``task`` with its cache records where every host of the store finds them."""
        return task if self.result_storage is None else task.with_options(result_storage=self.result_storage)

    def run_stage(self, stage: str, inputs: dict[str, dict], params: dict | None = None) -> dict:
        """Run (or find cached) one stage and record it; returns its store reference."""
        state = self.stage_task(stage)(params=params or stage_params(self.params, stage), inputs=inputs,
                                       run=self.settings, return_state=True)
        ref = state.result()
        self.record(stage, ref, state.name == "Cached")
        return ref

    def record(self, stage: str, ref: dict, cached: bool, label: str | None = None) -> dict:
        """Log the outcome and mirror the stage to a nested MLflow run; returns its manifest."""
        label = label or stage
        manifest = store.manifest_of(self.settings.store, ref)
        self.hits[label], self.keys[label] = cached, ref["key"]
        folder = store.folder(self.settings.store, ref)
        get_run_logger().info("%s: %s (key %s, %s)", label, "cache hit" if cached else "computed", ref["key"], folder)
        tags = {"diffprune.cache_key": ref["key"], "diffprune.cache": "hit" if cached else "miss",
                "diffprune.code_version": manifest.get("code", ""), "diffprune.label": label, **prefect_tags()}
        self.tracked(label, lambda t: t.log_stage(stage, manifest["params"], manifest["summary"], folder / "metrics",
                                                folder / "output", tags, cached_key=ref["key"] if cached else None))
        return manifest

    def register(self, refs: dict[str, dict], summary: dict, label: str = "register") -> dict | None:
        """Register the chain's fine-tuned model (:func:`diffprune.tracking.register.register`, in a nested run
        named ``label``), its registration a cached task: an unchanged chain never adds a second version. None
        when tracking is off or lost."""
        from diffprune.tracking.register import register  # MLflow only when tracking is on

        def version(parent_run_id: str) -> tuple[dict, bool]:
            # No retries: a retry after a half-done registration would add a second version.
            state = self.shared(register_task.register)(
                params=stage_params(self.params, "register"), inputs=wiring("register", refs), summary=summary,
                run=self.settings, extra={"tracking_uri": self.tracker.uri}, mlflow_run_id=parent_run_id,
                return_state=True)
            ref, cached = state.result(), state.name == "Cached"
            self.hits[label], self.keys[label] = cached, ref["key"]
            get_run_logger().info("%s: %s (key %s)", label, "cache hit" if cached else "computed", ref["key"])
            return store.manifest_of(self.settings.store, ref)["summary"], cached

        return self.tracked(label, lambda tracker: register(tracker, version, label))

    def tracked(self, what: str, call: Callable[[Any], T]) -> T | None:
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

        self.tracked("finishing the run", close)


def summary_of(root: store.Root, refs: dict[str, dict]) -> dict:
    """The headline numbers of one chain (references by stage) from the store at ``root``."""
    return headline({stage: store.manifest_of(root, refs[stage])["summary"] for stage in HEADLINE})


