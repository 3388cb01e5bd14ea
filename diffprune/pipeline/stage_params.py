"""The params models of the stage groups of ``params.yaml``: one pydantic model per stage (and the models
they nest). A stage's cache key hashes the source of its own models; the run-level groups and the loader
are in :mod:`diffprune.pipeline.config`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from diffprune.pruning import criteria

Criterion = Literal[criteria.NAMES]
Variant = Literal[criteria.VARIANTS]
# The samplers by name and the default number of sampling steps, defined once here, in the schema every room
# reads: evaluate's params, sampling, the registered model's requests and load_pipeline all refer to these.
DDIM, DDPM = "ddim", "ddpm"
SAMPLERS = (DDIM, DDPM)  # DDIM: deterministic at eta 0, strided; DDPM: ancestral, fresh noise every step
DEFAULT_SAMPLER = DDIM
DEFAULT_STEPS = 50  # evaluate.steps and register.predict_steps
Sampler = Literal[SAMPLERS]
# Flags declared on fields (``json_schema_extra``): read by the cache key and the training resume check.
NOT_KEYED = {"cache_key": False}  # where things are kept, not what is computed: not part of a cache key
RESUMABLE = {"resumable": True}  # run length: may change between a run and its resumption
# Where a stage computes: auto (this process's GPU when there is one: cuda:LOCAL_RANK under accelerate), cpu,
# cuda (the current GPU) or cuda:N.
Device = Annotated[str, StringConstraints(pattern=r"^(auto|cpu|cuda(:\d+)?)$"),
                   Field(description="auto (this process's GPU, else the CPU) | cpu | cuda | cuda:N")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(_Strict):
    """Which images to prepare and how (stage prepare)."""

    dataset: Literal["digits", "imagefolder", "cifar10"] = Field(
        "digits", description="digits (built in, offline) | imagefolder | cifar10")
    path: str | None = Field(None, description="imagefolder root; cifar10 download/cache folder")
    resolution: int = Field(16, ge=8, le=1024, description="image side in pixels")
    channels: Literal[1, 3] | None = Field(None, description="1 for digits, 3 otherwise")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="held-out share: the FID real-data floor")
    max_images: int | None = Field(None, ge=2, description="cap on images taken from the source")
    download: bool = Field(True, description="cifar10: download when no local copy exists")
    captions: str | None = Field(
        None, description="text models: a captions.jsonl of {file, text} per image (imagefolder, relative to path)")
    caption_template: str | None = Field(
        None, description="text models: or a caption per class folder, e.g. 'a handwritten digit {label}'")
    seed: int = Field(0, description="the train/held-out split")

    @model_validator(mode="after")
    def _path_needed(self) -> DataParams:
        if self.dataset == "imagefolder" and not self.path:
            raise ValueError("data.path is required when data.dataset is 'imagefolder'")
        if self.captions and self.caption_template:
            raise ValueError("set at most one of data.captions and data.caption_template")
        if self.captions and self.dataset != "imagefolder":
            raise ValueError("data.captions needs data.dataset 'imagefolder' (other datasets: caption_template)")
        if self.caption_template is not None and "{label}" not in self.caption_template:
            raise ValueError("data.caption_template must contain {label}")
        return self

    @property
    def n_channels(self) -> int:
        return self.channels or (1 if self.dataset == "digits" else 3)


class TrainParams(_Strict):
    """The one training loop (teacher training from scratch; fine-tuning extends it)."""

    steps: int = Field(4000, ge=1, json_schema_extra=RESUMABLE, description="raise it to continue a finished run")
    batch_size: int = Field(64, ge=1, description="per process")
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="constant after the warm-up")
    optimizer: Literal["adam", "adamw"] = Field("adamw", description="adam | adamw")
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up")
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0, description="the EMA weights are the exported model")
    ema_warmup: bool = Field(True, description="decay min(ema_decay, (1+s)/(10+s)): useful for short runs")
    grad_clip: float | None = Field(1.0, gt=0.0, description="max gradient norm (null: no clipping)")
    antithetic: bool = Field(True, description="pair t with T-1-t in each batch, as the paper's code")
    flip: bool = Field(False, description="random horizontal flips (not for digits)")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="no | fp16 | bf16 (CUDA)")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass: less memory, more time (SD-sized models)")
    ema_on_cpu: bool = Field(False, description="keep the EMA copy in CPU memory: one model's worth less on the GPU")
    device: Device = "auto"
    checkpoint_every: int = Field(250, ge=1, json_schema_extra=RESUMABLE, description="steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1, json_schema_extra=RESUMABLE, description="the newest ones are kept")
    log_every: int = Field(10, ge=1, json_schema_extra=RESUMABLE, description="steps between progress updates")
    seed: int = Field(0, description="initial weights, batches, timesteps and noise")


class FinetuneParams(TrainParams):
    """Fine-tuning a student, optionally distilled from the teacher (stage finetune)."""

    steps: int = Field(800, ge=1, json_schema_extra=RESUMABLE, description="20 % of the teacher's 4000")
    ema_decay: float = Field(0.995, ge=0.0, lt=1.0, description="the EMA weights are the exported model")
    checkpoint_every: int = Field(100, ge=1, json_schema_extra=RESUMABLE, description="steps between checkpoints")
    distill: bool = Field(True, description="target = w * teacher's epsilon + (1 - w) * true noise")
    distill_weight: float = Field(0.7, ge=0.0, le=1.0, description="w: the share of the teacher's target")
    teacher_precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="the distillation teacher's weights: bf16 halves its memory (fp16: CUDA only)")
    condition_dropout: float = Field(
        0.1, ge=0.0, lt=1.0, description="conditional models: share of null conditions (classifier-free guidance)")
    train_label_embedding: bool = Field(
        False, description="class-conditional models: fine-tune the label embedding with the denoiser, as cin256-v2 "
                          "trains its class embedder (text encoders always stay frozen)")


class ArchParams(_Strict):
    """A from-scratch UNet2DModel: every width must split into norm_num_groups groups."""

    block_out_channels: tuple[int, ...] = Field((32, 64, 64), description="width of each resolution level")
    layers_per_block: int = Field(1, ge=1)
    attention_levels: tuple[int, ...] = Field(
        (1,), description="levels with an attention block (level 1 at 16px input: 8x8, like the paper's CIFAR model)")
    norm_num_groups: int = Field(8, ge=1, description="8 groups let 32-channel blocks be pruned too")
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
    """Where the model to prune comes from (stage teacher)."""

    source: Literal["builtin", "pretrained", "scratch"] = Field(
        "builtin", description="builtin (shipped, see builtin) | pretrained | scratch")
    builtin: Literal["teacher-digits16", "latent-digits32"] = Field(
        "teacher-digits16", description="teacher-digits16 (pixel; trained by source=scratch) | latent-digits32 "
                                        "(latent, class-conditional; python -m diffprune.training.latent_teacher)")
    pretrained: str | None = Field(
        None, description="hub id (google/ddpm-cifar10-32) or a local save_pretrained folder")
    revision: str | None = Field(
        None, description="hub teacher: a branch, tag or commit to pin (null: main); keys carry its commit")
    num_train_timesteps: int = Field(1000, ge=2, description="T of the DDPM schedule (source=scratch)")
    architecture: ArchParams = Field(ArchParams(), description="used by source=scratch")
    train: TrainParams = Field(TrainParams(), description="used by source=scratch")

    @model_validator(mode="after")
    def _pretrained_needed(self) -> TeacherParams:
        if self.source == "pretrained" and not self.pretrained:
            raise ValueError("teacher.pretrained is required when teacher.source is 'pretrained'")
        return self


class ScoreParams(_Strict):
    """Importance scoring (stage score): the gradient pass of Diff-Pruning / Taylor."""

    criterion: Criterion = Field("diff-pruning", description=" | ".join(criteria.NAMES))
    thr: float = Field(0.05, ge=0.0, lt=1.0,
                       description="diff-pruning: stop after the first t with loss < thr * max loss (0: all T steps)")
    variant: Variant = Field(
        "diffusers", description="diff-pruning/taylor: diffusers = the official diffusers path (Σ|w·∇w|, the "
                                 "sub-threshold step included); paper = the code behind the paper's tables "
                                 "(Σ(w·∇w)² + |γ·∇γ|, summed-error loss, that step excluded)")
    batch_size: int = Field(32, ge=1, description="the fixed batch x0 (the paper: 128 on CIFAR-10); 32 keeps "
                                                  "scoring ~2 min on 2 CPU cores")
    n_batches: int = Field(1, ge=1, description="batches averaged per timestep")
    timestep_batch: int = Field(
        8, ge=1, description="timesteps per forward/backward (k × batch_size inputs); the same visited steps and "
                             "gradients as one at a time, up to float rounding; lower it if memory is short")
    include_null: bool = Field(
        False, description="conditional models: also score each batch under the null condition (models trained "
                           "with condition dropout for guidance)")
    seed: int = Field(0, description="which images form x0, and their noise")
    device: Device = "auto"


class PruneParams(_Strict):
    """Structural pruning (stage prune): set pruning_ratio or target_macs."""

    pruning_ratio: float | None = Field(
        0.25, ge=0.0, lt=1.0, description="per group, the paper's semantics (GroupNorm groups shrink alike)")
    target_macs: float | None = Field(
        None, gt=0.0, le=1.0, description="or: keep this fraction of the teacher's MACs (set pruning_ratio to null)")
    reinit: bool = Field(False, description="re-initialise weights after pruning (the scratch-training baseline)")
    round_to: int | None = Field(
        None, ge=1, description="keep every pruned width a multiple of this (the official LDM path: 2; GPUs like 8)")
    seed: int = Field(0, description="the random criteria and re-initialisation")
    device: Device = "auto"  # tracing, the MACs search and the pruning itself

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
    feature_dim: int = Field(64, ge=8, description="width of the features FID compares")
    seed: int = 0


class FastPathParams(_Strict):
    """How images are generated: evaluate (teacher and student alike), the registered model, load_pipeline."""

    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="denoiser autocast; auto: bf16 on CUDA (fp16 without bf16), fp32 on CPU")
    channels_last: Literal["auto"] | bool = Field("auto", description="auto: on CUDA only (no gain measured on CPU)")
    compile: bool = Field(False, description="torch.compile the denoiser (slow first call; long runs only)")


class EvaluateParams(_Strict):
    """Sampling, FID, SSIM and efficiency of teacher vs student (stage evaluate)."""

    sampler: Sampler = Field(DEFAULT_SAMPLER, description=" | ".join(SAMPLERS) + " (see eta)")
    steps: int = Field(DEFAULT_STEPS, ge=1, le=10000,
                       description=f"the paper uses 100; {DEFAULT_STEPS} halves the CPU time of the default run")
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM's eta")
    guidance_scale: float = Field(
        1.0, ge=0.0, description="conditional models: classifier-free guidance scale (1: none; the paper's LDM: 3)")
    clip_model: str | None = Field(
        None, description="text models: a CLIP model (hub id or folder) for the CLIP score; absent: not reported")
    seeds: tuple[int, ...] = Field((0, 1, 2), min_length=1, description="one sample set per seed; mean and spread")
    n_samples: int | None = Field(
        None, ge=2, description="images per seed; null = the held-out count, so the floor uses equal counts")
    batch_size: int = Field(256, ge=1, description="images sampled at once")
    fast: FastPathParams = Field(FastPathParams(),
                                 description="the fast sampling path (the registered model uses it too)")
    fid_extractor: Literal["auto", "inception", "classifier"] = Field(
        "auto", description="auto: Inception if its weight file exists, else a classifier trained on the labels")
    inception_path: str = Field("/tmp/inception-2015-12-05.pt", description="clean-fid's weight file",
                                json_schema_extra=NOT_KEYED)
    extractor: ExtractorParams = Field(ExtractorParams(), description="the classifier extractor")
    cache_dir: str = Field("artifacts/fid", description="extractors, reference statistics, sample sets",
                           json_schema_extra=NOT_KEYED)
    latency_batch: int = Field(64, ge=1, description="batch of the latency measurement")
    latency_steps: int = Field(10, ge=1, description="denoising calls timed per repeat")
    latency_repeats: int = Field(3, ge=1, description="the median of these repeats is reported")
    grid_images: int = Field(64, ge=1, description="images in each sample grid")
    device: Device = "auto"


class RegisterParams(_Strict):
    """Model registration and the promotion gate (stage register)."""

    enabled: bool = Field(True, description="register the fine-tuned model in the MLflow registry")
    model_name: str = Field("diffprune-digits", min_length=1, description="registered model name")
    max_fid_ratio: float = Field(1.3, gt=0.0, description="gate: pruned FID <= this × the teacher's (same evaluation)")
    max_macs_ratio: float = Field(0.6, gt=0.0, le=1.0, description="gate: pruned MACs <= this × the teacher's")
    champion_margin: float = Field(
        0.05, ge=0.0, description="gate: FID ratio <= (1 + this) × the current champion's")
    predict_steps: int = Field(
        DEFAULT_STEPS, ge=1, description="the registered model's default DDIM steps in predict()")


