"""The register stage as a cached Prefect task: one registry version per distinct model and evaluation.

Keyed on the register params, the tracking store and the digests of the fine-tuned model and its
evaluation, so a re-run of an unchanged pipeline never adds a duplicate version. The flow calls it as the
``version`` of :func:`diffprune.tracking.register.register`, the one register path of both front ends.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from diffprune.common.atomic import write_json
from diffprune.pipeline.table import STAGES
from diffprune.tasks import store
from diffprune.tasks.stages import RunSettings, StageCachePolicy, cache_key, stage_code


@task(name="register", cache_policy=StageCachePolicy(stage="register"), persist_result=True,
      result_serializer="json")
def register(params: dict, inputs: dict[str, dict], summary: dict, run: RunSettings, extra: dict,
             mlflow_run_id: str | None = None) -> dict:
    """Register the fine-tuned model through the gate (once per key); returns the store entry's reference."""
    from diffprune.pipeline.stage_params import RegisterParams
    from diffprune.tracking.register import register_version

    key = cache_key(run.store, "register", params, inputs, extra)

    def build(scratch: Path) -> dict:
        model_dir = store.folder(run.store, inputs["model"]) / "output"
        grid = store.folder(run.store, inputs["evaluation"]) / "output" / STAGES["evaluate"].images[0]
        result = register_version(model_dir, summary, RegisterParams(**params), mlflow_run_id, grid)
        write_json(scratch / "metrics" / STAGES["register"].metrics_file, result)
        return result

    record = {"params": params, "inputs": {n: r["key"] for n, r in inputs.items()}, "code": stage_code("register"),
              "tracking_uri": extra.get("tracking_uri")}
    manifest, built = store.publish(run.store, "register", key, build, record)
    outcome = manifest["summary"]
    get_run_logger().info("register: %s version %s of %s, aliases %s", "created" if built else "already registered:",
                          outcome["version"], outcome["name"], outcome["aliases"])
    return store.reference("register", key)
