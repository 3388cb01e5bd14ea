"""A small KL autoencoder for latent diffusion on small images, trained with the project's own code.

Loss: L1 reconstruction + a small KL weight (Stable Diffusion's autoencoder recipe without its
perceptual and adversarial terms, which 32 px digits do not need). The scaling factor is set, as
Rombach et al. do, to 1/std of the training latents, so the diffusion model sees unit-variance inputs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from diffprune.common.progress import bar as progress_bar
from diffprune.common.runtime import derive_seed
from diffprune.family.diffusion import images_to_tensor


def build_autoencoder(channels: int, widths: tuple[int, ...], latent_channels: int, groups: int) -> AutoencoderKL:
    """Downsamples by 2^(len(widths) − 1); no attention in the middle block (cheap on a CPU)."""
    return AutoencoderKL(
        in_channels=channels, out_channels=channels, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * len(widths), up_block_types=("UpDecoderBlock2D",) * len(widths),
        block_out_channels=widths, layers_per_block=1, norm_num_groups=groups, mid_block_add_attention=False,
    )


def train_autoencoder(ae: AutoencoderKL, images: np.ndarray, steps: int, batch_size: int, lr: float,
                      kl_weight: float, seed: int) -> tuple[AutoencoderKL, list[float]]:
    """Train on NHWC uint8 ``images``; returns the model (eval, scaling factor set) and the losses."""
    torch.manual_seed(seed)
    x = images_to_tensor(images)
    opt = torch.optim.AdamW(ae.parameters(), lr=lr)
    losses = []
    ae.train()
    for step in progress_bar(range(steps), desc="autoencoder", unit="step"):
        gen = torch.Generator().manual_seed(derive_seed(seed, step))
        batch = x[torch.randint(0, len(x), (batch_size,), generator=gen)]
        posterior = ae.encode(batch).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = ae.decode(z).sample
        loss = F.l1_loss(recon, batch) + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # Frozen from here on by use (conditioning.FROZEN): requires_grad stays True, as in the saved and reloaded
    # autoencoder, so both compute the same; the last step's gradients are dropped.
    ae.eval().zero_grad(set_to_none=True)
    with torch.no_grad():
        latents = torch.cat([ae.encode(b).latent_dist.mean for b in x.split(256)])
    ae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return ae, losses


@torch.no_grad()
def reconstruction_error(ae: AutoencoderKL, images: np.ndarray) -> float:
    """Mean absolute error in [0, 255] of encode → decode (latent means) on ``images``."""
    x = images_to_tensor(images)
    recon = torch.cat([ae.decode(ae.encode(b).latent_dist.mean).sample for b in x.split(256)])
    return float((recon.clamp(-1, 1) - x).abs().mean() * 127.5)
