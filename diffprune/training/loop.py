"""The one training loop: trains the teacher from scratch and fine-tunes pruned students.

ε-prediction DDPM loss, Adam/AdamW at a constant LR (optional linear warm-up), EMA, gradient
clipping, optional distillation (target = w·ε_teacher + (1−w)·ε, as the paper's KD loss),
mixed precision on CUDA and data parallelism through accelerate.

Randomness is counter-based: every draw at step s on rank r comes from a generator seeded with
(seed, s, r), and the data order of epoch e from (seed, e). The RNG state is therefore a function
of the step stored in each checkpoint, and resuming reproduces an uninterrupted run bit for bit.
"""

from __future__ import annotations

import copy
import csv
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState

from diffprune.common.atomic import atomic_file
from diffprune.common.errors import DiffpruneError
from diffprune.common.progress import bar as progress_bar
from diffprune.common.runtime import derive_seed, resolve_device
from diffprune.family.conditioning import Condition
from diffprune.family.diffusion import Diffusion, denoise, images_to_tensor
from diffprune.pipeline.stage_params import TrainParams
from diffprune.training.checkpoint import list_checkpoints, load_checkpoint, run_fingerprint, save_checkpoint
from diffprune.training.options import PRECISIONS, Conditioning, Distillation, TrainResult


