"""Importance scoring: the gradient pass of Diff-Pruning and Taylor pruning.

``diff-pruning``: with one batch x0 and one fixed noise ε, for t = 0, 1, 2, … (every sample at the
same t, model in eval mode) accumulate ∇ of the ε-prediction MSE; stop after the first t whose loss
is below ``thr × max loss so far`` (thr 0: all T steps). Channel scores are then the first-order
Taylor terms Σ|w·∇w| per channel (torch-pruning's ``TaylorImportance(multivariable=False)``).
``taylor``: all T steps, multivariable Taylor |Σ w·∇w| (the paper's baseline).
``score.variant: paper`` follows the code behind the paper's tables instead: a summed-error loss, the
stop checked before the backward pass, and :mod:`diffprune.pruning.paper_taylor`'s channel score for both.
``magnitude``, ``random`` and ``reinit`` need no gradients.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from diffprune.common.progress import bar as progress_bar
from diffprune.common.runtime import derive_seed
from diffprune.family.diffusion import Diffusion, denoise
from diffprune.pruning.criteria import criterion as criterion_row


@dataclass
class GradientPass:
    """Accumulated gradients G = Σ_t ∇L_t and what it cost."""

    grads: dict[str, torch.Tensor]
    timesteps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class ScoreOptions:
    """How the gradient pass runs: the ``score`` params that shape its result."""

    criterion: str
    thr: float  # diff-pruning: stop after the first t whose loss < thr × the max so far (0: all T steps)
    seed: int = 0  # the batches' noise
    timestep_batch: int = 1  # timesteps per forward/backward (k copies of each batch, one per t)
    variant: str = "diffusers"  # or "paper": the code behind the paper's tables


def accumulate_gradients(
    model: Diffusion,
    batches: list[torch.Tensor],
    options: ScoreOptions,
    *,
    contexts: list[torch.Tensor | None] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> GradientPass:
    """Run the timestep loop of ``model``'s denoiser over ``batches`` (model inputs x0, NCHW); see the
    module docstring.

    ``contexts``: the cross-attention context of each batch's conditions (conditional models); a batch
    given twice with different contexts (its real and its null condition) shares its noise.
    ``options.timestep_batch``: timesteps evaluated in one forward/backward. The result is the sequential
    loop's: each t's loss is its own mean, the chunk's per-t losses decide where the loop stops, and only
    the timesteps up to and including that one enter the backward pass.
    ``options.variant`` "paper": the loss of ``ddpm_exp`` (squared error summed over C, H, W, averaged over
    the batch) and its stop, checked before the backward pass (the first sub-threshold step is left out).
    """
    scheduler, variant, chunk = model.scheduler, options.variant, max(1, options.timestep_batch)
    unet = model.unet.to(device).eval()
    unet.zero_grad(set_to_none=True)
    T = scheduler.config.num_train_timesteps
    alphas = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    noises, first = [], {}
    for b, x0 in enumerate(batches):
        b0 = first.setdefault(id(x0), b)  # the same batch object draws the same noise
        gen = torch.Generator().manual_seed(derive_seed(options.seed, b0))
        noises.append(torch.randn(x0.shape, generator=gen).to(device))
    batches = [x.to(device) for x in batches]
    contexts = [None if c is None else c.to(device) for c in (contexts or [None] * len(batches))]
    stop = options.thr if criterion_row(options.criterion).uses_threshold else 0.0
    visited, losses, loss_max = [], [], 0.0
    start = time.perf_counter()
    bar = progress_bar(total=T, desc=f"score {options.criterion}", disable=not progress, unit="t", leave=False)
    for t0 in range(0, T, chunk):
        ts = torch.arange(t0, min(T, t0 + chunk), device=device)
        scale = batches[0][0].numel() if variant == "paper" else 1  # summed, not averaged, over C, H, W
        per_t = [_losses_at(unet, x0, eps, context, ts, alphas) * scale / len(batches)
                 for x0, eps, context in zip(batches, noises, contexts, strict=True)]
        totals = torch.stack([p.detach() for p in per_t]).sum(0).tolist()
        kept, done = 0, False
        for t, total in zip(ts.tolist(), totals, strict=True):
            loss_max = max(loss_max, total)
            done = stop > 0 and total < stop * loss_max
            if done and variant == "paper":  # ddpm_exp breaks before backward: this step is left out
                break
            kept += 1
            visited.append(t)
            losses.append(total)
            if done:  # the official diffusers path breaks after backward: this step is included
                break
        if kept:
            sum(p[:kept].sum() for p in per_t).backward()
        bar.update(kept)
        if visited:
            bar.set_postfix(t=visited[-1], loss=f"{losses[-1]:.4f}")
        if done:
            break
    bar.close()
    grads = {n: p.grad.detach().clone() for n, p in unet.named_parameters() if p.grad is not None}
    unet.zero_grad(set_to_none=True)
    return GradientPass(grads, visited, losses, time.perf_counter() - start)


def _losses_at(unet: nn.Module, x0: torch.Tensor, eps: torch.Tensor, context: torch.Tensor | None,
               ts: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """The ε-prediction MSE of the batch at each timestep of ``ts`` (one forward over k × B inputs)."""
    k, n = len(ts), len(x0)
    a = alphas[ts].view(k, *[1] * x0.dim())
    xt = (a.sqrt() * x0 + (1 - a).sqrt() * eps).flatten(0, 1)
    timesteps = ts.repeat_interleave(n)
    ctx = None if context is None else context.repeat(k, *[1] * (context.dim() - 1))
    err = (denoise(unet, xt, timesteps, ctx) - eps.repeat(k, *[1] * (eps.dim() - 1))) ** 2
    return err.view(k, -1).mean(1)
