"""Model cost as the paper counts it: MACs of one denoiser call at batch 1 and native resolution, and params.

Counted on a weightless copy on the meta device: the counter only reads shapes, so no weights are copied
and no arithmetic is done (an SD-sized UNet costs no memory and a fraction of a second to count).
A module of its own so that the stages which count MACs (prune, evaluate) do not depend on the FID code.
"""

from __future__ import annotations

import copy

import torch


def weightless(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` whose parameters and buffers live on the meta device (shapes only)."""
    memo: dict[int, torch.Tensor] = {}
    for p in module.parameters():
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def macs_and_params(unet: torch.nn.Module, inputs: dict[str, torch.Tensor] | None = None) -> tuple[int, int]:
    """MACs of one denoiser forward at batch 1 and native resolution, and the parameter count.

    ``inputs``: the call to count (a conditional model's context length changes its cross-attention
    cost); by default zeros of the configured widths and a context of length 1.
    """
    import torch_pruning as tp

    from diffprune.family.diffusion import example_inputs_for

    inputs = example_inputs_for(unet) if inputs is None else inputs
    shadow = unet if next(unet.parameters()).is_meta else weightless(unet)
    # Positional (sample, timestep[, encoder_hidden_states]): the counter warns on keyword-only calls.
    macs, params = tp.utils.count_ops_and_params(shadow, tuple(v.to("meta") for v in inputs.values()))
    return int(macs), int(params)
