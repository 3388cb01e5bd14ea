"""Model cost as the paper counts it: MACs of one denoiser call at batch 1 and native resolution, and params.

A module of its own so that the stages which count MACs (prune, evaluate) do not depend on the FID code.
"""

from __future__ import annotations

import torch


def macs_and_params(unet: torch.nn.Module, inputs: dict[str, torch.Tensor] | None = None) -> tuple[int, int]:
    """MACs of one denoiser forward at batch 1 and native resolution, and the parameter count.

    ``inputs``: the call to count (a conditional model's context length changes its cross-attention
    cost); by default zeros of the configured widths and a context of length 1.
    """
    import torch_pruning as tp

    from diffprune.family.diffusion import example_inputs_for

    inputs = example_inputs_for(unet) if inputs is None else inputs
    # Positional (sample, timestep[, encoder_hidden_states]): the counter warns on keyword-only calls.
    macs, params = tp.utils.count_ops_and_params(unet, tuple(inputs.values()))
    return int(macs), int(params)
