"""The fast sampling path: one recipe for every place that generates images — evaluate (teacher and
student alike), the registered model's ``predict`` and :func:`diffprune.family.models.load_pipeline`.

What it does, and why these defaults (``benchmarks/efficiency.py`` measures each choice side by side):
- inference mode instead of ``no_grad`` (no autograd bookkeeping at all);
- reduced precision: ``auto`` is bf16 autocast on CUDA (fp16 where bf16 is missing) and fp32 on the CPU,
  because bf16 on a CPU changes samples by far more than float rounding — it is there to opt into;
- channels-last weights and activations: ``auto`` turns it on for CUDA (tensor-core convolutions); on
  the CPU it bought nothing measurable in fp32 and cost time in bf16;
- ``compile``: ``torch.compile`` of the denoiser, off by default (tens of seconds per model and shape
  before the first image; pays off only for long sampling runs);
- attention: diffusers' default processor already calls PyTorch's fused ``scaled_dot_product_attention``.
The scheduler arithmetic (x_t updates) always stays in fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from diffprune.pipeline.stage_params import FastPathParams

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULTS = FastPathParams()  # params.yaml's own defaults, for callers without a params file


@dataclass(frozen=True)
class FastPath:
    """:class:`FastPathParams` resolved for one device."""

    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None: fp32
    channels_last: bool
    compile: bool

    @property
    def precision(self) -> str:
        return next(name for name, dtype in DTYPES.items() if dtype == self.dtype)

    def describe(self) -> dict:
        return {"device": self.device.type, "precision": self.precision, "channels_last": self.channels_last,
                "compile": self.compile}


def resolve(params: FastPathParams | None, device: torch.device | str) -> FastPath:
    """Settle ``auto`` for ``device``; ``None`` params mean the plain path (fp32, nothing changed)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if params is None:
        return FastPath(device, None, False, False)
    precision = params.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    channels_last = cuda if params.channels_last == "auto" else bool(params.channels_last)
    return FastPath(device, DTYPES[precision], channels_last, params.compile)


def prepare(unet: nn.Module, fast: FastPath) -> nn.Module:
    """The denoiser to call: moved to the device, in eval mode, channels-last and compiled as asked.
    Channels-last is applied in place (the weights' values do not change; save from another copy)."""
    unet = unet.to(fast.device).eval()
    if fast.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    if fast.compile:
        unet = torch.compile(unet)
    return unet


@contextlib.contextmanager
def running(fast: FastPath) -> Iterator[None]:
    """Inference mode plus autocast at the chosen precision, for the denoiser calls and decoding."""
    autocast = (torch.autocast(fast.device.type, dtype=fast.dtype) if fast.dtype is not None
                else contextlib.nullcontext())
    with torch.inference_mode(), autocast:
        yield


def layout(x: torch.Tensor, fast: FastPath) -> torch.Tensor:
    """Inputs in the memory format the denoiser was prepared for."""
    return x.contiguous(memory_format=torch.channels_last) if fast.channels_last and x.dim() == 4 else x
