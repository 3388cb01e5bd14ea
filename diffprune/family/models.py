"""Build, save and load diffusion models of every family (:class:`diffprune.family.diffusion.Diffusion`).

A model directory has the diffusers pipeline layout (``model_index.json``, ``unet/``, ``scheduler/``
and, by family, ``vae/`` or ``vqvae/``, ``label_embedding/``, ``text_encoder/`` + ``tokenizer/``), so
``DiffusionPipeline`` / ``DDPMPipeline`` / ``LDMPipeline`` / ``StableDiffusionPipeline.from_pretrained(dir)``
also load it in the user's own code (``model_index.json`` names the pipeline; a pruned unet is named as
:mod:`diffprune.family.portable`'s class, which needs ``import diffprune`` first), and a class-conditional
folder loads with ``diffprune.ClassConditionalPipeline.from_pretrained(dir)``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel, VQModel

from diffprune.common.atomic import atomic_dir
from diffprune.common.errors import DiffpruneError, first_line
from diffprune.family import fast_path as inference
from diffprune.family import portable
from diffprune.family.conditioning import CONDITIONS, TextCondition
from diffprune.family.diffusion import Diffusion
from diffprune.family.persist import ARCH_FILE, DENOISERS, describe, load_exact
from diffprune.family.shipped import ASSETS, BUILTIN_TEACHER  # noqa: F401 (re-exported)
from diffprune.pipeline.stage_params import DDIM, DEFAULT_SAMPLER, SAMPLERS, ArchParams, FastPathParams


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


def make_scheduler(num_train_timesteps: int = 1000, clip_sample: bool = True) -> DDPMScheduler:
    """DDPM's linear β schedule 1e-4 → 0.02, ε-prediction, as the paper and its pretrained models
    (``clip_sample``: clip predicted x0 to [-1, 1], right for pixels, wrong for latents)."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type="epsilon",
        clip_sample=clip_sample,
    )


def save_model(unet: UNet2DModel, scheduler: DDPMScheduler, out_dir: str | Path) -> Path:
    """Save an unconditional pixel model (see :func:`save_diffusion`)."""
    return save_diffusion(Diffusion(unet, scheduler), out_dir)


def save_diffusion(model: Diffusion, out_dir: str | Path, extra: Callable[[Path], None] | None = None) -> Path:
    """Write every part atomically in the diffusers pipeline layout: weights as safetensors, configs and
    the denoiser's exact architecture as JSON, the tokenizer as its own files; never a pickle.
    ``extra(folder)`` adds files to the folder before it appears (e.g. cached latents)."""
    with atomic_dir(out_dir) as tmp:
        if extra is not None:
            extra(tmp)
        index = {"_class_name": _pipeline_class(model), "_diffusers_version": diffusers.__version__}
        for folder, module in model.modules().items():
            module.save_pretrained(tmp / folder, safe_serialization=True)
            library = type(module).__module__
            library = library.split(".")[0] if library.startswith(("diffusers.", "transformers.")) else library
            index[folder] = [library, type(module).__name__]
        index["unet"] = portable.index_entry(model.unet)  # stock diffusers loads pruned widths through it
        scheduler = model.source_scheduler or model.scheduler  # the teacher's own class and settings
        scheduler.save_pretrained(tmp / "scheduler")
        index["scheduler"] = ["diffusers", type(scheduler).__name__]
        tokenizer = getattr(model.condition, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "tokenizer")
            index["tokenizer"] = ["transformers", type(tokenizer).__name__]
        if index["_class_name"] == "StableDiffusionPipeline":
            index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        (tmp / "unet" / ARCH_FILE).write_text(json.dumps(describe(model.unet), indent=1))
    return Path(out_dir)


def _pipeline_class(model: Diffusion) -> str:
    """The pipeline that loads this folder as it is: a diffusers one, diffprune's own for class labels (none of
    diffusers' UNet pipelines takes them), "DiffusionPipeline" where none fits (diffprune's loader only)."""
    if model.condition is not None and model.condition.kind == "class":
        return portable.ClassConditionalPipeline.__name__
    ae = type(model.autoencoder).__name__ if model.autoencoder is not None else None
    return {("pixel-unconditional", None): "DDPMPipeline", ("latent-unconditional", "VQModel"): "LDMPipeline",
            ("latent-text", "AutoencoderKL"): "StableDiffusionPipeline"}.get((model.family, ae), "DiffusionPipeline")


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, DDPMScheduler]:
    """The denoiser and scheduler of a model folder (see :func:`load_diffusion` for the whole model)."""
    model = load_diffusion(model_dir, device)
    return model.unet, model.scheduler


