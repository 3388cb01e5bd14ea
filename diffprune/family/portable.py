"""Pruned denoisers that stock diffusers loads: ``DiffusionPipeline.from_pretrained(folder)`` and the named
pipeline classes (``DDPMPipeline``, ``LDMPipeline``, ``StableDiffusionPipeline``) on a folder diffprune saved.

A diffusers config cannot express pruned widths (see :mod:`diffprune.family.persist`), so a pruned folder's
``model_index.json`` names these subclasses of diffusers' UNets for its ``unet``: their ``from_pretrained``
rebuilds the exact architecture from ``architecture.json`` and loads the safetensors strictly (no pickle,
no remote code), and their ``save_pretrained`` writes that file again, so a pipeline the user re-saves
still loads. diffusers imports no module that a folder names, so the user's code says ``import diffprune``
first; without it diffusers stops with one line that says to import ``diffprune``. The classes are
reached as ``diffprune.PrunedUNet2DModel`` (a lazy attribute, so ``import diffprune`` stays light).

Class-conditional folders name :class:`ClassConditionalPipeline` (``diffprune.ClassConditionalPipeline``): diffusers
has no UNet pipeline that takes class labels, and ``DiffusionPipeline.from_pretrained`` looks a folder's
``_class_name`` up in diffusers only (``_get_pipeline_class``), so such a folder loads through that class's own
``from_pretrained``; the generic call stops at ``module diffusers has no attribute ClassConditionalPipeline``.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import ClassVar

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    ImagePipelineOutput,
    ModelMixin,  # noqa: F401  (diffusers looks ModelMixin up here)
    SchedulerMixin,
    UNet2DConditionModel,
    UNet2DModel,
    VQModel,
)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from diffprune.family.conditioning import ClassCondition, LabelEmbedding
from diffprune.family.diffusion import Diffusion, to_uint8
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


class ClassConditionalPipeline(DiffusionPipeline):
    """Class-conditional sampling for a folder diffprune saved from a class-conditional model: a (possibly pruned)
    ``UNet2DConditionModel`` whose cross-attention reads a learned label embedding, plus an autoencoder (``vae`` or
    ``vqvae``) for a latent model. ``ClassConditionalPipeline.from_pretrained(folder)`` loads it like any diffusers
    pipeline; ``pipe(class_labels=[...])`` generates, with classifier-free guidance when ``guidance_scale`` ≠ 1
    (the null label is ``num_classes``).

    The context, the guidance and the decoding are diffprune's own (:class:`Diffusion` around these components),
    and PIL images use diffprune's uint8 conversion: with the same scheduler and one generator per image seeded
    as diffprune's sampler seeds it, the images are those of diffprune's evaluation, bit for bit.
    """

    _optional_components: ClassVar[list[str]] = ["vae", "vqvae"]  # a pixel model has neither

    def __init__(self, unet: UNet2DConditionModel, scheduler: SchedulerMixin, label_embedding: LabelEmbedding,
                 vae: AutoencoderKL | None = None, vqvae: VQModel | None = None) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, label_embedding=label_embedding, vae=vae, vqvae=vqvae)

    def as_diffusion(self) -> Diffusion:
        """The components as diffprune's model (what :func:`diffprune.family.models.load_diffusion` gives)."""
        folder = "vqvae" if self.vqvae is not None else "vae"
        return Diffusion(self.unet, self.scheduler, getattr(self, folder), folder, ClassCondition(self.label_embedding))

    @torch.no_grad()
    def __call__(self, class_labels: int | list[int], guidance_scale: float = 1.0, num_inference_steps: int = 50,
                 generator: torch.Generator | list[torch.Generator] | None = None, eta: float = 0.0,
                 output_type: str = "pil", return_dict: bool = True) -> ImagePipelineOutput | tuple:
        """One image per label. ``generator``: one, or one per image (each image's noise then comes from its
        own); ``eta``: DDIM's, passed to schedulers that take it; ``output_type``: "pil", "np" or "pt" (floats in
        [0, 1]) or "latent" (the model's output, undecoded)."""
        labels = torch.as_tensor(class_labels).reshape(-1).tolist()  # an int, a list, an array or a tensor
        model = self.as_diffusion()
        model.condition.check(labels, "class_labels")  # integers in range: one line (DiffpruneError) otherwise
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0 (got {guidance_scale})")
        if output_type not in ("pil", "np", "pt", "latent"):  # before sampling, not after it
            raise ValueError(f"output_type {output_type!r}: expected 'pil', 'np', 'pt' or 'latent'")
        device = self._execution_device
        x = randn_tensor((len(labels), *model.input_shape), generator=generator, device=device, dtype=self.unet.dtype)
        x = x * self.scheduler.init_noise_sigma
        context = model.context(labels, device)
        null = model.null_context(len(labels), device) if guidance_scale != 1.0 else None
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        accepted = inspect.signature(self.scheduler.step).parameters
        step_kwargs = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in accepted}
        for t in self.progress_bar(self.scheduler.timesteps):
            eps = model.predict(self.scheduler.scale_model_input(x, t), t, context, guidance=guidance_scale, null=null)
            x = self.scheduler.step(eps, t, x, **step_kwargs).prev_sample
        images = x if output_type == "latent" else model.decode(x).float()
        if output_type == "pil":
            images = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in to_uint8(images)]
        elif output_type in ("np", "pt"):
            images = (images / 2 + 0.5).clamp(0, 1)  # diffusers' own convention for float images
            images = images if output_type == "pt" else images.cpu().permute(0, 2, 3, 1).numpy()
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
