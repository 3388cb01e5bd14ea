"""What a conditional denoiser is conditioned on: class labels or text, turned into a context sequence.

Both feed the UNet's cross-attention as ``encoder_hidden_states`` (B, L, D), the way the paper's
ImageNet LDM feeds its class and Stable Diffusion its prompt. Each has a null condition for
classifier-free guidance: a reserved extra label, or the empty prompt. Encoders are saved with the model
and never pruned; only a label embedding may be fine-tuned with the denoiser (``trainable``).

Everything that differs between condition kinds is a member of its class here — where a prepared split
keeps its conditions, which ones evaluation samples, whether it may train, which metric judges it, the
registered model's request column — so a new kind is one class, added to :data:`CONDITIONS`.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from diffprune.common.errors import DiffpruneError, first_line

# FROZEN: how the parts that never train (autoencoders, text encoders, a label embedding that does not train) stay
# frozen. Not by ``requires_grad_(False)``: on the CPU that flag alone changes what some layers compute (aten's matmul
# folds a 3-D input into one mm when the weight requires grad, even under no_grad, and takes a bmm otherwise; an
# attention block's transposed input then rounds differently, ~1e-7 per layer), and stock diffusers leaves it True,
# so a frozen copy would not generate what ``DiffusionPipeline.from_pretrained`` of the same folder does. Instead
# they keep the flag as loaded, run only under no_grad (``embed`` here, ``Diffusion.encode``/``decode``), and no
# optimizer ever holds them: the training loop optimises the unet (and a label embedding it trains) only.


class LabelEmbedding(ModelMixin, ConfigMixin):
    """A learned embedding of ``num_classes`` labels plus one null label (index ``num_classes``)."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding(labels)[:, None, :]  # a context of length 1


def request_int(value: object, name: str, row: int, minimum: int | None = None) -> int:
    """An integer field of a registered model's request row (a label; ``num_images``, ``seed``, ``steps``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value).is_integer():
        raise ValueError(f"row {row}: {name} must be an integer (got {value!r})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"row {row}: {name} must be >= {minimum} (got {value})")
    return value


class Condition(Protocol):
    """The interface a family needs from its conditioner."""

    kind: str  # a label for the family's name: "class" or "text"
    module: nn.Module  # the encoder, saved under ``folder``
    folder: str
    trainable: bool  # may be fine-tuned together with the denoiser (finetune.train_label_embedding)
    clip_score: bool  # evaluate scores images against their conditions with CLIP
    class_accuracy: bool  # evaluate reports the share of images the project's classifier assigns their condition
    column: str  # the registered model's request column that carries the condition
    column_type: str  # that column's MLflow schema type
    request: str  # what a request must give, for error messages ("a label")

    def embed(self, values: list, device: torch.device) -> torch.Tensor: ...

    def null(self) -> object: ...

    def check(self, values: list, source: str) -> None: ...

    def values(self, data, split: str) -> list | np.ndarray:
        """The condition of every image of a prepared ``split`` ("train" or "test")."""
        ...

    def sample_values(self, data, n: int) -> list:
        """The conditions of ``n`` evaluation samples."""
        ...

    def training_values(self, data) -> Sequence:
        """What training draws from for each training image: its condition, or a list of alternatives (an
        image's several captions) of which every step picks one."""
        ...

    def parse_request(self, value: object, row: int) -> object | None:
        """A request's ``column`` value as a condition; None when it cannot be one (the caller then says what
        the model needs); ValueError for one of the right type but out of range."""
        ...

    @classmethod
    def load(cls, model_dir: Path, from_pretrained: Callable) -> Condition:
        """The conditioner saved in ``model_dir / folder`` (``from_pretrained(cls, folder)`` loads a part)."""
        ...

    def with_module(self, module: nn.Module) -> Condition:
        """The same conditioner around ``module`` (its fine-tuned weights)."""
        ...


class ClassCondition:
    """Integer labels 0..num_classes-1; the null label is ``num_classes``."""

    kind = "class"
    folder = "label_embedding"
    trainable = True  # as cin256-v2 trains its class embedder
    clip_score = False
    class_accuracy = True
    column, column_type, request = "label", "long", "a label"

    def __init__(self, module: LabelEmbedding) -> None:
        self.module = module.eval()  # requires_grad stays as loaded: see FROZEN
        self.num_classes = int(module.config.num_classes)

    def embed(self, values: list, device: torch.device) -> torch.Tensor:
        labels = torch.as_tensor(np.asarray(values, dtype=np.int64), device=device)
        # Frozen (eval mode, as loaded), it embeds without autograd, so no loss reaches it (FROZEN); only the
        # training loop puts it in training mode, when it trains it with the unet (finetune.train_label_embedding).
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.module.training):
            return self.module.to(device)(labels)

    def null(self) -> int:
        return self.num_classes

    def check(self, values: list, source: str) -> None:
        labels = np.asarray(values)
        if labels.size and (labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= self.num_classes):
            bad = labels[(labels < 0) | (labels >= self.num_classes)][:1].tolist() if labels.dtype.kind in "iu" else []
            raise DiffpruneError(f"{source}: labels must be integers in 0..{self.num_classes - 1}"
                                 + (f" (got {bad[0]})" if bad else ""))

    def values(self, data, split: str) -> np.ndarray:
        labels = data.train_labels if split == "train" else data.test_labels
        self.check(labels.tolist(), f"prepared {split} labels")
        return labels

    def sample_values(self, data, n: int) -> list[int]:
        """Classes in turn: a class-balanced set."""
        return [i % self.num_classes for i in range(n)]

    def training_values(self, data) -> np.ndarray:
        return self.values(data, "train")

    def parse_request(self, value: object, row: int) -> int:
        # Only the sign here: the classes' range is checked with the batch's conditions (``check``).
        return request_int(value, self.column, row, minimum=0)

    @classmethod
    def load(cls, model_dir: Path, from_pretrained: Callable) -> ClassCondition:
        return cls(from_pretrained(LabelEmbedding, model_dir / cls.folder))

    def with_module(self, module: LabelEmbedding) -> ClassCondition:
        return ClassCondition(module)


