"""Which device a stage runs on: one rule for every stage that has a ``device`` param."""

from __future__ import annotations

import torch


def resolve_device(choice: str) -> torch.device:
    """``auto`` takes CUDA when present; ``cuda`` and ``cpu`` are taken as asked."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")
