"""DDIM / DDPM sampling (with classifier-free guidance for conditional models), per-image noise
streams, PNG folders and sample grids.

Image ``i`` of seed ``s`` always starts from (and, for stochastic samplers, keeps drawing from) the
generator ``derive_seed(s, i)``, whatever the batch size or device: a teacher and a student sampled
with the same seed start from the same noise, so their images pair up one to one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from PIL import Image

from diffprune.common.errors import DiffpruneError
from diffprune.common.progress import bar as progress_bar
from diffprune.common.runtime import derive_seed
from diffprune.family import fast_path as inference
from diffprune.family.diffusion import Diffusion, to_uint8
from diffprune.pipeline.stage_params import DDIM, DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS, FastPathParams


@dataclass(frozen=True)
class SamplerOptions:
    """How images are sampled: with the model, the seed and the conditions, these fix the images."""

    sampler: str = DEFAULT_SAMPLER  # one of SAMPLERS
    steps: int = DEFAULT_STEPS
    eta: float = 0.0  # DDIM's eta (0: deterministic)
    guidance: float = 1.0  # classifier-free guidance scale of conditional models (1: none)
    batch_size: int = 256  # images denoised at once (each keeps its own noise stream)
    fast: FastPathParams | None = None  # the fast path's settings (None: plain fp32)

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise DiffpruneError(f"sampler {self.sampler!r}: expected one of {', '.join(SAMPLERS)}")


PLAIN = SamplerOptions()


def make_sampler(train_scheduler: DDPMScheduler, sampler: str, steps: int,
                 latent: bool = False) -> DDIMScheduler | DDPMScheduler:
    """A sampling scheduler sharing the training β schedule; DDIM uses uniform ("leading") timestep skips.
    Latents are not bounded to [-1, 1] as pixels are, so ``latent`` switches off clipping of x0."""
    cls = DDIMScheduler if sampler == DDIM else DDPMScheduler
    sched = cls.from_config(train_scheduler.config, **({"clip_sample": False} if latent else {}))
    sched.set_timesteps(min(steps, train_scheduler.config.num_train_timesteps))
    return sched


def sample(unet: UNet2DModel, train_scheduler: DDPMScheduler, n: int, seed: int, options: SamplerOptions = PLAIN,
           **kwargs) -> np.ndarray:
    """Generate ``n`` images (NHWC uint8) with an unconditional pixel model (see :func:`generate`)."""
    return generate(Diffusion(unet, train_scheduler), n, seed, options, **kwargs)


def generate(
    model: Diffusion,
    n: int,
    seed: int,
    options: SamplerOptions = PLAIN,
    *,
    conditions: Sequence | None = None,
    device: str | torch.device = "cpu",
    desc: str = "sample",
    progress: bool = True,
) -> np.ndarray:
    """Generate ``n`` images (NHWC uint8) as ``options`` say: image ``i`` from noise stream
    ``derive_seed(seed, i)`` and, for a conditional model, ``conditions[i]`` (a label or a prompt)."""
    if model.conditional and (conditions is None or len(conditions) != n):
        raise DiffpruneError(f"a {model.family} model needs one condition per image ({n})")
    if model.conditional:
        model.condition.check(list(conditions), "conditions")
    path = inference.resolve(options.fast, device)
    model = model.to(device)
    unet = inference.prepare(model.unet, path)
    out = []
    n_batches = math.ceil(n / options.batch_size)
    n_steps = min(options.steps, model.scheduler.config.num_train_timesteps)
    bar = progress_bar(total=n_batches * n_steps, desc=desc, disable=not progress, unit="step", leave=False)
    with inference.running(path):
        for start in range(0, n, options.batch_size):
            stop = min(n, start + options.batch_size)
            out.append(_generate_batch(model, unet, path, start, stop, seed, conditions, options, bar))
    bar.close()
    return np.concatenate(out)


def _generate_batch(model: Diffusion, unet, path: inference.FastPath, start: int, stop: int, seed: int,
                    conditions, options: SamplerOptions, bar) -> np.ndarray:
    """Images ``start`` … ``stop - 1`` of ``seed``, each from its own noise stream."""
    device, shape, guidance = path.device, model.input_shape, options.guidance
    gens = [torch.Generator().manual_seed(derive_seed(seed, i)) for i in range(start, stop)]
    sched = make_sampler(model.scheduler, options.sampler, options.steps, latent=model.autoencoder is not None)
    x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
    context = model.context(conditions[start:stop], device) if model.conditional else None
    null = model.null_context(stop - start, device) if model.conditional and guidance != 1.0 else None
    for t in sched.timesteps:
        eps = model.predict(inference.layout(x, path), t, context, unet=unet, guidance=guidance, null=null)
        eps = eps.float().contiguous()  # the scheduler's update stays in fp32
        if options.sampler == DDIM:
            noise = None
            if options.eta > 0:
                noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
            x = sched.step(eps, t, x, eta=options.eta, variance_noise=noise).prev_sample
        else:
            x = sched.step(eps, t, x, generator=gens).prev_sample
        bar.update(1)
    return to_uint8(model.decode(x).float())


def save_pngs(images: np.ndarray, folder: str | Path, start: int = 0) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images, start):
        path = folder / f"{i:06d}.png"
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(path)
        paths.append(path)
    return paths


def grid(images: np.ndarray, cols: int | None = None, pad: int = 1, scale: int = 1) -> Image.Image:
    """Tile NHWC uint8 images into one picture (white padding), optionally upscaled (nearest)."""
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = img
    pic = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    return pic.resize((pic.width * scale, pic.height * scale), Image.NEAREST) if scale > 1 else pic


def paired_grid(a: np.ndarray, b: np.ndarray, cols: int = 16, scale: int = 2) -> Image.Image:
    """Rows alternate: ``cols`` images of ``a`` above the images of ``b`` from the same noise."""
    rows = []
    for start in range(0, min(len(a), len(b)), cols):
        rows += [a[start:start + cols], b[start:start + cols]]
    rows = [r for r in rows if len(r) == cols] or [a[:cols], b[:cols]]
    return grid(np.concatenate(rows), cols=cols, scale=scale)
