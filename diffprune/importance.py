"""Importance scoring: the gradient pass of Diff-Pruning and Taylor pruning.

``diff-pruning``: with one batch x0 and one fixed noise ε, for t = 0, 1, 2, … (every sample at the
same t, model in eval mode) accumulate ∇ of the ε-prediction MSE; stop after the first t whose loss
is below ``thr × max loss so far`` (thr 0: all T steps). Channel scores are then the first-order
Taylor terms Σ|w·∇w| per channel (torch-pruning's ``TaylorImportance(multivariable=False)``).
``taylor``: all T steps, multivariable Taylor |Σ w·∇w| (the paper's baseline).
``magnitude``, ``random`` and ``reinit`` need no gradients.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from diffprune.criteria import criterion as criterion_row
from diffprune.family import denoise
from diffprune.seeding import derive_seed


@dataclass
class GradientPass:
    """Accumulated gradients G = Σ_t ∇L_t and what it cost."""

    grads: dict[str, torch.Tensor]
    timesteps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def accumulate_gradients(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    batches: list[torch.Tensor],
    criterion: str,
    thr: float,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    contexts: list[torch.Tensor | None] | None = None,
) -> GradientPass:
    """Run the timestep loop over ``batches`` (model inputs x0, NCHW); see the module docstring.

    ``contexts``: the cross-attention context of each batch's conditions (conditional models); a batch
    given twice with different contexts (its real and its null condition) shares its noise.
    """
    unet = unet.to(device).eval()
    unet.zero_grad(set_to_none=True)
    T = scheduler.config.num_train_timesteps
    alphas = scheduler.alphas_cumprod.to(device)
    noises, first = [], {}
    for b, x0 in enumerate(batches):
        b0 = first.setdefault(id(x0), b)  # the same batch object draws the same noise
        gen = torch.Generator().manual_seed(derive_seed(seed, b0))
        noises.append(torch.randn(x0.shape, generator=gen).to(device))
    batches = [x.to(device) for x in batches]
    contexts = [None if c is None else c.to(device) for c in (contexts or [None] * len(batches))]
    stop = thr if criterion_row(criterion).uses_threshold else 0.0
    visited, losses, loss_max = [], [], 0.0
    start = time.perf_counter()
    bar = tqdm(range(T), desc=f"score {criterion}", disable=not progress, unit="t", leave=False)
    for t in bar:
        total = 0.0
        for x0, eps, context in zip(batches, noises, contexts, strict=True):
            a = alphas[t]
            xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
            timestep = torch.full((len(x0),), t, device=device, dtype=torch.long)
            loss = F.mse_loss(denoise(unet, xt, timestep, context), eps) / len(batches)
            loss.backward()
            total += loss.item()
        visited.append(t)
        losses.append(total)
        loss_max = max(loss_max, total)
        if t % 10 == 0:
            bar.set_postfix(loss=f"{total:.4f}")
        # After backward, as the official diffusers path: the first sub-threshold step is included.
        if stop > 0 and total < stop * loss_max:
            break
    bar.close()
    grads = {n: p.grad.detach().clone() for n, p in unet.named_parameters() if p.grad is not None}
    unet.zero_grad(set_to_none=True)
    return GradientPass(grads, visited, losses, time.perf_counter() - start)
