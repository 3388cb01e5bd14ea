"""Build, save and load diffusion models (a diffusers ``UNet2DModel`` plus its noise scheduler).

A model directory has the diffusers pipeline layout (``model_index.json``, ``unet/config.json``,
``unet/diffusion_pytorch_model.safetensors``, ``scheduler/scheduler_config.json``), so
``DDPMPipeline.from_pretrained(dir)`` also works for users who do not use diffprune.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from diffprune.atomic import atomic_dir
from diffprune.config import ArchParams
from diffprune.errors import DiffpruneError
from diffprune.persist import ARCH_FILE, describe, load_exact

BUILTIN_TEACHER = Path(__file__).parent / "assets" / "teacher-digits16"


def build_unet(arch: ArchParams, resolution: int, channels: int) -> UNet2DModel:
    """A from-scratch UNet; ``attention_head_dim=None`` gives one head per block, as the paper's CIFAR model."""
    levels = range(len(arch.block_out_channels))
    down = tuple("AttnDownBlock2D" if i in arch.attention_levels else "DownBlock2D" for i in levels)
    up = tuple("AttnUpBlock2D" if i in arch.attention_levels else "UpBlock2D" for i in reversed(levels))
    return UNet2DModel(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=arch.block_out_channels,
        layers_per_block=arch.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=arch.norm_num_groups,
        attention_head_dim=None,
        dropout=arch.dropout,
    )


def make_scheduler(num_train_timesteps: int = 1000) -> DDPMScheduler:
    """DDPM's linear β schedule 1e-4 → 0.02, ε-prediction, as the paper and its pretrained models."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type="epsilon",
        clip_sample=True,
    )


def save_model(unet: UNet2DModel, scheduler: DDPMScheduler, out_dir: str | Path) -> Path:
    """Write weights (safetensors), configs and the exact architecture (JSON) atomically; never a pickle."""
    with atomic_dir(out_dir) as tmp:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
        (tmp / "unet" / ARCH_FILE).write_text(json.dumps(describe(unet), indent=1))
    return Path(out_dir)


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[UNet2DModel, DDPMScheduler]:
    """Load a model directory written by :func:`save_model` or by diffusers' ``save_pretrained``."""
    model_dir = Path(model_dir)
    unet_dir = model_dir / "unet"
    if not (unet_dir / "config.json").is_file():
        raise DiffpruneError(f"{model_dir}: not a model directory (expected unet/config.json)")
    weights = [p for p in unet_dir.iterdir() if p.suffix == ".safetensors"]
    if not weights:
        raise DiffpruneError(f"{unet_dir}: no .safetensors weights (pickled .bin weights are not loaded)")
    if (unet_dir / ARCH_FILE).is_file():
        unet = load_exact(unet_dir)  # diffprune's own layout; pruned widths included
    else:
        try:
            unet = UNet2DModel.from_pretrained(unet_dir, use_safetensors=True)
        except Exception as exc:  # diffusers/safetensors raise many types; the user needs which file failed
            raise DiffpruneError(f"{unet_dir}: cannot load weights ({_first_line(exc)})") from None
    scheduler = _load_scheduler(model_dir, unet)
    return unet.to(device).eval(), scheduler


def load_pipeline(model_dir: str | Path, kind: str = "ddim", device: str | torch.device = "cpu"):
    """A ready diffusers ``DDIMPipeline`` or ``DDPMPipeline`` for a saved (possibly pruned) model."""
    from diffusers import DDIMPipeline, DDIMScheduler

    unet, scheduler = load_model(model_dir, device)
    if kind == "ddim":
        return DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(scheduler.config))
    if kind == "ddpm":
        return DDPMPipeline(unet=unet, scheduler=scheduler)
    raise DiffpruneError(f"pipeline kind {kind!r}: expected 'ddim' or 'ddpm'")


def load_pretrained(ref: str) -> tuple[UNet2DModel, DDPMScheduler]:
    """A local ``save_pretrained`` directory, or a hub id (downloaded when online, else from the HF cache)."""
    if Path(ref).exists():
        return load_model(ref)
    if ref.count("/") != 1 or ref.startswith((".", "/")):
        raise DiffpruneError(f"teacher.pretrained {ref!r}: no such directory, and not a hub id like owner/name")
    try:
        pipe = DDPMPipeline.from_pretrained(ref, use_safetensors=None)
    except Exception as exc:  # network, auth, missing repo: all mean "cannot get this model"
        raise DiffpruneError(
            f"teacher.pretrained {ref!r}: not in the local Hugging Face cache and cannot be downloaded "
            f"({_first_line(exc)}); download it once online, or point teacher.pretrained at a local directory"
        ) from None
    return pipe.unet.eval(), DDPMScheduler.from_config(pipe.scheduler.config)


def _load_scheduler(model_dir: Path, unet: UNet2DModel) -> DDPMScheduler:
    cfg = model_dir / "scheduler" / "scheduler_config.json"
    if not cfg.is_file():
        raise DiffpruneError(f"{model_dir}: missing scheduler/scheduler_config.json")
    try:
        return DDPMScheduler.from_config(json.loads(cfg.read_text()))
    except (ValueError, TypeError) as exc:
        raise DiffpruneError(f"{cfg}: invalid scheduler config ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_hash(unet: torch.nn.Module) -> str:
    """Content hash of a model: config, tensor names, shapes and values (not its file paths)."""
    h = hashlib.sha256(json.dumps(dict(unet.config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(unet.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
