"""``params.yaml`` as a whole: the run-level groups (tracking, schedule, orchestration, sweep), the ``Params``
model of the whole file and its loader; errors name the file and the key. The stage groups' models are
in :mod:`diffprune.pipeline.stage_params` (each stage's cache key hashes its own)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from diffprune.common.errors import DiffpruneError
from diffprune.pipeline.stage_params import (
    Criterion,
    DataParams,
    EvaluateParams,
    FinetuneParams,
    PruneParams,
    RegisterParams,
    ScoreParams,
    TeacherParams,
    Variant,
    _Strict,
)
from diffprune.pipeline.table import NAMES as STAGE_NAMES
from diffprune.pipeline.table import STAGES
from diffprune.pruning import criteria


class TrackingParams(_Strict):
    """MLflow: where runs, metrics, artifacts and models go (MLFLOW_TRACKING_URI wins)."""

    uri: str = Field("sqlite:///mlflow.db", description="a SQLite file in the project (relative paths: from where "
                                                        "you run)")
    experiment: str = Field("diffprune", min_length=1, description="MLflow experiment name")
    artifact_root: str = Field("mlartifacts", description="artifact store of a newly created experiment: a path, "
                               "or a URL kept as given (s3://…); a path under an http(s) server: the server's own")
    enabled: bool = Field(True, description="track runs in MLflow (registration needs it)")


class ScheduleParams(_Strict):
    """The scheduled deployment of the pipeline flow (diffprune serve)."""

    name: str = Field("diffprune-nightly", min_length=1, description="deployment name")
    cron: str = Field("0 3 * * *", description="five-field cron in `timezone`")
    timezone: str = Field("UTC", description="IANA time zone of the cron")
    params: str = Field("params.yaml", description="the params file every scheduled run reads")
    work_pool: str = Field("diffprune", min_length=1,
                           description="diffprune deploy: the Prefect work pool (a process pool if missing)")
    job_variables: dict[str, Any] = Field(
        default_factory=dict, description="diffprune deploy: both deployments' job variables (docker or kubernetes "
                                          "pools: image, env, …), over the pool's defaults")


class OrchestrationParams(_Strict):
    """How the Prefect flows run stages: store, processes, time limits, retries, task runner."""

    store: str = Field("artifacts/store", description="content-addressed outputs: <store>/<stage>/<cache key>/; a "
                                                      "path, or a URL (s3://bucket/prefix, file:///shared/mount)")
    store_cache: str = Field("artifacts/store-cache", description="a URL store's entries, copied here as stages "
                                                                  "read them (unused for a path store)")
    executor: Literal["subprocess", "inline"] = Field(
        "subprocess", description="subprocess: each stage in its own process, so the time limits hold")
    timeouts_min: dict[str, float] = Field(
        default_factory=lambda: {s.name: s.timeout_min for s in STAGES.values()},
        description="wall-clock limit per stage, minutes (a stage left out keeps its stage-table limit)")
    train_processes: int = Field(
        1, ge=1, description="teacher/finetune on N GPUs: accelerate launch --multi_gpu --num_processes N")
    retries: int = Field(1, ge=0, description="after a crash (killed, out of memory); never after bad input or a "
                                              "time-out")
    retry_delay_s: float = Field(5.0, ge=0.0, description="seconds before a retry")
    task_runner: Literal["local", "dask"] = Field(
        "local", description="local (threads) | dask (a local Dask cluster through prefect-dask)")
    dask_address: str | None = Field(
        None, description="tcp://host:8786: run the sweep's tasks on this existing dask.distributed cluster "
                          "(task_runner: dask)")
    max_workers: int = Field(2, ge=1, description="stages running at once in a sweep (each its own process)")
    branches: Literal["local", "deployment"] = Field(
        "local", description="sweep branches: local (task runner) | deployment (runs on schedule.work_pool's "
                             "workers; a URL store)")

    @field_validator("timeouts_min")
    @classmethod
    def _every_stage_limited(cls, given: dict[str, float]) -> dict[str, float]:
        for stage, minutes in given.items():
            if stage not in STAGES:
                raise ValueError(f"timeouts_min.{stage}: unknown stage (expected one of {', '.join(STAGE_NAMES)})")
            if minutes <= 0:
                raise ValueError(f"timeouts_min.{stage}: must be positive")
        return {s.name: given.get(s.name, s.timeout_min) for s in STAGES.values()}

    @model_validator(mode="before")
    @classmethod
    def _address_means_dask(cls, data: object) -> object:
        """An address names the cluster to run on: it implies the Dask runner, whatever task_runner says (the
        shipped params.yaml spells out ``task_runner: local``, so one ``--set orchestration.dask_address=…``
        is all a user gives; refusing the pair would make them change two keys for one intent)."""
        if isinstance(data, dict) and data.get("dask_address") is not None:
            address = str(data["dask_address"]).strip()
            if not address or any(c.isspace() for c in address):
                raise ValueError(f"dask_address: {data['dask_address']!r} is not a scheduler address "
                                 "(expected e.g. tcp://host:8786)")
            data = {**data, "dask_address": address, "task_runner": "dask"}
        return data


class SweepParams(_Strict):
    """diffprune sweep: criteria × MACs targets × seeds, one comparison table."""

    criteria: tuple[Criterion, ...] = Field(criteria.NAMES, min_length=1, description="criteria compared")
    thresholds: tuple[float, ...] = Field((0.05,), min_length=1, description="diff-pruning thresholds")
    target_macs: tuple[float, ...] = Field((0.6,), min_length=1, description="fractions of the teacher's MACs")
    seeds: tuple[int, ...] = Field(
        (0,), min_length=1, description="per branch: the scoring batch and noise, pruning and fine-tuning seed; "
                                        "branches of one seed are paired")
    variants: tuple[Variant, ...] = Field(("diffusers",), min_length=1,
                                          description="diff-pruning/taylor: score.variant values compared")
    score_batches: tuple[int, ...] = Field(
        (1,), min_length=1, description="diff-pruning/taylor: score.n_batches values (× score.batch_size images)")

    @model_validator(mode="after")
    def _ranges(self) -> SweepParams:
        for thr in self.thresholds:
            if not 0.0 <= thr < 1.0:
                raise ValueError(f"thresholds: {thr} outside [0, 1)")
        for target in self.target_macs:
            if not 0.0 < target <= 1.0:
                raise ValueError(f"target_macs: {target} outside (0, 1]")
        if min(self.score_batches) < 1:
            raise ValueError("score_batches: every value must be >= 1")
        return self


class Params(_Strict):
    """All of params.yaml; stages read only their own group."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True, validate_by_alias=True)

    data: DataParams = DataParams()
    teacher: TeacherParams = TeacherParams()
    score: ScoreParams = ScoreParams()
    prune: PruneParams = PruneParams()
    finetune: FinetuneParams = FinetuneParams()
    evaluate: EvaluateParams = EvaluateParams()
    # "register" would shadow BaseModel.register: the YAML key is "register", the attribute "registration".
    registration: RegisterParams = Field(RegisterParams(), alias="register")
    tracking: TrackingParams = TrackingParams()
    schedule: ScheduleParams = ScheduleParams()
    orchestration: OrchestrationParams = OrchestrationParams()
    sweep: SweepParams = SweepParams()


