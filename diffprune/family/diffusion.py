"""What a model family needs, in one place: a denoiser plus its frozen parts, and the five things every
stage asks of it — encode data to model inputs, embed conditions, predict noise (with classifier-free
guidance), decode model outputs to images, and example inputs for tracing.

Families: pixel or latent (a frozen ``VQModel`` / ``AutoencoderKL``), unconditional or conditioned on
class labels or text (a frozen label embedding / text encoder feeding cross-attention). Only ``unet``
is ever pruned or trained; the stages never branch on the family themselves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDPMScheduler
from torch import nn

from diffprune.family.conditioning import Condition


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """The one conversion between stored images and model inputs: NHWC uint8 → NCHW float in [-1, 1]."""
    if not images.flags.writeable:  # a memory-mapped prepared set: torch wants memory it may write
        images = np.array(images)
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """The way back, for generated images: [-1, 1] NCHW float → NHWC uint8 (one formula for diffprune's PNGs and
    :class:`~diffprune.family.portable.ClassConditionalPipeline`'s PIL images, so both are the same bytes)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


Context = torch.Tensor | None  # encoder_hidden_states (B, L, D), or None for unconditional models


def denoise(unet: nn.Module, x: torch.Tensor, t, context: Context = None) -> torch.Tensor:
    """One denoiser call: ε for ``x`` at ``t``, conditioned on ``context`` when there is one."""
    return unet(x, t).sample if context is None else unet(x, t, encoder_hidden_states=context).sample


@dataclass
class Diffusion:
    unet: nn.Module  # UNet2DModel or UNet2DConditionModel: the part that is pruned and trained
    scheduler: DDPMScheduler
    autoencoder: nn.Module | None = None  # frozen; latents are its (scaled) encodings
    autoencoder_folder: str = "vae"  # "vqvae" in LDMPipeline folders
    condition: Condition | None = None  # frozen label embedding or text encoder (+ tokenizer)
    # The teacher's own scheduler when it is not a DDPMScheduler (PNDM, Euler, DPM-Solver…): diffprune trains
    # and scores with ``scheduler`` (the same noise schedule), and every folder it saves keeps this one.
    source_scheduler: object | None = None

    @property
    def family(self) -> str:
        space = "latent" if self.autoencoder is not None else "pixel"
        return f"{space}-{self.condition.kind if self.condition else 'unconditional'}"

    @property
    def conditional(self) -> bool:
        return self.condition is not None

    def with_unet(self, unet: nn.Module) -> Diffusion:
        """The same frozen parts around another denoiser (a pruned or fine-tuned student)."""
        return dataclasses.replace(self, unet=unet)

    def to(self, device: torch.device | str) -> Diffusion:
        for module in self.modules().values():
            module.to(device)
        return self

    def modules(self) -> dict[str, nn.Module]:
        """Every torch part by its pipeline folder name."""
        parts = {"unet": self.unet}
        if self.autoencoder is not None:
            parts[self.autoencoder_folder] = self.autoencoder
        if self.condition is not None:
            parts[self.condition.folder] = self.condition.module
        return parts

    @property
    def input_shape(self) -> tuple[int, int, int]:
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return cfg.in_channels, size, size

    @property
    def image_channels(self) -> int:
        return self.autoencoder.config.in_channels if self.autoencoder is not None else self.input_shape[0]

    @property
    def scaling(self) -> float:
        return float(getattr(self.autoencoder.config, "scaling_factor", 1.0) or 1.0)

    @property
    def downscale(self) -> int:
        """Image side / model-input side: 1 for pixel models."""
        if self.autoencoder is None:
            return 1
        return 2 ** (len(self.autoencoder.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        return self.input_shape[1] * self.downscale

    @torch.no_grad()
    def encode(self, images: np.ndarray, batch_size: int = 64, device: torch.device | str = "cpu") -> torch.Tensor:
        """NHWC uint8 images → model inputs x0 (pixels in [-1, 1], or latents × the scaling factor), on the CPU."""
        x = images_to_tensor(images)
        if self.autoencoder is None:
            return x
        ae = self.autoencoder.to(device).eval()
        out = []
        for xb in x.split(batch_size):
            enc = ae.encode(xb.to(device))
            z = enc.latent_dist.mean if hasattr(enc, "latent_dist") else enc.latents
            out.append((z * self.scaling).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model outputs → images as float NCHW in [-1, 1] (through the frozen autoencoder for latents)."""
        if self.autoencoder is None:
            return x
        return self.autoencoder.to(x.device).decode(x / self.scaling).sample

    def context(self, values, device: torch.device | str = "cpu") -> Context:
        """Conditions (labels or prompts) → the cross-attention context; None for unconditional models."""
        if self.condition is None:
            return None
        return self.condition.embed(list(values), torch.device(device))

    def null_context(self, n: int, device: torch.device | str = "cpu") -> Context:
        if self.condition is None:
            return None
        return self.condition.embed([self.condition.null()] * n, torch.device(device))

    def predict(self, x: torch.Tensor, t, context: Context = None, *, unet: nn.Module | None = None,
                guidance: float = 1.0, null: Context = None) -> torch.Tensor:
        """ε-prediction; with ``guidance`` ≠ 1 and a ``null`` context, classifier-free guidance
        ε_null + s·(ε_cond − ε_null), both halves in one batched call."""
        unet = unet if unet is not None else self.unet
        if context is None or guidance == 1.0 or null is None:
            return denoise(unet, x, t, context)
        t2 = torch.cat([t, t]) if torch.is_tensor(t) and t.dim() else t
        both = denoise(unet, torch.cat([x, x]), t2, torch.cat([null, context]))
        eps_null, eps_cond = both.chunk(2)
        return eps_null + guidance * (eps_cond - eps_null)

    def conditions(self, data, split: str = "train") -> list | np.ndarray | None:
        """The condition of every image of a prepared split (labels or captions); None if unconditional."""
        return None if self.condition is None else self.condition.values(data, split)

    def training_conditions(self, data) -> Sequence | None:
        """Per training image its condition, or the alternatives a training step picks from; None if
        unconditional."""
        return None if self.condition is None else self.condition.training_values(data)

    def sample_conditions(self, data, n: int) -> list | None:
        """Conditions of ``n`` evaluation samples (classes in turn, or the held-out captions in turn); None if
        unconditional."""
        return None if self.condition is None else self.condition.sample_values(data, n)

    def example_inputs(self, batch: int = 1, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Inputs of one denoiser call, for tracing (torch-pruning) and MACs."""
        c, h, w = self.input_shape
        inputs = {"sample": torch.zeros(batch, c, h, w, device=device),
                  "timestep": torch.ones(batch, dtype=torch.long, device=device)}
        if self.condition is not None:
            inputs["encoder_hidden_states"] = self.null_context(batch, device)
        return inputs


def example_inputs_for(unet: nn.Module, context_len: int = 1) -> dict[str, torch.Tensor]:
    """Tracing inputs for a bare denoiser (no frozen parts at hand): zeros of the configured widths."""
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    device = next(unet.parameters()).device
    inputs = {"sample": torch.zeros(1, cfg.in_channels, size, size, device=device),
              "timestep": torch.ones(1, dtype=torch.long, device=device)}
    if getattr(cfg, "cross_attention_dim", None):
        width = cfg.cross_attention_dim
        width = width[0] if isinstance(width, (list, tuple)) else width
        inputs["encoder_hidden_states"] = torch.zeros(1, context_len, width, device=device)
    return inputs
