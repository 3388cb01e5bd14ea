"""The pipeline's stages, one entry each: the single description every front end derives from.

The stage CLI (``diffprune <stage>``), the Prefect tasks and flows, the generated ``dvc.yaml``, MLflow
tracking, the report and the tests all read this table. Every library stage keeps one contract:
``stages.<name>(params, *, out, metrics, <inputs…>[, checkpoints])`` reads its params group and the
outputs of its upstream stages, writes ``out`` atomically and ``<metrics>/<name>.json`` (its summary).
Adding a stage = one entry here + its function in ``stages.py`` + its params model in ``stage_params.py``.
Every fact about a stage lives in its entry: its inputs (from upstream stages, and from outside the store),
whether the report's headline reads it, what a sweep varies in it, what tracking shows of it.
This module is plain data: it imports nothing heavy, so parsers and schedulers can read it cheaply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from diffprune.pipeline import external

METRICS = "metrics"  # the folder every stage writes its summary into (``<name>.json``)


@dataclass(frozen=True)
class Curve:
    """A CSV a stage writes that is worth a plot (MLflow image + metric history, ``dvc plots``)."""

    folder: Literal["out", "metrics"]  # the stage's output folder or the metrics folder
    file: str
    x: str
    y: str
    title: str
    kind: Literal["line", "bars", "scatter"] = "line"
    metric: str | None = None  # a line curve's MLflow metric name (default: ``y``)
    dvc: bool = True  # also a top-level plot of dvc.yaml (the file must exist after every run)

    def path(self, out: str | Path | None, metrics: str | Path) -> Path | None:
        """Where the CSV lies, given the stage's output and metrics folders (``None``: no output folder)."""
        folder = out if self.folder == "out" else metrics
        return None if folder is None else Path(folder, self.file)


@dataclass(frozen=True)
class Bars:
    """A per-layer mapping in a stage's summary worth a bar chart in its tracked run."""

    key: str  # the summary's key holding ``{layer: value}``
    x: str
    title: str


@dataclass(frozen=True)
class Stage:
    name: str
    group: str  # the attribute of ``config.Params`` holding its params
    help: str
    out: str | None  # default output folder (what later stages read)
    timeout_min: float  # default wall-clock limit under the flows (orchestration.timeouts_min overrides)
    inputs: tuple[tuple[str, str], ...] = ()  # (option/keyword name, upstream stage)
    checkpoints: str | None = None  # training stages: checkpoints kept between runs, so they resume
    key: str | None = None  # its key in params.yaml when it differs from ``group``
    library: bool = True  # False: run by the orchestration layer (it talks to MLflow)
    curves: tuple[Curve, ...] = ()
    images: tuple[str, ...] = ()  # images in ``out`` shown with the run (sample grids)
    out_aliases: tuple[str, ...] = ()  # older spellings of ``--out`` that the CLI still accepts
    extra_deps: tuple[str, ...] = ()  # files outside the pipeline that the stage reads (DVC deps)
    extra_params: tuple[str, ...] = ()  # other params groups the stage reads (DVC params)
    extra_metrics: tuple[str, ...] = ()  # files besides ``<name>.json`` written to the metrics folder
    external: Callable[[dict], dict[str, str]] | None = None  # digests of inputs from outside the store
    headline: bool = False  # the report's headline numbers read its summary
    swept: tuple[str, ...] = ()  # the params a sweep branch sets (same names in the branch); others are shared
    bars: tuple[Bars, ...] = ()  # summary mappings drawn as bar charts in its tracked run
    code: tuple[str, ...] = ()  # orchestration-layer stages: the modules their code version covers

    @property
    def params_key(self) -> str:
        return self.key or self.group

    @property
    def trains(self) -> bool:
        return self.checkpoints is not None

    @property
    def metrics_file(self) -> str:
        return f"{self.name}.json"

    def input_stage(self, name: str) -> str:
        return dict(self.inputs)[name]


TABLE: tuple[Stage, ...] = (
    Stage("prepare", "data", "prepare the dataset (digits, imagefolder, cifar10)", "data/prepared", 30,
          external=external.image_folder),
    Stage("teacher", "teacher", "provide the teacher: built-in, pretrained (hub/local) or trained from scratch",
          "models/teacher", 720, inputs=(("data", "prepare"),), checkpoints="checkpoints/teacher",
          curves=(Curve("metrics", "teacher_loss.csv", "step", "loss", "teacher training loss", dvc=False),),
          extra_deps=("diffprune/assets",), external=external.teacher_source, headline=True),
    Stage("score", "score", "importance scoring: the gradient pass of diff-pruning / taylor", "scores", 120,
          inputs=(("data", "prepare"), ("teacher", "teacher")),
          curves=(Curve("out", "loss_over_t.csv", "t", "loss", "loss over t (importance scoring)",
                        metric="loss_over_t"),
                  Curve("out", "importance.csv", "importance", "layer", "importance per layer", kind="bars")),
          headline=True, swept=("criterion", "thr", "variant", "n_batches", "seed")),
    Stage("prune", "prune", "structural pruning at a ratio (paper semantics) or a MACs target", "models/pruned",
          30, inputs=(("teacher", "teacher"), ("scores", "score")), headline=True,
          swept=("pruning_ratio", "target_macs", "seed"),
          bars=(Bars("widths", "output channels kept", "pruned widths per layer"),)),
    Stage("finetune", "finetune", "fine-tune a student (optionally distilled from the teacher)",
          "models/finetuned", 720, inputs=(("data", "prepare"), ("student", "prune"), ("teacher", "teacher")),
          checkpoints="checkpoints/finetune",
          curves=(Curve("metrics", "finetune_loss.csv", "step", "loss", "fine-tuning loss"),), headline=True,
          swept=("seed",)),
    Stage("evaluate", "evaluate", "sample teacher and student from the same noise; FID, SSIM, MACs, latency",
          "samples", 240, inputs=(("data", "prepare"), ("teacher", "teacher"), ("student", "finetune")),
          curves=(Curve("metrics", "evaluate_fid_vs_macs.csv", "macs_m", "fid", "FID vs MACs", kind="scatter"),),
          images=("grid_pairs.png", "grid_teacher.png", "grid_pruned.png"), out_aliases=("--samples",),
          external=external.inception_weights, headline=True),
    Stage("register", "registration", "log the `dvc repro` outputs to MLflow and register the fine-tuned model",
          None, 30, inputs=(("model", "finetune"), ("evaluation", "evaluate")), key="register", library=False,
          extra_params=("tracking",), extra_metrics=("report.md",),
          code=("diffprune.tracking.register", "diffprune.tracking.mlflow_model", "diffprune.tracking.promotion",
                "diffprune.evaluation.report")),
)
STAGES: dict[str, Stage] = {s.name: s for s in TABLE}
NAMES: tuple[str, ...] = tuple(STAGES)
LIBRARY: tuple[Stage, ...] = tuple(s for s in TABLE if s.library)
HEADLINE: tuple[str, ...] = tuple(s.name for s in TABLE if s.headline)
SWEPT: tuple[str, ...] = tuple(s.name for s in TABLE if s.swept)


def downstream(name: str) -> tuple[str, ...]:
    """The stages that read ``name``'s output, directly or not, in table order."""
    found = {name}
    for s in TABLE:
        if any(up in found for _, up in s.inputs):
            found.add(s.name)
    return tuple(s.name for s in TABLE if s.name in found and s.name != name)
