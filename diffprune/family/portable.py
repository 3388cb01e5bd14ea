"""Pruned denoisers that stock diffusers loads: ``DiffusionPipeline.from_pretrained(folder)`` and the named
pipeline classes (``DDPMPipeline``, ``LDMPipeline``, ``StableDiffusionPipeline``) on a folder diffprune saved.

A diffusers config cannot express pruned widths (see :mod:`diffprune.family.persist`), so a pruned folder's
``model_index.json`` names these subclasses of diffusers' UNets for its ``unet``: their ``from_pretrained``
rebuilds the exact architecture from ``architecture.json`` and loads the safetensors strictly (no pickle,
no remote code), and their ``save_pretrained`` writes that file again, so a pipeline the user re-saves
still loads. diffusers imports no module that a folder names, so the user's code says ``import diffprune``
first; without it diffusers stops with one line that says to import ``diffprune``. The classes are
reached as ``diffprune.PrunedUNet2DModel`` (a lazy attribute, so ``import diffprune`` stays light).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import ModelMixin, UNet2DConditionModel, UNet2DModel  # noqa: F401  (diffusers looks ModelMixin up here)

from diffprune.family.persist import ARCH_FILE, denoiser_class, describe, load_exact

LIBRARY = "diffprune"  # the module model_index.json names: the package, so that `import diffprune` suffices


class _Exact:
    """``from_pretrained``/``save_pretrained`` through ``architecture.json`` (mixed into a diffusers UNet)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                        torch_dtype: torch.dtype | None = None, **_: object):
        folder = Path(pretrained_model_name_or_path, subfolder or "")
        unet = load_exact(folder, cls)
        return unet.to(torch_dtype) if torch_dtype is not None else unet

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        super().save_pretrained(save_directory, *args, **kwargs)
        Path(save_directory, ARCH_FILE).write_text(json.dumps(describe(self), indent=1))


class PrunedUNet2DModel(_Exact, UNet2DModel):
    """A (possibly pruned) ``UNet2DModel`` with its exact widths."""


class PrunedUNet2DConditionModel(_Exact, UNet2DConditionModel):
    """A (possibly pruned) ``UNet2DConditionModel`` with its exact widths."""


EXACT = {base: exact for base, exact in ((UNet2DModel, PrunedUNet2DModel),
                                         (UNet2DConditionModel, PrunedUNet2DConditionModel))}


def is_pruned(unet: torch.nn.Module) -> bool:
    """Whether any tensor differs in shape from what the unet's own config builds (checked on the meta
    device: no memory, even for an SD-sized model)."""
    with torch.device("meta"):
        stock = denoiser_class(unet).from_config(unet.config)
    shapes = {k: tuple(v.shape) for k, v in stock.state_dict().items()}
    return shapes != {k: tuple(v.shape) for k, v in unet.state_dict().items()}


def index_entry(unet: torch.nn.Module) -> list[str]:
    """The ``model_index.json`` entry of a saved unet: stock diffusers unless its widths need ours."""
    base = denoiser_class(unet)
    return [LIBRARY, EXACT[base].__name__] if is_pruned(unet) else ["diffusers", base.__name__]
