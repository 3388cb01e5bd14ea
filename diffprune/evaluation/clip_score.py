"""CLIP score of generated images against their prompts: 100 · max(cos(image, text), 0) averaged, as
torchmetrics and the text-to-image literature report it. Needs a CLIP model (``evaluate.clip_model``:
a hub id or a local folder); without one, or offline without a cached copy, it is reported as absent
with the reason, never as a number."""

from __future__ import annotations

import numpy as np
import torch

from diffprune.common.errors import first_line


class ClipScorer:
    def __init__(self, model=None, processor=None, device: torch.device | str = "cpu", reason: str = "") -> None:
        self.model, self.processor, self.device, self.reason = model, processor, device, reason

    @property
    def available(self) -> bool:
        return self.model is not None

    @torch.no_grad()
    def score(self, images: np.ndarray, prompts: list[str], batch_size: int = 64) -> float:
        values = []
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            if batch.shape[-1] == 1:
                batch = np.repeat(batch, 3, axis=-1)
            inputs = self.processor(text=list(prompts[start:start + batch_size]), images=list(batch),
                                    return_tensors="pt", padding=True, truncation=True).to(self.device)
            out = self.model(**inputs)
            img = torch.nn.functional.normalize(out.image_embeds, dim=-1)
            txt = torch.nn.functional.normalize(out.text_embeds, dim=-1)
            values.append((100 * (img * txt).sum(-1)).clamp(min=0).cpu())
        return float(torch.cat(values).mean())


def clip_scorer(name: str | None, device: torch.device | str = "cpu") -> ClipScorer:
    """A scorer for ``name``, or an unavailable one that says why."""
    if not name:
        return ClipScorer(reason="evaluate.clip_model is not set")
    try:
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(name).to(device).eval()
        processor = CLIPProcessor.from_pretrained(name)
    except Exception as exc:  # offline, missing files, not a CLIP model: all mean "no CLIP score"
        return ClipScorer(reason=f"CLIP model {name!r} cannot be loaded ({first_line(exc, 160)})")
    return ClipScorer(model, processor, device)