class TextCondition:
    """Prompts, tokenized and encoded by a frozen text encoder (CLIP's last hidden state, as Stable Diffusion)."""

    kind = "text"
    folder = "text_encoder"
    trainable = False  # text encoders always stay frozen
    clip_score = True
    class_accuracy = False
    column, column_type, request = "prompt", "string", "a prompt string"

    def __init__(self, module: nn.Module, tokenizer) -> None:
        self.module = module.eval()  # requires_grad stays as loaded: see FROZEN
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

    def values(self, data, split: str) -> list[str]:
        """One caption per image: the first of an image's several (scoring and evaluation use it)."""
        return [c if isinstance(c, str) else c[0] for c in self.training_values(data, split)]

    def training_values(self, data, split: str = "train") -> list[str | list[str]]:
        captions = (data.captions or {}).get(split)
        if captions is None:
            raise DiffpruneError("the model is text-conditional but the prepared data has no captions; set "
                                 "data.caption_template or data.captions and re-run prepare")
        return captions

    def sample_values(self, data, n: int) -> list[str]:
        """The held-out captions in turn."""
        captions = self.values(data, "test")
        return [captions[i % len(captions)] for i in range(n)]

    def parse_request(self, value: object, row: int) -> str | None:
        return value if isinstance(value, str) else None

    @classmethod
    def load(cls, model_dir: Path, from_pretrained: Callable) -> TextCondition:
        try:
            from transformers import AutoTokenizer, CLIPTextModel
        except ImportError:
            raise DiffpruneError(f"{model_dir}: a text-conditional model needs the transformers package") from None
        if not (model_dir / "tokenizer").is_dir():
            raise DiffpruneError(f"{model_dir}: {cls.folder}/ without tokenizer/")
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir / "tokenizer")
        except Exception as exc:  # transformers raises many types for a damaged tokenizer folder
            raise DiffpruneError(f"{model_dir / 'tokenizer'}: cannot load the tokenizer ({first_line(exc)})") from None
        return cls(from_pretrained(CLIPTextModel, model_dir / cls.folder), tokenizer)

    def with_module(self, module: nn.Module) -> TextCondition:
        return TextCondition(module, self.tokenizer)


# Every condition kind, in the order of the registered model's request columns.
CONDITIONS: tuple[type[Condition], ...] = (ClassCondition, TextCondition)