def train(
    model: Diffusion,
    inputs: np.ndarray | torch.Tensor,
    params: TrainParams,
    ckpt_root: str | Path,
    *,
    conditioning: Conditioning | None = None,
    distillation: Distillation | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train ``model``'s denoiser on ``inputs`` for ``params.steps`` steps, resuming from ``ckpt_root`` if possible.

    ``inputs``: NHWC uint8 pixels, or model inputs x0 (NCHW float, e.g. cached latents). A conditional
    model trains on ``conditioning.values[i]`` for input ``i``, each replaced by the null condition with
    probability ``conditioning.dropout``; its frozen conditioner embeds them or, with ``train_embedding``,
    trains together with the unet. ``distillation``'s teacher shares the student's frozen context, or,
    while the student's conditioner trains, embeds the conditions with its own.

    Checkpoints live under ``ckpt_root/<fingerprint>/`` where the fingerprint covers everything that
    changes the result (params minus run length, architecture, data, world size), so a changed
    recipe never resumes from a stale checkpoint.
    """
    device = resolve_device(params.device)
    cpu = device.type == "cpu"
    if device.index is not None and "LOCAL_RANK" not in os.environ:
        torch.cuda.set_device(device)  # one process on cuda:N (under accelerate launch, each rank's own GPU)
    if params.mixed_precision == "fp16" and cpu:
        raise DiffpruneError("mixed_precision 'fp16' needs a CUDA device; use 'no' (or 'bf16') on CPU")
    if getattr(params, "teacher_precision", "fp32") == "fp16" and cpu and distillation is not None:
        raise DiffpruneError("finetune.teacher_precision 'fp16' needs a CUDA device; use 'bf16' or 'fp32' on CPU")
    if len(inputs) == 0:
        raise DiffpruneError("no training images")
    # One process may train several models with different precisions (tests, Prefect tasks); the
    # process-group part of accelerate's state survives the reset, so data parallelism is unaffected.
    AcceleratorState._reset_state()
    accel = Accelerator(cpu=cpu, mixed_precision=params.mixed_precision)
    rank, world = accel.process_index, accel.num_processes
    # Pixels stay uint8 (memory-mapped from the prepared set) and are converted a batch at a time.
    pixels = isinstance(inputs, np.ndarray)
    data = inputs if pixels else inputs.float()
    conditional = model.conditional
    if conditional and (conditioning is None or len(conditioning.values) != len(data)):
        raise DiffpruneError(f"a {model.family} model needs one condition per training input ({len(data)})")
    # The "" stands where an extra fingerprint part once was: checkpoints written before still resume.
    extra = ["", conditioning.dropout, conditioning.train_embedding] if conditional else ""
    ckpt_dir = Path(ckpt_root) / run_fingerprint(model.unet, params, inputs, world, extra)
    joint = conditional and conditioning.train_embedding
    if params.gradient_checkpointing:  # after any tracing: the pruner switches it off (its wrappers hide layers)
        model.unet.enable_gradient_checkpointing()
    unet = (_with_condition(model, distillation) if joint else model.unet).to(accel.device).train()
    ema_device = torch.device("cpu") if params.ema_on_cpu else accel.device
    ema = {k: v.detach().clone().float().to(ema_device) for k, v in unet.state_dict().items()}
    opt_cls = torch.optim.AdamW if params.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(unet.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    start, losses, resumed = 0, [], None
    if existing := list_checkpoints(ckpt_dir):
        model_sd, ema_sd, opt_sd, state = load_checkpoint(existing[-1])
        _load_weights(unet, model_sd, existing[-1])
        ema = {k: v.to(ema_device) for k, v in ema_sd.items()}
        optimizer.load_state_dict(opt_sd)
        start, losses, resumed = state["step"], state["losses"], state["step"]
    if start > params.steps:
        raise DiffpruneError(f"{existing[-1]}: checkpoint is past steps={params.steps}; raise steps or delete it")
    net, optimizer = accel.prepare(unet, optimizer)
    teacher = distillation.teacher.unet if distillation is not None else None
    teacher_dtype = PRECISIONS[getattr(params, "teacher_precision", "fp32")]
    if teacher is not None:
        teacher.to(accel.device, teacher_dtype).eval().requires_grad_(False)
    alphas = model.scheduler.alphas_cumprod.to(accel.device)
    T = model.scheduler.config.num_train_timesteps
    perms: dict[int, torch.Tensor] = {}

    bar = progress_bar(total=params.steps, initial=start, desc="train", disable=not accel.is_main_process, unit="step")
    t0 = time.perf_counter()
    for step in range(start, params.steps):
        gen = torch.Generator().manual_seed(derive_seed(params.seed, step, rank))
        torch.manual_seed(derive_seed(params.seed, step, rank, 1))  # dropout draws from the global RNG
        idx = _batch_indices(step, rank, world, params, len(data), perms)
        x0 = images_to_tensor(data[idx.numpy()]) if pixels else data[idx]
        if params.flip:
            flips = torch.rand(len(idx), generator=gen) < 0.5
            x0 = torch.where(flips[:, None, None, None], x0.flip(-1), x0)
        t = _timesteps(len(idx), T, params.antithetic, gen)
        noise = torch.randn(x0.shape, generator=gen)
        values = _conditions(model.condition, conditioning, idx, gen) if conditional else None
        x0, t, noise = x0.to(accel.device), t.to(accel.device), noise.to(accel.device)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for group in optimizer.param_groups:
            group["lr"] = params.lr * min(1.0, (step + 1) / params.warmup_steps) if params.warmup_steps else params.lr
        with accel.autocast():
            context = model.context(values, accel.device) if conditional and not joint else None
            pred = net(xt, t, values) if joint else denoise(net, xt, t, context)
            target = noise
            if teacher is not None and distillation.weight > 0:
                with torch.no_grad():
                    if joint:  # the student's conditioner is training: the teacher keeps its own
                        context = distillation.teacher.context(values, accel.device)
                    w = distillation.weight
                    cast = (lambda x: x) if teacher_dtype == torch.float32 else (lambda x: x.to(teacher_dtype))
                    guide = denoise(teacher, cast(xt), t, None if context is None else cast(context))
                    target = w * guide.float() + (1 - w) * noise
            loss = F.mse_loss(pred.float(), target)
        if not torch.isfinite(loss):
            raise DiffpruneError(f"training diverged at step {step} (loss {loss.item()}); lower lr or enable grad_clip")
        accel.backward(loss)
        if params.grad_clip:
            accel.clip_grad_norm_(net.parameters(), params.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _ema_update(ema, accel.unwrap_model(net), params, step)
        losses.append(accel.gather(loss.detach()[None]).mean().item())
        bar.update(1)
        if (step + 1) % params.log_every == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-params.log_every:]):.4f}")
        done = step + 1
        if done % params.checkpoint_every == 0 or done == params.steps:
            if accel.is_main_process:
                state = {"losses": losses, "seed": params.seed, "world_size": world}
                weights = accel.unwrap_model(net).state_dict()
                save_checkpoint(ckpt_dir, done, weights, ema, optimizer.state_dict(), state, params.keep_checkpoints)
            accel.wait_for_everyone()
            if on_checkpoint is not None:
                on_checkpoint(done)
    bar.close()
    if params.gradient_checkpointing:  # a training setting, not part of the model handed back
        model.unet.disable_gradient_checkpointing()
    final = copy.deepcopy(accel.unwrap_model(net)).cpu().eval()
    dtype = next(final.parameters()).dtype
    final.load_state_dict({k: v.to(dtype) if v.dtype.is_floating_point else v for k, v in ema.items()})
    seconds = time.perf_counter() - t0
    if joint:
        return TrainResult(final.unet, losses, params.steps, resumed, seconds, world,
                           final.embedding.requires_grad_(False))
    return TrainResult(final, losses, params.steps, resumed, seconds, world)


def _with_condition(model: Diffusion, distillation: Distillation | None) -> torch.nn.Module:
    """The unet and its conditioner as one module to train, once the conditioner may train and a teacher
    keeps a conditioner of its own (sharing the one that trains would move the teacher's targets)."""
    if not model.condition.trainable:
        raise DiffpruneError("only a label embedding can be trained with the unet (text encoders stay frozen)")
    if distillation is not None and (distillation.teacher.condition is None
                                     or distillation.teacher.condition.module is model.condition.module):
        raise DiffpruneError("distilling while the label embedding trains needs the teacher's own conditioner")
    return _WithCondition(model.unet, model.condition)


class _WithCondition(torch.nn.Module):
    """A unet and the conditioner that feeds its cross-attention, trained as one module."""

    def __init__(self, unet: torch.nn.Module, condition: Condition) -> None:
        super().__init__()
        # ``embedding``: the name its weights have in checkpoints.
        self.unet, self.embedding = unet, condition.module.requires_grad_(True)
        self.condition = condition

    def forward(self, x: torch.Tensor, t: torch.Tensor, values: list) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=self.condition.embed(values, x.device)).sample


def _conditions(condition: Condition, conditioning: Conditioning, idx: torch.Tensor, gen: torch.Generator) -> list:
    """The batch's conditions, each replaced by the null condition with probability ``conditioning.dropout``."""
    values = [conditioning.values[i] for i in idx.tolist()]
    if conditioning.dropout > 0:
        drop = (torch.rand(len(values), generator=gen) < conditioning.dropout).tolist()
        values = [condition.null() if d else v for v, d in zip(values, drop, strict=True)]
    # An image with several captions: each step trains on one of them, drawn from the step's generator.
    return [v[int(torch.randint(len(v), (1,), generator=gen))] if isinstance(v, list | tuple) else v
            for v in values]


def write_loss_history(losses: list[float], path: str | Path) -> None:
    """CSV (step, loss) that ``dvc plots`` and spreadsheets read directly."""
    with atomic_file(path) as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", "loss"])
        writer.writerows((i + 1, f"{v:.6f}") for i, v in enumerate(losses))


def is_main_process() -> bool:
    """Rank 0 under ``accelerate launch``/``torchrun``; always true in a single process."""
    return PartialState(cpu=not torch.cuda.is_available()).is_main_process


def _timesteps(n: int, T: int, antithetic: bool, gen: torch.Generator) -> torch.Tensor:
    if not antithetic:
        return torch.randint(0, T, (n,), generator=gen)
    half = torch.randint(0, T, (n // 2 + 1,), generator=gen)
    return torch.cat([half, T - 1 - half])[:n]


def _batch_indices(step: int, rank: int, world: int, params: TrainParams, n: int, perms: dict) -> torch.Tensor:
    """Rank ``rank``'s slice of the global batch at ``step``: epochs are seeded permutations."""
    start = (step * world + rank) * params.batch_size
    pos = torch.arange(start, start + params.batch_size)
    epochs, offsets = pos // n, pos % n
    out = torch.empty_like(pos)
    for epoch in epochs.unique().tolist():
        if epoch not in perms:
            perms.clear()  # only the current and next epoch are ever needed
            gen = torch.Generator().manual_seed(derive_seed(params.seed, epoch, -1))
            perms[epoch] = torch.randperm(n, generator=gen)
        mask = epochs == epoch
        out[mask] = perms[epoch][offsets[mask]]
    return out


def _ema_update(ema: dict, model: torch.nn.Module, params: TrainParams, step: int) -> None:
    decay = params.ema_decay
    if params.ema_warmup:
        decay = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                ema[name].mul_(decay).add_(value.float().to(ema[name].device), alpha=1 - decay)
            else:
                ema[name].copy_(value)


def _load_weights(model: torch.nn.Module, sd: dict, path: Path) -> None:
    try:
        model.load_state_dict(sd)
    except RuntimeError:
        raise DiffpruneError(f"{path}: checkpoint weights do not fit this model; delete it to start over") from None
