"""MLflow "models from code" definition of a registered diffprune generator.

MLflow logs this file itself (not a pickled instance) and executes it at load time, so loading a
registered model never unpickles anything: the weights are safetensors, the rest JSON.

Input: rows of ``num_images`` (int ≥ 1) and ``seed`` (int), optionally ``steps`` (int ≥ 1) and
``sampler`` ("ddim" or "ddpm"). Output: uint8 images (N, H, W, C), rows concatenated in order.
Image i of a seed is the same whatever else is asked (per-image noise streams).
"""

from __future__ import annotations

import numbers
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch

from diffprune.models import load_model
from diffprune.sampling import sample

COLUMNS = ("num_images", "seed", "steps", "sampler")
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


def parse_requests(model_input: Any, default_steps: int) -> list[dict]:
    """Validated requests ``{num_images, seed, steps, sampler}``, one per input row."""
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
        requests.append({
            "num_images": _as_int(row["num_images"], "num_images", i, minimum=1),
            "seed": _as_int(row["seed"], "seed", i),
            "steps": default_steps if _missing(steps) else _as_int(steps, "steps", i, minimum=1),
            "sampler": sampler,
        })
    total = sum(r["num_images"] for r in requests)
    if total > MAX_IMAGES:
        raise ValueError(f"{total} images asked for; at most {MAX_IMAGES} per call")
    return requests


class DiffpruneGenerator(mlflow.pyfunc.PythonModel):
    """Generates images with a saved (possibly pruned) diffprune model."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.unet, self.scheduler = load_model(context.artifacts["model"], self.device)
        config = context.model_config or {}
        self.default_steps = int(config.get("predict_steps", DEFAULT_STEPS))

    # MLflow 3 reads this hint: pd.DataFrame is one it leaves alone (the logged signature is the schema),
    # where Any, a union or no hint at all give warnings. Called directly, dicts and lists of dicts work too.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        images = [
            sample(self.unet, self.scheduler, r["num_images"], r["seed"], sampler=r["sampler"], steps=r["steps"],
                   eta=0.0, device=self.device, desc="predict", progress=False)
            for r in parse_requests(model_input, self.default_steps)
        ]
        return np.concatenate(images).astype(np.uint8, copy=False)


mlflow.models.set_model(DiffpruneGenerator())