def load_diffusion(model_dir: str | Path, device: str | torch.device = "cpu") -> Diffusion:
    """Load a folder written by :func:`save_diffusion` or by diffusers' ``save_pretrained`` (DDPM, LDM and
    Stable Diffusion pipelines as they are); the family is recognised by the parts it holds."""
    model_dir = Path(model_dir)
    unet_dir = model_dir / "unet"
    if not (unet_dir / "config.json").is_file():
        raise DiffpruneError(f"{model_dir}: not a model directory (expected unet/config.json)")
    if (unet_dir / ARCH_FILE).is_file():
        _need_safetensors(unet_dir)
        unet = load_exact(unet_dir)  # diffprune's own layout; pruned widths included
    else:
        cls = _class_of(unet_dir, DENOISERS, "unet")
        unet = _from_pretrained(cls, unet_dir)
    scheduler, source = _load_scheduler(model_dir)
    listed = _model_index(model_dir)
    autoencoder, ae_folder = None, "vae"
    for folder in ("vqvae", "vae"):
        if (model_dir / folder / "config.json").is_file():
            cls = _class_of(model_dir / folder, {"VQModel": VQModel, "AutoencoderKL": AutoencoderKL}, "autoencoder")
            # Frozen by use, not by requires_grad (conditioning.FROZEN): it then computes what stock diffusers does.
            autoencoder, ae_folder = _from_pretrained(cls, model_dir / folder).eval(), folder
            break
        if folder in listed and listed[folder][0]:
            raise DiffpruneError(f"{model_dir}: model_index.json lists {folder} but {folder}/config.json is missing")
    model = Diffusion(unet.eval(), scheduler, autoencoder, ae_folder, _load_condition(model_dir, unet), source)
    if autoencoder is not None and autoencoder.config.latent_channels != model.input_shape[0]:
        raise DiffpruneError(f"{model_dir}: the unet takes {model.input_shape[0]} channels but {ae_folder} makes "
                             f"{autoencoder.config.latent_channels}-channel latents")
    return model.to(device)


def _load_condition(model_dir: Path, unet: torch.nn.Module):
    if not getattr(unet.config, "cross_attention_dim", None):
        return None
    for kind in CONDITIONS:  # each kind knows its folder and how to load it
        if (model_dir / kind.folder / "config.json").is_file():
            return kind.load(model_dir, _from_pretrained)
    raise DiffpruneError(f"{model_dir}: the unet is conditional (cross-attention) but the folder has no "
                         + " or ".join(f"{kind.folder}/" for kind in CONDITIONS))


def _model_index(model_dir: Path) -> dict:
    path = model_dir / "model_index.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        raise DiffpruneError(f"{path}: not valid JSON") from None


def _class_of(folder: Path, allowed: dict, what: str):
    try:
        name = json.loads((folder / "config.json").read_text()).get("_class_name")
    except ValueError:
        raise DiffpruneError(f"{folder / 'config.json'}: not valid JSON") from None
    if name not in allowed:
        raise DiffpruneError(f"{folder}: {what} class {name!r} is not one of {', '.join(allowed)}")
    return allowed[name]


def _need_safetensors(folder: Path) -> None:
    if not any(p.suffix == ".safetensors" for p in folder.iterdir()):
        raise DiffpruneError(f"{folder}: no .safetensors weights (pickled .bin weights are not loaded)")


def _from_pretrained(cls, folder: Path):
    _need_safetensors(folder)
    try:
        return cls.from_pretrained(folder, use_safetensors=True)
    except Exception as exc:  # diffusers/transformers/safetensors raise many types; say which folder failed
        raise DiffpruneError(f"{folder}: cannot load weights ({first_line(exc)})") from None


