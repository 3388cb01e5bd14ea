"""MLflow "models from code" definition of a registered diffprune generator.

MLflow logs this file itself (not a pickled instance) and executes it at load time, so loading a
registered model never unpickles anything: the weights are safetensors, the rest JSON.

Input: rows of :data:`COLUMNS` — ``num_images`` (int ≥ 1) and ``seed`` (int), optionally ``steps`` (int ≥ 1)
and ``sampler`` (one of :data:`diffprune.pipeline.stage_params.SAMPLERS`); for conditional models the condition's
column (``label``: int, class-conditional; ``prompt``: str, text-conditional) and ``guidance_scale``
(float ≥ 0; default: the one evaluated).
Output: uint8 images (N, H, W, C), rows concatenated in order. Image i of a seed is the same
whatever else is asked (per-image noise streams).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch

from diffprune.common.errors import DiffpruneError
from diffprune.evaluation.sampling import SamplerOptions, generate
from diffprune.family.conditioning import CONDITIONS, Condition, request_int
from diffprune.family.models import load_diffusion
from diffprune.pipeline.stage_params import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS, FastPathParams


@dataclass(frozen=True)
class Column:
    """One input column of the registered model."""

    name: str
    type: str  # its MLflow schema type
    required: bool = False


# The request table: what parse_requests reads and what the logged signature declares
# (diffprune.tracking.register.signature). A condition kind brings its own column.
COLUMNS = (
    Column("num_images", "long", required=True),
    Column("seed", "long", required=True),
    Column("steps", "long"),
    Column("sampler", "string"),
    *(Column(condition.column, condition.column_type) for condition in CONDITIONS),
    Column("guidance_scale", "double"),
)
_REQUIRED = " and ".join(c.name for c in COLUMNS if c.required)  # for error messages
# One request is materialised in memory at once; this bounds what a serving endpoint can be asked for.
MAX_IMAGES = 10_000


def _missing(value: Any) -> bool:
    # Rows of a DataFrame where only some give ``steps`` arrive with NaN (or pd.NA) in the others.
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # array-likes: not a missing scalar
        return False


def _rows(model_input: Any) -> list[dict]:
    if isinstance(model_input, pd.DataFrame):
        rows = model_input.to_dict("records")
    elif isinstance(model_input, dict):
        is_columns = any(isinstance(v, (list, tuple, np.ndarray, pd.Series)) for v in model_input.values())
        rows = pd.DataFrame(model_input).to_dict("records") if is_columns else [model_input]
    elif isinstance(model_input, (list, tuple)) and all(isinstance(r, dict) for r in model_input):
        rows = list(model_input)
    else:
        raise ValueError(f"input must be a DataFrame, a dict or a list of dicts with columns {_REQUIRED} "
                         f"(got {type(model_input).__name__})")
    if not rows:
        raise ValueError(f"input has no rows: give at least one row with {_REQUIRED}")
    return rows


def _condition(row: dict, i: int, condition: Condition | None):
    """The row's condition: in the model's condition column, and no other condition column given."""
    given = {c.column: value for c in CONDITIONS if not _missing(value := row.get(c.column))}
    if condition is None:
        if given:
            raise ValueError(f"row {i}: this model is unconditional; leave out "
                             + " and ".join(c.column for c in CONDITIONS))
        return None
    value = given.pop(condition.column, None)
    parsed = None if value is None or given else condition.parse_request(value, i)
    if parsed is None:
        others = " or ".join(c.column for c in CONDITIONS if c.column != condition.column)
        raise ValueError(f"row {i}: this {condition.kind}-conditional model needs {condition.request} "
                         f"(and no {others})")
    return parsed


def parse_requests(model_input: Any, default_steps: int, condition: Condition | None = None,
                   default_guidance: float = 1.0) -> list[dict]:
    """Validated requests ``{num_images, seed, steps, sampler, condition, guidance_scale}``, one per row;
    ``condition``: the model's conditioner (None: unconditional)."""
    names = [c.name for c in COLUMNS]
    requests = []
    for i, row in enumerate(_rows(model_input)):
        unknown = sorted(set(row) - set(names))
        if unknown:
            raise ValueError(f"row {i}: unknown column(s) {unknown}; expected some of {names}")
        for column in COLUMNS:
            if column.required and _missing(row.get(column.name)):
                raise ValueError(f"row {i}: {column.name} is required")
        sampler = row.get("sampler")
        sampler = DEFAULT_SAMPLER if _missing(sampler) else sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"row {i}: sampler must be one of {list(SAMPLERS)} (got {sampler!r})")
        steps = row.get("steps")
        guidance = row.get("guidance_scale")
        guidance = default_guidance if _missing(guidance) else guidance
        if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real) or not guidance >= 0:
            raise ValueError(f"row {i}: guidance_scale must be a number >= 0 (got {guidance!r})")
        requests.append({
            "num_images": request_int(row["num_images"], "num_images", i, minimum=1),
            "seed": request_int(row["seed"], "seed", i),
            "steps": default_steps if _missing(steps) else request_int(steps, "steps", i, minimum=1),
            "sampler": sampler,
            "condition": _condition(row, i, condition),
            "guidance_scale": float(guidance),
        })
    total = sum(r["num_images"] for r in requests)
    if total > MAX_IMAGES:
        raise ValueError(f"{total} images asked for; at most {MAX_IMAGES} per call")
    return requests


class DiffpruneGenerator(mlflow.pyfunc.PythonModel):
    """Generates images with a saved (possibly pruned) diffprune model."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_diffusion(context.artifacts["model"], self.device)
        config = context.model_config or {}
        self.default_steps = int(config.get("predict_steps", DEFAULT_STEPS))
        self.default_guidance = float(config.get("predict_guidance") or 1.0)
        # The evaluated fast path, resolved for this machine's device when predict runs (absent: plain fp32).
        self.fast = FastPathParams(**config["fast_path"]) if config.get("fast_path") else None

    # MLflow 3 reads this hint: pd.DataFrame is one it leaves alone (the logged signature is the schema),
    # where Any, a union or no hint at all give warnings. Called directly, dicts and lists of dicts work too.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        requests = parse_requests(model_input, self.default_steps, self.model.condition, self.default_guidance)
        images = []
        for r in requests:
            conditions = [r["condition"]] * r["num_images"] if self.model.conditional else None
            options = SamplerOptions(r["sampler"], r["steps"], guidance=r["guidance_scale"], fast=self.fast)
            try:
                images.append(generate(self.model, r["num_images"], r["seed"], options, conditions=conditions,
                                       device=self.device, desc="predict", progress=False))
            except DiffpruneError as exc:  # e.g. a label outside the model's classes
                raise ValueError(str(exc)) from None
        return np.concatenate(images).astype(np.uint8, copy=False)


mlflow.models.set_model(DiffpruneGenerator())
