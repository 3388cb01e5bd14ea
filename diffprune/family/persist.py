"""Pickle-free persistence of (possibly pruned) UNets: safetensors weights + a JSON architecture.

Pruning changes module widths that a diffusers config cannot express: a config gives one width per
block (``block_out_channels``) from which every layer's width is derived, while pruning gives each
dependency group its own width (a ResNet's inner channels, an attention layer's inner width, the time
embedding). So next to the base config we record, for every module that owns tensors or width
attributes, its class, its integer width attributes and the shape of each tensor. Loading builds the
base model from its config, resizes exactly those modules, and loads the weights strictly: an exact
replica, and nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from safetensors import SafetensorError
from safetensors.torch import load_file

from diffprune.common.errors import DiffpruneError, first_line

ARCH_FILE = "architecture.json"
# Width attributes that modules keep besides their tensors (torch and diffusers names).
_WIDTH_ATTRS = (
    "in_channels", "out_channels", "in_features", "out_features", "num_channels", "num_features",
    "channels", "heads", "inner_dim", "inner_kv_dim", "query_dim", "out_dim",
)
_SHAPE_ATTRS = ("normalized_shape",)  # LayerNorm: a tuple of widths
_FORMAT = "diffprune-architecture/1"
DENOISERS = {cls.__name__: cls for cls in (UNet2DModel, UNet2DConditionModel)}


def denoiser_class(unet: torch.nn.Module) -> type:
    """The diffusers class a denoiser is (``UNet2DModel`` or ``UNet2DConditionModel``), through any subclass."""
    return next((c for c in type(unet).__mro__ if c in DENOISERS.values()), type(unet))


def describe(unet: torch.nn.Module) -> dict:
    """The JSON architecture: base config plus every module's widths and tensor shapes."""
    modules = {}
    for name, module in unet.named_modules():
        tensors = {k: list(v.shape) for k, v in module.named_parameters(recurse=False)}
        tensors.update({k: list(v.shape) for k, v in module.named_buffers(recurse=False) if v is not None})
        # The root's widths live in its config (and reading them as attributes is deprecated in diffusers).
        attrs = {} if module is unet else {
            a: getattr(module, a) for a in _WIDTH_ATTRS if isinstance(getattr(module, a, None), int)
        }
        attrs.update({a: list(getattr(module, a)) for a in _SHAPE_ATTRS if isinstance(getattr(module, a, None), tuple)})
        if tensors or attrs:
            modules[name] = {"type": type(module).__name__, "attrs": attrs, "tensors": tensors}
    return {"format": _FORMAT, "class": denoiser_class(unet).__name__, "config": _jsonable(dict(unet.config)),
            "modules": modules}


def rebuild(arch: dict, source: str, cls: type | None = None) -> torch.nn.Module:
    """An uninitialised-width-correct denoiser matching ``arch`` (weights still to be loaded); ``cls``: a
    subclass of the recorded class to build instead (the portable classes)."""
    base = DENOISERS.get(arch.get("class", "UNet2DModel"))  # files of diffprune <0.3 name no class
    if cls is not None and base is not None and not issubclass(cls, base):
        raise DiffpruneError(f"{source}: holds a {base.__name__}, not a {cls.__name__}")
    if arch.get("format") != _FORMAT:
        raise DiffpruneError(f"{source}: unknown architecture format {arch.get('format')!r}")
    cls = cls if base is not None and cls is not None else base
    if cls is None:
        raise DiffpruneError(f"{source}: class {arch.get('class')!r} is not one of {', '.join(DENOISERS)}")
    try:
        unet = cls.from_config(arch["config"])
    except (TypeError, ValueError, KeyError) as exc:
        raise DiffpruneError(f"{source}: invalid base config ({exc})") from None
    named = dict(unet.named_modules())
    for name, spec in arch["modules"].items():
        module = named.get(name)
        if module is None or type(module).__name__ != spec["type"]:
            raise DiffpruneError(f"{source}: module {name!r} ({spec['type']}) does not exist in the base model")
        for attr, value in spec["attrs"].items():
            setattr(module, attr, tuple(value) if attr in _SHAPE_ATTRS else value)
        for tname, shape in spec["tensors"].items():
            old = getattr(module, tname, None)
            if not isinstance(old, torch.Tensor):
                raise DiffpruneError(f"{source}: {name}.{tname} is not a tensor of the base model")
            new = torch.empty(shape, dtype=old.dtype)
            if isinstance(old, torch.nn.Parameter):
                setattr(module, tname, torch.nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                module._buffers[tname] = new
        if isinstance(module, torch.nn.GroupNorm) and module.num_channels % module.num_groups:
            raise DiffpruneError(f"{source}: {name} has {module.num_channels} channels for {module.num_groups} groups")
    return unet


def load_exact(unet_dir: Path, cls: type | None = None) -> torch.nn.Module:
    """Load ``unet_dir`` (``architecture.json`` + safetensors) into an exact replica (of class ``cls``, a
    subclass of the recorded one, when given)."""
    arch_path = unet_dir / ARCH_FILE
    try:
        arch = json.loads(arch_path.read_text())
    except (OSError, ValueError) as exc:
        raise DiffpruneError(f"{arch_path}: unreadable architecture ({type(exc).__name__})") from None
    unet = rebuild(arch, str(arch_path), cls)
    weights = unet_dir / "diffusion_pytorch_model.safetensors"
    try:
        state = load_file(weights)
    except (OSError, SafetensorError) as exc:
        raise DiffpruneError(f"{weights}: not a valid safetensors file ({first_line(exc, 160)})") from None
    expected = unet.state_dict()
    for key, tensor in state.items():
        if key not in expected:
            raise DiffpruneError(f"{weights}: tensor {key!r} is not part of the architecture in {ARCH_FILE}")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise DiffpruneError(
                f"{weights}: {key} has shape {tuple(tensor.shape)} but {ARCH_FILE} says {tuple(expected[key].shape)}"
            )
    missing = sorted(set(expected) - set(state))
    if missing:
        raise DiffpruneError(f"{weights}: missing {len(missing)} tensors of the architecture, e.g. {missing[0]}")
    unet.load_state_dict(state, strict=True)
    return unet.eval()


def _jsonable(cfg: dict) -> dict:
    return json.loads(json.dumps({k: v for k, v in cfg.items() if not k.startswith("_")}, default=list))