def load_pipeline(model_dir: str | Path, kind: str = DEFAULT_SAMPLER, device: str | torch.device = "cpu",
                  fast: FastPathParams | None = inference.DEFAULTS):
    """A ready diffusers ``DDIMPipeline`` or ``DDPMPipeline`` for a saved (possibly pruned) pixel model, on
    the fast path ``fast`` for ``device`` (a pipeline runs outside our autocast, so reduced precision casts
    the denoiser's weights; None: plain fp32)."""
    from diffusers import DDIMPipeline, DDIMScheduler

    if kind not in SAMPLERS:
        raise DiffpruneError(f"pipeline kind {kind!r}: expected {' or '.join(map(repr, SAMPLERS))}")
    unet, scheduler = load_model(model_dir, device)
    path = inference.resolve(fast, device)
    unet = inference.prepare(unet, path)
    if path.dtype is not None:
        unet = unet.to(path.dtype)
    if kind == DDIM:
        return DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(scheduler.config))
    return DDPMPipeline(unet=unet, scheduler=scheduler)


def load_pretrained(ref: str, revision: str | None = None) -> Diffusion:
    """A local pipeline folder, or a hub id at ``revision`` (downloaded when online, else from the HF cache)."""
    if Path(ref).exists():
        return load_diffusion(ref)
    if ref.count("/") != 1 or ref.startswith((".", "/")):
        raise DiffpruneError(f"teacher.pretrained {ref!r}: no such directory, and not a hub id like owner/name")
    try:
        pipe = DiffusionPipeline.from_pretrained(ref, use_safetensors=None, revision=revision)
    except Exception as exc:  # network, auth, missing repo: all mean "cannot get this model"
        raise DiffpruneError(
            f"teacher.pretrained {ref!r}: not in the local Hugging Face cache and cannot be downloaded "
            f"({first_line(exc)}); download it once online, or point teacher.pretrained at a local directory"
        ) from None
    return _from_pipeline(pipe, ref)


def _from_pipeline(pipe, ref: str) -> Diffusion:
    """The parts of a loaded diffusers pipeline (DDPM, LDM, Stable Diffusion) as a :class:`Diffusion`."""
    unet = getattr(pipe, "unet", None)
    if type(unet).__name__ not in DENOISERS:
        raise DiffpruneError(f"teacher.pretrained {ref!r}: no UNet2DModel / UNet2DConditionModel in the pipeline")
    ae_folder = "vqvae" if getattr(pipe, "vqvae", None) is not None else "vae"
    autoencoder = getattr(pipe, ae_folder, None)
    condition = None
    if getattr(pipe, "text_encoder", None) is not None:
        condition = TextCondition(pipe.text_encoder, pipe.tokenizer)
    elif getattr(unet.config, "cross_attention_dim", None):
        raise DiffpruneError(f"teacher.pretrained {ref!r}: a conditional unet without a text encoder")
    if autoencoder is not None:
        autoencoder = autoencoder.eval()  # frozen by use (conditioning.FROZEN)
    source = None if type(pipe.scheduler) is DDPMScheduler else pipe.scheduler
    return Diffusion(unet.eval(), DDPMScheduler.from_config(pipe.scheduler.config), autoencoder, ae_folder, condition,
                     source)


def _load_scheduler(model_dir: Path) -> tuple[DDPMScheduler, object | None]:
    """The DDPM scheduler diffprune trains and scores with, and the folder's own scheduler when it is of
    another diffusers class (kept, so that every folder derived from it samples as the teacher did)."""
    cfg = model_dir / "scheduler" / "scheduler_config.json"
    if not cfg.is_file():
        raise DiffpruneError(f"{model_dir}: missing scheduler/scheduler_config.json")
    try:
        config = json.loads(cfg.read_text())
        cls = getattr(diffusers, str(config.get("_class_name", "DDPMScheduler")), None)
        known = isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin) and cls is not DDPMScheduler
        source = cls.from_config(config) if known else None  # an unknown class: DDPM settings only, as before
        return DDPMScheduler.from_config(config), source
    except (ValueError, TypeError) as exc:
        raise DiffpruneError(f"{cfg}: invalid scheduler config ({first_line(exc)})") from None


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_hash(unet: torch.nn.Module) -> str:
    """Content hash of a model: config, tensor names, shapes and values (not its file paths)."""
    cfg = unet.config.to_dict() if hasattr(unet.config, "to_dict") else dict(unet.config)  # transformers / diffusers
    # Private keys are bookkeeping, not architecture: a freshly built diffusers model lists its defaulted
    # arguments in set order (`_use_default_values`), which differs between processes, and a loaded one not at
    # all — with them, a scratch teacher's checkpoints would never resume in a new process.
    cfg = {k: v for k, v in cfg.items() if not str(k).startswith("_")}
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, tensor in sorted(unet.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
