"""What a training run takes besides the model and its data (conditioning, distillation), and what it gives."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from diffprune.family.diffusion import Diffusion

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Conditioning:
    """What a conditional model trains on besides its inputs; the model's own conditioner embeds it."""

    values: Sequence  # one condition per training input (labels or captions)
    dropout: float = 0.0  # share replaced by the null condition: what classifier-free guidance needs
    train_embedding: bool = False  # train the conditioner with the unet (``trainable`` ones: a label embedding)


@dataclass(frozen=True)
class Distillation:
    """Distil from ``teacher``: the target is weight·ε_teacher + (1 − weight)·ε (the paper's KD loss)."""

    teacher: Diffusion  # its denoiser, and its own conditioner for when the student's trains
    weight: float


@dataclass
class TrainResult:
    model: torch.nn.Module  # the denoiser's EMA weights, on the CPU
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    resumed_from: int | None = None
    seconds: float = 0.0
    world_size: int = 1
    condition: torch.nn.Module | None = None  # the conditioner's EMA weights when trained with the unet

    @property
    def final_loss(self) -> float:
        """Mean loss of the last 50 steps: one step's loss is too noisy to report."""
        tail = self.losses[-50:]
        return float(sum(tail) / len(tail)) if tail else float("nan")

    def trained(self, model: Diffusion) -> Diffusion:
        """``model`` around the trained denoiser, and its trained conditioner when that trained too."""
        model = model.with_unet(self.model)
        if self.condition is None:
            return model
        return dataclasses.replace(model, condition=model.condition.with_module(self.condition))
