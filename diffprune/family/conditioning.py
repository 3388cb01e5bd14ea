"""What a conditional denoiser is conditioned on: class labels or text, turned into a context sequence.

Both feed the UNet's cross-attention as ``encoder_hidden_states`` (B, L, D), the way the paper's
ImageNet LDM feeds its class and Stable Diffusion its prompt. Each has a null condition for
classifier-free guidance: a reserved extra label, or the empty prompt. Encoders are frozen: they are
saved with the model, never pruned or trained by diffprune.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from diffprune.common.errors import DiffpruneError


class LabelEmbedding(ModelMixin, ConfigMixin):
    """A learned embedding of ``num_classes`` labels plus one null label (index ``num_classes``)."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding(labels)[:, None, :]  # a context of length 1


class Condition(Protocol):
    """The interface a family needs from its conditioner."""

    kind: str  # "class" or "text"
    module: nn.Module  # the frozen encoder, saved under ``folder``
    folder: str

    def embed(self, values: list, device: torch.device) -> torch.Tensor: ...

    def null(self) -> object: ...

    def check(self, values: list, source: str) -> None: ...


class ClassCondition:
    """Integer labels 0..num_classes-1; the null label is ``num_classes``."""

    kind = "class"
    folder = "label_embedding"

    def __init__(self, module: LabelEmbedding) -> None:
        self.module = module.eval().requires_grad_(False)
        self.num_classes = int(module.config.num_classes)

    def embed(self, values: list, device: torch.device) -> torch.Tensor:
        labels = torch.as_tensor(np.asarray(values, dtype=np.int64), device=device)
        return self.module.to(device)(labels)

    def null(self) -> int:
        return self.num_classes

    def check(self, values: list, source: str) -> None:
        labels = np.asarray(values)
        if labels.size and (labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= self.num_classes):
            bad = labels[(labels < 0) | (labels >= self.num_classes)][:1].tolist() if labels.dtype.kind in "iu" else []
            raise DiffpruneError(f"{source}: labels must be integers in 0..{self.num_classes - 1}"
                                 + (f" (got {bad[0]})" if bad else ""))


class TextCondition:
    """Prompts, tokenized and encoded by a frozen text encoder (CLIP's last hidden state, as Stable Diffusion)."""

    kind = "text"
    folder = "text_encoder"

    def __init__(self, module: nn.Module, tokenizer) -> None:
        self.module = module.eval().requires_grad_(False)
        self.tokenizer = tokenizer

    def embed(self, values: list, device: torch.device) -> torch.Tensor:
        tokens = self.tokenizer(list(values), padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        with torch.no_grad():
            return self.module.to(device)(tokens.input_ids.to(device))[0]

    def null(self) -> str:
        return ""

    def check(self, values: list, source: str) -> None:
        bad = next((v for v in values if not isinstance(v, str)), None)
        if bad is not None:
            raise DiffpruneError(f"{source}: prompts must be strings (got {bad!r})")
