"""Pydantic models mirroring the groups of ``params.yaml``; errors name the file and the key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from diffprune import criteria
from diffprune.errors import DiffpruneError
from diffprune.stage_table import NAMES as STAGE_NAMES
from diffprune.stage_table import STAGES

Criterion = Literal[criteria.NAMES]
# Flags declared on fields (``json_schema_extra``): read by the cache key and the training resume check.
NOT_KEYED = {"cache_key": False}  # where things are kept, not what is computed: not part of a cache key
RESUMABLE = {"resumable": True}  # run length: may change between a run and its resumption


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(_Strict):
    """Which images to prepare and how (stage ``prepare``)."""

    dataset: Literal["digits", "imagefolder", "cifar10"] = "digits"
    path: str | None = Field(None, description="imagefolder root, or where cifar10 lives / is downloaded")
    resolution: int = Field(16, ge=8, le=1024)
    channels: Literal[1, 3] | None = Field(None, description="default: 1 for digits, 3 otherwise")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="held-out share (digits, imagefolder)")
    max_images: int | None = Field(None, ge=2, description="cap on images taken from the source")
    download: bool = Field(True, description="cifar10: download when no local copy exists")
    seed: int = 0

    @model_validator(mode="after")
    def _path_needed(self) -> DataParams:
        if self.dataset == "imagefolder" and not self.path:
            raise ValueError("data.path is required when data.dataset is 'imagefolder'")
        return self

    @property
    def n_channels(self) -> int:
        return self.channels or (1 if self.dataset == "digits" else 3)


class TrainParams(_Strict):
    """The one training loop: teacher training and fine-tuning of pruned models."""

    steps: int = Field(1000, ge=1, json_schema_extra=RESUMABLE)
    batch_size: int = Field(64, ge=1, description="per process")
    lr: float = Field(2e-4, gt=0.0, le=1.0)
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(0, ge=0)
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    ema_warmup: bool = Field(True, description="decay min(ema_decay, (1+s)/(10+s)): useful for short runs")
    grad_clip: float | None = Field(1.0, gt=0.0)
    antithetic: bool = Field(True, description="pair t with T-1-t in each batch, as the paper's code")
    flip: bool = Field(False, description="random horizontal flips (not for digits)")
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available")
    checkpoint_every: int = Field(250, ge=1, json_schema_extra=RESUMABLE)
    keep_checkpoints: int = Field(2, ge=1, json_schema_extra=RESUMABLE)
    log_every: int = Field(10, ge=1, json_schema_extra=RESUMABLE)
    seed: int = 0


class FinetuneParams(TrainParams):
    """Fine-tuning a student, optionally distilled from the teacher (stage ``finetune``)."""

    distill: bool = True
    distill_weight: float = Field(0.7, ge=0.0, le=1.0, description="share of the teacher target")


class ArchParams(_Strict):
    """A from-scratch ``UNet2DModel``: every width must split into ``norm_num_groups`` groups."""

    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = Field(1, ge=1)
    attention_levels: tuple[int, ...] = (1,)
    norm_num_groups: int = Field(8, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _consistent(self) -> ArchParams:
        if not self.block_out_channels:
            raise ValueError("block_out_channels must list at least one width")
        for width in self.block_out_channels:
            if width % self.norm_num_groups:
                raise ValueError(f"width {width} is not divisible by norm_num_groups {self.norm_num_groups}")
        for level in self.attention_levels:
            if not 0 <= level < len(self.block_out_channels):
                raise ValueError(f"attention level {level} outside 0..{len(self.block_out_channels) - 1}")
        return self


class TeacherParams(_Strict):
    """Where the model to prune comes from (stage ``teacher``)."""

    source: Literal["builtin", "pretrained", "scratch"] = "builtin"
    pretrained: str | None = Field(None, description="hub id (google/ddpm-cifar10-32) or local directory")
    architecture: ArchParams = ArchParams()
    num_train_timesteps: int = Field(1000, ge=2)
    train: TrainParams = TrainParams(steps=4000, batch_size=64, lr=1e-3, ema_decay=0.999)

    @model_validator(mode="after")
    def _pretrained_needed(self) -> TeacherParams:
        if self.source == "pretrained" and not self.pretrained:
            raise ValueError("teacher.pretrained is required when teacher.source is 'pretrained'")
        return self


class ScoreParams(_Strict):
    """Importance scoring (stage ``score``): the gradient pass of Diff-Pruning / Taylor."""

    criterion: Criterion = "diff-pruning"
    thr: float = Field(0.05, ge=0.0, lt=1.0, description="diff-pruning: stop once loss < thr × max loss")
    batch_size: int = Field(64, ge=1, description="images in the fixed batch x0")
    n_batches: int = Field(1, ge=1, description="batches averaged per timestep")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"


class PruneParams(_Strict):
    """Structural pruning (stage ``prune``): set ``pruning_ratio`` or ``target_macs``."""

    pruning_ratio: float | None = Field(0.25, ge=0.0, lt=1.0, description="per group, the paper's semantics")
    target_macs: float | None = Field(None, gt=0.0, le=1.0, description="fraction of the teacher's MACs to keep")
    reinit: bool = Field(False, description="re-initialise the pruned weights (scratch-training baseline)")
    seed: int = 0

    @model_validator(mode="after")
    def _one_target(self) -> PruneParams:
        if (self.pruning_ratio is None) == (self.target_macs is None):
            raise ValueError("set exactly one of prune.pruning_ratio and prune.target_macs (the other to null)")
        return self


class ExtractorParams(_Strict):
    """The fallback FID feature network: a small classifier trained on the dataset's labels."""

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0.0)
    feature_dim: int = Field(64, ge=8)
    seed: int = 0


