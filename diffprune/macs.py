"""Model cost as the paper counts it: MACs of one forward at batch 1 and native resolution, and params.

A module of its own so that the stages which count MACs (prune, evaluate) do not depend on the FID code.
"""

from __future__ import annotations

import torch


def macs_and_params(unet: torch.nn.Module) -> tuple[int, int]:
    """MACs of one UNet forward at batch 1 and native resolution, and the parameter count."""
    import torch_pruning as tp

    cfg = unet.config
    device = next(unet.parameters()).device
    x = torch.zeros(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device)
    macs, params = tp.utils.count_ops_and_params(unet, (x, torch.ones(1, dtype=torch.long, device=device)))
    return int(macs), int(params)
