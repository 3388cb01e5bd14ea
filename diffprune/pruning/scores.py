"""The score stage's output folder: gradients (safetensors) + ``score.json`` + the loss over t."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from diffprune.common.atomic import atomic_file
from diffprune.common.errors import DiffpruneError
from diffprune.pruning.criteria import CRITERIA


def write_loss_over_t(timesteps: list[int], losses: list[float], path: Path) -> None:
    with atomic_file(path) as fh:
        writer = csv.writer(fh)
        writer.writerow(["t", "loss"])
        writer.writerows((t, f"{v:.6f}") for t, v in zip(timesteps, losses, strict=True))


def read_scores(scores_dir: str | Path, teacher_hash: str) -> dict:
    """``score.json`` plus ``gradients`` when the criterion needs them; refuses scores of another teacher."""
    scores_dir = Path(scores_dir)
    meta_path = scores_dir / "score.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        raise DiffpruneError(f"{meta_path}: missing or unreadable; run `diffprune score` first") from None
    if meta.get("teacher") != teacher_hash:
        raise DiffpruneError(f"{meta_path}: scores belong to another teacher; re-run `diffprune score`")
    row = CRITERIA.get(meta.get("criterion"))
    if row is not None and row.needs_gradients:
        grads_path = scores_dir / "gradients.safetensors"
        try:
            meta["gradients"] = load_file(grads_path)
        except (OSError, SafetensorError) as exc:
            raise DiffpruneError(f"{grads_path}: not a valid safetensors file ({type(exc).__name__})") from None
    return meta