class EvaluateParams(_Strict):
    """Sampling, FID, SSIM and efficiency of teacher vs student (stage ``evaluate``)."""

    sampler: Literal["ddim", "ddpm"] = "ddim"
    steps: int = Field(100, ge=1, le=10000)
    eta: float = Field(0.0, ge=0.0, le=1.0)
    seeds: tuple[int, ...] = Field((0, 1, 2), min_length=1)
    n_samples: int | None = Field(None, ge=2, description="images per seed; default the held-out count")
    batch_size: int = Field(256, ge=1)
    fid_extractor: Literal["auto", "inception", "classifier"] = "auto"
    inception_path: str = Field("/tmp/inception-2015-12-05.pt", description="clean-fid's weight file",
                                json_schema_extra=NOT_KEYED)
    extractor: ExtractorParams = ExtractorParams()
    cache_dir: str = Field("artifacts/fid", description="extractors and reference statistics",
                           json_schema_extra=NOT_KEYED)
    latency_batch: int = Field(64, ge=1)
    latency_steps: int = Field(10, ge=1)
    latency_repeats: int = Field(3, ge=1)
    grid_images: int = Field(64, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class RegisterParams(_Strict):
    """Model registration and the promotion gate (stage ``register``)."""

    enabled: bool = True
    model_name: str = Field("diffprune-digits", min_length=1)
    max_fid_ratio: float = Field(1.3, gt=0.0, description="gate: pruned FID ≤ this × the teacher's FID")
    max_macs_ratio: float = Field(0.6, gt=0.0, le=1.0, description="gate: pruned MACs ≤ this × the teacher's")
    champion_margin: float = Field(0.05, ge=0.0, description="gate: FID ratio at most (1 + this) × the champion's")
    predict_steps: int = Field(50, ge=1, description="default sampler steps of the registered model's predict")


class TrackingParams(_Strict):
    """MLflow: where runs, metrics, artifacts and registered models go (``MLFLOW_TRACKING_URI`` wins)."""

    uri: str = Field("sqlite:///mlflow.db", description="relative sqlite paths are taken from the project root")
    experiment: str = Field("diffprune", min_length=1)
    artifact_root: str = Field("mlartifacts", description="artifact store of a newly created experiment")
    enabled: bool = True


class ScheduleParams(_Strict):
    """The scheduled deployment of the pipeline flow (``diffprune serve``)."""

    name: str = Field("diffprune-nightly", min_length=1)
    cron: str = Field("0 3 * * *", description="five-field cron in `timezone`")
    timezone: str = "UTC"
    params: str = Field("params.yaml", description="params file each scheduled run reads")


class OrchestrationParams(_Strict):
    """How the Prefect flows run stages: cache store, process isolation, timeouts, retries, task runner."""

    store: str = Field("artifacts/store", description="content-addressed stage outputs (one folder per cache key)")
    executor: Literal["subprocess", "inline"] = Field(
        "subprocess", description="subprocess: each stage in its own process, so its timeout is enforced")
    timeouts_min: dict[str, float] = Field(
        default_factory=lambda: {s.name: s.timeout_min for s in STAGES.values()},
        description="wall-clock limit per stage, minutes (a stage left out keeps its stage-table limit)")
    train_processes: int = Field(1, ge=1, description="teacher/finetune: >1 launches `accelerate launch --multi_gpu`")
    retries: int = Field(1, ge=0, description="re-runs after a transient failure (never after bad input)")
    retry_delay_s: float = Field(5.0, ge=0.0)
    task_runner: Literal["local", "dask"] = "local"
    max_workers: int = Field(2, ge=1, description="stages run at once (local: per flow process; dask: workers)")

    @field_validator("timeouts_min")
    @classmethod
    def _every_stage_limited(cls, given: dict[str, float]) -> dict[str, float]:
        for stage, minutes in given.items():
            if stage not in STAGES:
                raise ValueError(f"timeouts_min.{stage}: unknown stage (expected one of {', '.join(STAGE_NAMES)})")
            if minutes <= 0:
                raise ValueError(f"timeouts_min.{stage}: must be positive")
        return {s.name: given.get(s.name, s.timeout_min) for s in STAGES.values()}


class SweepParams(_Strict):
    """The sweep flow: criteria × MACs targets × seeds, sharing the prepared data and the teacher."""

    criteria: tuple[Criterion, ...] = Field(criteria.NAMES, min_length=1)
    thresholds: tuple[float, ...] = Field((0.05,), min_length=1, description="diff-pruning thresholds to try")
    target_macs: tuple[float, ...] = Field((0.6,), min_length=1, description="fractions of the teacher's MACs")
    seeds: tuple[int, ...] = Field((0,), min_length=1, description="pruning + fine-tuning seeds per branch")

    @model_validator(mode="after")
    def _ranges(self) -> SweepParams:
        for thr in self.thresholds:
            if not 0.0 <= thr < 1.0:
                raise ValueError(f"thresholds: {thr} outside [0, 1)")
        for target in self.target_macs:
            if not 0.0 < target <= 1.0:
                raise ValueError(f"target_macs: {target} outside (0, 1]")
        return self


class Params(_Strict):
    """All of ``params.yaml``; stages read only their own group."""

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
    """Read ``params.yaml`` (missing file: defaults), apply ``key.sub=value`` overrides, validate."""
    raw: dict = {}
    source = str(path) if path else "<defaults>"
    if path is not None and Path(path).exists():
        try:
            raw = _load_yaml(Path(path).read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise DiffpruneError(f"{source}: not valid YAML ({first})") from None
        except OSError as exc:
            raise DiffpruneError(f"{source}: cannot read ({exc.strerror})") from None
        if not isinstance(raw, dict):
            raise DiffpruneError(f"{source}: expected a mapping of groups at the top level")
    elif path is not None and str(path) != "params.yaml":
        raise DiffpruneError(f"{source}: no such params file")
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
