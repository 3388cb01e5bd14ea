"""The register stage as a cached Prefect task: one registry version per distinct model and evaluation.

Keyed on the register params, the tracking store and the digests of the fine-tuned model and its
evaluation, so a re-run of an unchanged pipeline never adds a duplicate version.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from diffprune.atomic import write_json
from diffprune.fingerprint import code_version
from tasks import store
from tasks.stages import StageCachePolicy, cache_key


@task(name="register", cache_policy=StageCachePolicy(stage="register"), persist_result=True,
      result_serializer="json")
def register(params: dict, model: dict, evaluation: dict, summary: dict, run: dict, extra: dict,
             mlflow_run_id: str | None = None) -> dict:
    """Log the fine-tuned model as a pickle-free pyfunc, register it, and promote it if the gate passes."""
    from diffprune.config import RegisterParams
    from tasks.registry import register as register_model

    refs = {"model": model, "evaluation": evaluation}
    key = cache_key(run["store"], "register", params, refs, extra)

    def build(scratch: Path) -> dict:
        model_dir = store.folder(run["store"], model) / "output"
        result = register_model(model_dir, summary, RegisterParams(**params), mlflow_run_id)
        write_json(scratch / "metrics" / "register.json", result)
        return result

    record = {"params": params, "inputs": {n: r["key"] for n, r in refs.items()}, "code": code_version("register"),
              "tracking_uri": extra.get("tracking_uri")}
    manifest, built = store.publish(run["store"], "register", key, build, record)
    outcome = manifest["summary"]
    get_run_logger().info("register: %s version %s of %s, aliases %s", "created" if built else "already registered:",
                          outcome["version"], outcome["name"], outcome["aliases"])
    return store.reference("register", key)
