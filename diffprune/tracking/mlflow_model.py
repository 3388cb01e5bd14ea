"""MLflow "models from code" definition of a registered diffprune generator.

MLflow logs this file itself (not a pickled instance) and executes it at load time, so loading a
registered model never unpickles anything: the weights are safetensors, the rest JSON.

Input: rows of ``num_images`` (int ≥ 1) and ``seed`` (int), optionally ``steps`` (int ≥ 1) and
``sampler`` ("ddim" or "ddpm"); for conditional models ``label`` (int, class-conditional) or
``prompt`` (str, text-conditional) and ``guidance_scale`` (float ≥ 0; default: the one evaluated).
Output: uint8 images (N, H, W, C), rows concatenated in order. Image i of a seed is the same
whatever else is asked (per-image noise streams).
"""

from __future__ import annotations

import numbers
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch

from diffprune.common.errors import DiffpruneError
from diffprune.evaluation.sampling import generate
from diffprune.family.models import load_diffusion
from diffprune.pipeline.stage_params import FastPathParams

COLUMNS = ("num_images", "seed", "steps", "sampler", "label", "prompt", "guidance_scale")
SAMPLERS = ("ddim", "ddpm")
DEFAULT_STEPS = 50
# One request is materialised in memory at once; this bounds what a serving endpoint can be asked for.
MAX_IMAGES = 10_000


def _missing(value: Any) -> bool:
    # Rows of a DataFrame where only some give ``steps`` arrive with NaN (or pd.NA) in the others.
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # array-likes: not a missing scalar
        return False


def _as_int(value: Any, name: str, row: int, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value).is_integer():
        raise ValueError(f"row {row}: {name} must be an integer (got {value!r})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"row {row}: {name} must be >= {minimum} (got {value})")
    return value


def _rows(model_input: Any) -> list[dict]:
    if isinstance(model_input, pd.DataFrame):
        rows = model_input.to_dict("records")
    elif isinstance(model_input, dict):
        is_columns = any(isinstance(v, (list, tuple, np.ndarray, pd.Series)) for v in model_input.values())
        rows = pd.DataFrame(model_input).to_dict("records") if is_columns else [model_input]
    elif isinstance(model_input, (list, tuple)) and all(isinstance(r, dict) for r in model_input):
        rows = list(model_input)
    else:
        raise ValueError("input must be a DataFrame, a dict or a list of dicts with columns num_images and seed "
                         f"(got {type(model_input).__name__})")
    if not rows:
        raise ValueError("input has no rows: give at least one row with num_images and seed")
    return rows


def _condition(row: dict, i: int, kind: str | None):
    label, prompt = row.get("label"), row.get("prompt")
    label, prompt = (None if _missing(label) else label), (None if _missing(prompt) else prompt)
    if kind is None:
        if label is not None or prompt is not None:
            raise ValueError(f"row {i}: this model is unconditional; leave out label and prompt")
        return None
    if kind == "class":
        if prompt is not None or label is None:
            raise ValueError(f"row {i}: this class-conditional model needs a label (and no prompt)")
        return _as_int(label, "label", i, minimum=0)
    if label is not None or not isinstance(prompt, str):
        raise ValueError(f"row {i}: this text-conditional model needs a prompt string (and no label)")
    return prompt


def parse_requests(model_input: Any, default_steps: int, kind: str | None = None,
                   default_guidance: float = 1.0) -> list[dict]:
    """Validated requests ``{num_images, seed, steps, sampler, condition, guidance_scale}``, one per row;
    ``kind``: the model's condition kind (None, "class" or "text")."""
    requests = []
    for i, row in enumerate(_rows(model_input)):
        unknown = sorted(set(row) - set(COLUMNS))
        if unknown:
            raise ValueError(f"row {i}: unknown column(s) {unknown}; expected some of {list(COLUMNS)}")
        for key in ("num_images", "seed"):
            if _missing(row.get(key)):
                raise ValueError(f"row {i}: {key} is required")
        sampler = row.get("sampler")
        sampler = "ddim" if _missing(sampler) else sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"row {i}: sampler must be one of {list(SAMPLERS)} (got {sampler!r})")
        steps = row.get("steps")
        guidance = row.get("guidance_scale")
        guidance = default_guidance if _missing(guidance) else guidance
        if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real) or not guidance >= 0:
            raise ValueError(f"row {i}: guidance_scale must be a number >= 0 (got {guidance!r})")
        requests.append({
            "num_images": _as_int(row["num_images"], "num_images", i, minimum=1),
            "seed": _as_int(row["seed"], "seed", i),
            "steps": default_steps if _missing(steps) else _as_int(steps, "steps", i, minimum=1),
            "sampler": sampler,
            "condition": _condition(row, i, kind),
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
        condition = self.model.condition
        requests = parse_requests(model_input, self.default_steps, condition.kind if condition else None,
                                  self.default_guidance)
        images = []
        for r in requests:
            conditions = [r["condition"]] * r["num_images"] if condition else None
            try:
                images.append(generate(self.model, r["num_images"], r["seed"], conditions=conditions,
                                       guidance=r["guidance_scale"], sampler=r["sampler"], steps=r["steps"], eta=0.0,
                                       device=self.device, desc="predict", progress=False, fast=self.fast))
            except DiffpruneError as exc:  # e.g. a label outside the model's classes
                raise ValueError(str(exc)) from None
        return np.concatenate(images).astype(np.uint8, copy=False)


mlflow.models.set_model(DiffpruneGenerator())
