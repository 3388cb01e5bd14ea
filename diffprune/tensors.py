"""The one conversion between stored images (NHWC uint8) and model inputs (NCHW float in [-1, 1])."""

from __future__ import annotations

import numpy as np
import torch


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """NHWC uint8 → NCHW float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
