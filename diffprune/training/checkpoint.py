"""Training checkpoints without pickle: safetensors for tensors, JSON for everything else.

A checkpoint is a directory ``step-0000500/`` holding ``model``, ``ema`` and ``optimizer``
safetensors files plus ``state.json``. It is written to a temp name and renamed, so a directory
named ``step-*`` is always complete; a crash leaves only a ``.step-*.tmp-*`` that is ignored.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffprune.common.atomic import atomic_dir, write_json
from diffprune.common.errors import DiffpruneError
from diffprune.family.models import model_hash
from diffprune.pipeline.config import resumable_fields
from diffprune.pipeline.stage_params import TrainParams


def save_checkpoint(
    ckpt_dir: Path,
    step: int,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    optimizer: dict,
    state: dict,
    keep: int,
) -> Path:
    target = ckpt_dir / f"step-{step:07d}"
    with atomic_dir(target) as tmp:
        save_file(_contiguous(model), tmp / "model.safetensors")
        save_file(_contiguous(ema), tmp / "ema.safetensors")
        tensors, meta = _flatten_optimizer(optimizer)
        save_file(tensors, tmp / "optimizer.safetensors")
        write_json(tmp / "optimizer.json", meta)
        write_json(tmp / "state.json", {**state, "step": step})
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())


def load_checkpoint(path: Path) -> tuple[dict, dict, dict, dict]:
    """Return (model, ema, optimizer state_dict, state); one-line error naming the damaged file."""
    current = path / "state.json"
    try:
        state = json.loads(current.read_text())
        current = path / "model.safetensors"
        model = load_file(current)
        current = path / "ema.safetensors"
        ema = load_file(current)
        current = path / "optimizer.safetensors"
        tensors = load_file(current)
        current = path / "optimizer.json"
        optimizer = _unflatten_optimizer(tensors, json.loads(current.read_text()))
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise DiffpruneError(
            f"{current}: damaged checkpoint ({type(exc).__name__}); delete {path} to resume from an earlier one"
        ) from None
    return model, ema, optimizer, state


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, slots in sd["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, slots in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(slots)
    return {"state": state, "param_groups": meta["param_groups"]}


def run_fingerprint(unet: torch.nn.Module, params: TrainParams, images, world: int, extra) -> str:
    """The folder name of a training run's checkpoints: what it trains, on what, how (less the fields that
    may change on resumption), so that only the same run resumes from them."""
    recipe = {k: v for k, v in params.model_dump().items() if k not in resumable_fields(type(params))}
    h = hashlib.sha256(json.dumps([recipe, model_hash(unet), world, extra], sort_keys=True, default=str).encode())
    h.update(_content_digest(images))
    return h.hexdigest()[:16]


def _content_digest(images) -> bytes:
    """sha256 of the inputs' bytes. A memory-mapped prepared set is hashed from its file (the same bytes, read
    in chunks), so that fingerprinting it does not map the whole set into the process."""
    if isinstance(images, np.memmap) and images.flags.c_contiguous and images.filename:
        h, left = hashlib.sha256(), images.nbytes
        with open(images.filename, "rb") as fh:
            fh.seek(images.offset)
            while left and (block := fh.read(min(left, 1 << 20))):
                h.update(block)
                left -= len(block)
        return h.digest()
    data = images if isinstance(images, np.ndarray) else images.detach().cpu().contiguous().numpy()
    return hashlib.sha256(data.tobytes()).digest()
