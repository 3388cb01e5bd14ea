"""One Prefect task per pipeline stage, each running the same stage function as ``diffprune <stage>``.

Cache keys come from the stage's own params, the content digests of its inputs and its code version
(:mod:`diffprune.fingerprint`) — never from the run id or a path. A task returns a small reference
``{"stage", "key"}`` into the content-addressed store (:mod:`tasks.store`), persisted as JSON.
A cached reference whose store entry is missing or damaged is not trusted: the key policy turns
that lookup into a miss, and the stage is recomputed.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import CachePolicy

from diffprune.fingerprint import code_version, dir_digest, stage_key
from diffprune.models import BUILTIN_TEACHER
from tasks import store
from tasks.execute import StageInputError, StageTimeout, run_cli

# The inputs of each stage, named as the CLI options that take them.
INPUTS = {
    "prepare": (),
    "teacher": ("data",),
    "score": ("data", "teacher"),
    "prune": ("teacher", "scores"),
    "finetune": ("data", "student", "teacher"),
    "evaluate": ("data", "teacher", "student"),
    "register": ("model", "evaluation"),
}
GROUP = {"prepare": "data", "register": "registration"}  # stage → attribute of Params
OUT_OPTION = {"evaluate": "--samples"}
TRAINS = ("teacher", "finetune")
NOT_IN_KEY = {"evaluate": ("cache_dir", "inception_path")}  # where things are kept, not what is computed


def external_inputs(stage: str, params: dict) -> dict[str, str]:
    """Digests of inputs that come from outside the store (an image folder, a local or shipped teacher)."""
    if stage == "prepare" and params.get("dataset") == "imagefolder":
        return {"images": dir_digest(params["path"])}
    if stage == "teacher" and params.get("source") == "builtin":
        return {"builtin": dir_digest(BUILTIN_TEACHER)}
    if stage == "teacher" and params.get("source") == "pretrained":
        ref = params["pretrained"]
        return {"pretrained": dir_digest(ref) if Path(ref).is_dir() else f"hub:{ref}"}
    if stage == "evaluate" and params.get("fid_extractor") != "classifier":
        weights = Path(params["inception_path"])
        return {"inception": dir_digest(weights) if weights.is_file() else "absent"}
    return {}


def cache_key(root: str, stage: str, params: dict, refs: dict[str, dict], extra: dict | None = None) -> str:
    inputs = {name: store.manifest_of(root, ref)["output_digest"] for name, ref in refs.items()}
    inputs.update(external_inputs(stage, params))
    keyed = {k: v for k, v in params.items() if k not in NOT_IN_KEY.get(stage, ())}
    return stage_key(stage, {**keyed, **(extra or {})}, inputs, code_version(stage))


@dataclass
class StageCachePolicy(CachePolicy):
    """Key = :func:`cache_key`; a key whose store entry is gone or damaged is made to miss."""

    stage: str = ""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str:
        run = inputs["run"]
        refs = {name: inputs[name] for name in INPUTS.get(self.stage, ())}
        key = cache_key(run["store"], self.stage, inputs["params"], refs, inputs.get("extra"))
        if store.lookup(run["store"], self.stage, key) is None and task_ctx.result_store.exists(key):
            get_run_logger().warning(
                "%s: the cached result's outputs in %s are missing or damaged; recomputing",
                self.stage, store.entry(run["store"], self.stage, key))
            return f"{key}-rebuild-{uuid.uuid4().hex[:8]}"
        return key


def _transient(task, task_run, state) -> bool:
    """Retry crashes (killed, out of memory, I/O); never bad input or a time-out."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, StageInputError | StageTimeout)


def run_stage(stage: str, params: dict, refs: dict[str, dict], run: dict) -> dict:
    """Compute (or find) the stage's store entry for these params and inputs; return its reference."""
    key = cache_key(run["store"], stage, params, refs)
    inputs = {name: store.folder(run["store"], ref) / "output" for name, ref in refs.items()}

    def build(scratch: Path) -> dict:
        group = GROUP.get(stage, stage)
        (scratch / "params.yaml").write_text(yaml.safe_dump({group: params}, sort_keys=False))
        argv = [stage, "--params", str(scratch / "params.yaml"),
                OUT_OPTION.get(stage, "--out"), str(scratch / "output")]
        for name, path in inputs.items():
            argv += [f"--{name}", str(path)]
        if stage != "prepare":
            argv += ["--metrics", str(scratch / "metrics")]
        if stage in TRAINS:  # shared per stage: training fingerprints its own checkpoint folders
            argv += ["--checkpoints", str(Path(run["store"]) / "_checkpoints" / stage)]
        timeout = run["timeouts_min"].get(stage)
        processes = run.get("train_processes", 1) if stage in TRAINS else 1
        run_cli(argv, run["executor"], timeout * 60 if timeout else None, processes, run.get("max_workers"))
        return stage_summary(stage, scratch)

    record = {"params": params, "inputs": {n: r["key"] for n, r in refs.items()}, "code": code_version(stage)}
    _, built = store.publish(run["store"], stage, key, build, record)
    get_run_logger().info("%s %s (key %s)", stage, "computed" if built else "found complete in the store", key)
    return store.reference(stage, key)


def stage_summary(stage: str, folder: Path) -> dict:
    """What the stage reported: ``metrics/<stage>.json`` (prepare: the dataset manifest, without checksums)."""
    if stage == "prepare":
        manifest = json.loads((folder / "output" / "manifest.json").read_text())
        return {k: v for k, v in manifest.items() if k != "files"}
    return json.loads((folder / "metrics" / f"{stage}.json").read_text())


def _stage_task(stage: str):
    return task(name=stage, cache_policy=StageCachePolicy(stage=stage), persist_result=True,
                result_serializer="json", retry_condition_fn=_transient, log_prints=True)


@_stage_task("prepare")
def prepare(params: dict, run: dict) -> dict:
    return run_stage("prepare", params, {}, run)


@_stage_task("teacher")
def teacher(params: dict, data: dict, run: dict) -> dict:
    return run_stage("teacher", params, {"data": data}, run)


@_stage_task("score")
def score(params: dict, data: dict, teacher: dict, run: dict) -> dict:
    return run_stage("score", params, {"data": data, "teacher": teacher}, run)


@_stage_task("prune")
def prune(params: dict, teacher: dict, scores: dict, run: dict) -> dict:
    return run_stage("prune", params, {"teacher": teacher, "scores": scores}, run)


@_stage_task("finetune")
def finetune(params: dict, data: dict, student: dict, teacher: dict, run: dict) -> dict:
    return run_stage("finetune", params, {"data": data, "student": student, "teacher": teacher}, run)


@_stage_task("evaluate")
def evaluate(params: dict, data: dict, teacher: dict, student: dict, run: dict) -> dict:
    return run_stage("evaluate", params, {"data": data, "teacher": teacher, "student": student}, run)
