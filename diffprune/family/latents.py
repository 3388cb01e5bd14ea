"""The training set as model inputs: pixels for pixel models; for latent models, the frozen
autoencoder's latents, encoded once by the teacher stage and kept next to the teacher's weights
(``latents.safetensors``, tagged with the dataset's content hash) so later stages never re-encode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from diffprune.data.datasets import Prepared, dataset_key
from diffprune.family.diffusion import Diffusion

LATENTS_FILE = "latents.safetensors"


def write_latents(folder: Path, model: Diffusion, data: Prepared, device: torch.device | str = "cpu") -> dict:
    """Encode the training images into ``folder/latents.safetensors``; returns a summary."""
    x0 = model.encode(data.train, device=device)
    save_file({"train": x0.contiguous()}, folder / LATENTS_FILE, metadata={"data": dataset_key(data)})
    return {"latents": list(x0.shape), "latent_std": float(x0.std())}


def training_inputs(model: Diffusion, model_dir: str | Path, data: Prepared) -> np.ndarray | torch.Tensor:
    """What the training loop and the score pass take: uint8 pixels, or latents (cached when they match)."""
    if model.autoencoder is None:
        return data.train
    path = Path(model_dir) / LATENTS_FILE
    try:
        with safe_open(path, framework="pt") as fh:
            if (fh.metadata() or {}).get("data") == dataset_key(data):
                # A copy: a memory-mapped tensor would fault (SIGBUS) if the file were replaced later.
                return fh.get_tensor("train").clone()
    except (OSError, SafetensorError):
        pass  # no usable cache: encode now (same result, only slower)
    return model.encode(data.train)