def group_model(stage: str) -> type[BaseModel]:
    """The params model of a stage's group."""
    return Params.model_fields[STAGES[stage].group].annotation


def _flagged(model: type[BaseModel], flag: str, value: bool) -> frozenset[str]:
    return frozenset(name for name, f in model.model_fields.items()
                     if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get(flag) == value)


def unkeyed_fields(model: type[BaseModel]) -> frozenset[str]:
    """Fields that say where things are kept, not what is computed: left out of cache keys."""
    return _flagged(model, "cache_key", False)


def resumable_fields(model: type[BaseModel]) -> frozenset[str]:
    """Fields that may change between a training run and its resumption (run length, bookkeeping)."""
    return _flagged(model, "resumable", True)


def load_params(path: str | Path | None = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read a params file, apply ``key.sub=value`` overrides, validate. Keys the file leaves out take
    the code defaults (which equal the shipped ``params.yaml``); a missing file is an error, never a silent
    switch of recipe. ``path=None`` asks for the code defaults explicitly (library callers, tests)."""
    raw: dict = {}
    source = str(path) if path else "<defaults>"
    if path is not None and not Path(path).is_file():
        hint = " (run from the project folder, or pass --params)" if str(path) == "params.yaml" else ""
        raise DiffpruneError(f"{source}: no such params file{hint}")
    if path is not None:
        try:
            raw = _load_yaml(Path(path).read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise DiffpruneError(f"{source}: not valid YAML ({first})") from None
        except OSError as exc:
            raise DiffpruneError(f"{source}: cannot read ({exc.strerror})") from None
        if not isinstance(raw, dict):
            raise DiffpruneError(f"{source}: expected a mapping of groups at the top level")
    return params_from(raw, overrides, source)


def params_from(content: dict, overrides: list[str] | tuple[str, ...] = (), source: str = "params") -> Params:
    """Params given by content (a params file's, or a deployment's parameters), ``key.sub=value`` overrides on
    top, validated; an error is one line naming ``source`` and the key. ``content`` is left unchanged."""
    raw = copy.deepcopy(content)
    for item in overrides:
        _apply_override(raw, item)
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise DiffpruneError(f"{source}: {_describe(exc)}") from None


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans (only true/false), as DVC reads params.yaml: YAML 1.1 turns
    ``mixed_precision: no`` into False. Bool fields still accept yes/no/on/off (pydantic coerces)."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def _load_yaml(text: str):
    return yaml.load(text, Loader=_Yaml12Loader)  # a SafeLoader subclass: plain data only


def _apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise DiffpruneError(f"--set {item!r}: expected key.sub=value")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise DiffpruneError(f"--set {item!r}: {part} is not a group")
    try:
        node[parts[-1]] = _load_yaml(value)
    except yaml.YAMLError:
        raise DiffpruneError(f"--set {item!r}: value is not valid YAML") from None


def _describe(exc: ValidationError) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    got = err.get("input")
    shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    more = f"; and {len(exc.errors()) - 1} more" if len(exc.errors()) > 1 else ""
    return f"{key}: {msg}{shown}{more}"
