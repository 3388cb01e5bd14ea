"""One Prefect task per library stage of the stage table, each running the same stage function as
``diffprune <stage>``.

Cache keys come from the stage's own params (less the fields its schema marks as not keyed), the
content digests of its inputs and its code version (:mod:`diffprune.pipeline.fingerprint`) — never from the run
id or a path. A task returns a small reference ``{"stage", "key"}`` into the content-addressed store
(:mod:`diffprune.tasks.store`), persisted as JSON. A cached reference whose store entry is missing or
damaged is not trusted: the key policy turns that lookup into a miss, and the stage is recomputed.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import CachePolicy

from diffprune.pipeline.config import Params, group_model, unkeyed_fields
from diffprune.pipeline.fingerprint import code_version
from diffprune.pipeline.fingerprint import stage_key as hash_key
from diffprune.pipeline.table import LIBRARY, STAGES, Stage
from diffprune.tasks import store
from diffprune.tasks.execute import StageInputError, StageTimeout, run_cli


def stage_code(stage: str) -> str:
    """The code version of any stage of the table, library or orchestration."""
    return code_version(stage) if STAGES[stage].library else code_version(stage, STAGES[stage].code)


def cache_key(root: store.Root, stage: str, params: dict, refs: dict[str, dict], extra: dict | None = None) -> str:
    inputs = {name: store.manifest_of(root, ref)["output_digest"] for name, ref in refs.items()}
    external = STAGES[stage].external  # inputs from outside the store, by content
    inputs.update(external(params) if external else {})
    unkeyed = unkeyed_fields(group_model(stage))
    keyed = {k: v for k, v in params.items() if k not in unkeyed}
    return hash_key(stage, {**keyed, **(extra or {})}, inputs, stage_code(stage))


@dataclass(frozen=True)
class RunSettings:
    """How the stage tasks of one flow run execute: where the store is, how stages are run and bounded.
    Passed to every stage task; never part of a cache key."""

    store: store.Store  # the content-addressed store: its root (absolute path, or URL) and this host's cache
    executor: str  # "subprocess" (time limits enforced) or "inline"
    timeouts_min: dict[str, float]  # wall-clock limit per stage
    train_processes: int = 1  # training stages on N GPUs (accelerate launch)
    max_workers: int | None = None  # stages running at once (a sweep)

    @classmethod
    def of(cls, params: Params) -> RunSettings:
        o = params.orchestration
        root = o.store if store.is_url(o.store) else str(Path(o.store).resolve())
        return cls(store.Store(root, str(Path(o.store_cache).resolve())), o.executor, dict(o.timeouts_min),
                   o.train_processes, o.max_workers)

    def checkpoints(self, stage: str) -> Path:
        """A training stage's checkpoints: in the store, shared by every run of the stage (training
        fingerprints its own checkpoint folders, so a different run never resumes from them). A URL store's
        are written in this host's cache folder and mirrored to the store (:meth:`shared_checkpoints`)."""
        base = self.store.cache if store.is_url(self.store.root) else self.store.root
        return Path(base) / "_checkpoints" / stage

    def shared_checkpoints(self, stage: str) -> contextlib.AbstractContextManager[None]:
        """While a training stage runs: its checkpoints mirrored to a URL store (another host resumes from them)."""
        if not store.is_url(self.store.root):
            return contextlib.nullcontext()
        from diffprune.tasks.checkpoints import shared

        return shared(self.store.root, stage, self.checkpoints(stage))


@dataclass
class StageCachePolicy(CachePolicy):
    """Key = :func:`cache_key`; a key whose store entry is gone or damaged is made to miss."""

    stage: str = ""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str:
        root = inputs["run"].store
        key = cache_key(root, self.stage, inputs["params"], inputs.get("inputs") or {}, inputs.get("extra"))
        if store.lookup(root, self.stage, key) is None and task_ctx.result_store.exists(key):
            get_run_logger().warning(
                "%s: the cached result's outputs in %s are missing or damaged; recomputing",
                self.stage, store.entry(root, self.stage, key))
            return f"{key}-rebuild-{uuid.uuid4().hex[:8]}"
        return key


def _transient(task, task_run, state) -> bool:
    """Retry crashes (killed, out of memory, I/O); never bad input or a time-out."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, StageInputError | StageTimeout)


def stage_argv(stage: Stage, params_file: Path, scratch: Path, inputs: dict[str, Path],
               run: RunSettings) -> list[str]:
    """The stage's command line under the table's contract, its outputs in ``scratch``."""
    argv = [stage.name, "--params", str(params_file), "--out", str(scratch / "output"),
            "--metrics", str(scratch / "metrics")]
    for name, path in inputs.items():
        argv += [f"--{name}", str(path)]
    if stage.trains:
        argv += ["--checkpoints", str(run.checkpoints(stage.name))]
    return argv


def run_stage(stage: str, params: dict, refs: dict[str, dict], run: RunSettings) -> dict:
    """Compute (or find) the stage's store entry for these params and inputs; return its reference."""
    entry = STAGES[stage]
    key = cache_key(run.store, stage, params, refs)
    inputs = {name: store.folder(run.store, ref) / "output" for name, ref in refs.items()}

    def build(scratch: Path) -> dict:
        params_file = scratch / "params.yaml"
        params_file.write_text(yaml.safe_dump({entry.params_key: params}, sort_keys=False))
        processes = run.train_processes if entry.trains else 1
        with run.shared_checkpoints(stage) if entry.trains else contextlib.nullcontext():
            run_cli(stage_argv(entry, params_file, scratch, inputs, run), run.executor,
                    run.timeouts_min[stage] * 60, processes, run.max_workers)
        return stage_summary(stage, scratch / "metrics")

    record = {"params": params, "inputs": {n: r["key"] for n, r in refs.items()}, "code": stage_code(stage)}
    _, built = store.publish(run.store, stage, key, build, record)
    get_run_logger().info("%s %s (key %s)", stage, "computed" if built else "found complete in the store", key)
    return store.reference(stage, key)


def stage_summary(stage: str, metrics_dir: Path) -> dict:
    """What the stage reported: ``<metrics>/<stage>.json``."""
    return json.loads((Path(metrics_dir) / STAGES[stage].metrics_file).read_text())


def _stage_task(stage: Stage):
    def run_task(params: dict, inputs: dict[str, dict], run: RunSettings) -> dict:
        return run_stage(stage.name, params, inputs, run)

    run_task.__name__ = run_task.__qualname__ = f"stage_{stage.name}"
    return task(name=stage.name, cache_policy=StageCachePolicy(stage=stage.name), persist_result=True,
                result_serializer="json", retry_condition_fn=_transient, log_prints=True)(run_task)


# stage name → its task, called as ``TASKS[name](params=…, inputs={input name: reference}, run=…)``
TASKS = {stage.name: _stage_task(stage) for stage in LIBRARY}
