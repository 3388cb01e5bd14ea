"""The channel score of the code behind the paper's tables (``ddpm_exp``'s vendored ``TaylorImportance``),
for ``score.variant: paper``; both ``diff-pruning`` (their ``ours``) and ``taylor`` rank with it, only the
visited timesteps differ.

Per channel of a dependency group: the squared per-weight Taylor terms Σ_k (w_k·∂L/∂w_k)² of every
Conv2d / Linear entry that the channel's removal touches — its output-channel rows and its input-channel
columns alike — plus |γ·∂L/∂γ| of GroupNorm scales, summed across entries without normalisation. (Not the
Σ|w·∂L/∂w| of the diffusers path nor the |θ·∇L| of the paper's Fig. 1: the squares weigh a channel by its
largest terms.) Entries are aligned to the group's channels by torch-pruning's root indices.
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

OUT = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)
IN = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)


class PaperTaylorImportance:
    """Call with a torch-pruning group (gradients in ``.grad``) → one score per channel of the group."""

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        total, used = None, False
        for item in group:
            local = _entry_score(item.dep.target.module, item.dep.handler, item.idxs)
            if local is None:
                continue
            if total is None:
                total = torch.zeros(len(group[0].idxs), dtype=torch.float64)
            total.index_add_(0, torch.as_tensor(item.root_idxs, dtype=torch.long), local.double().cpu())
            used = True
        return total.float() if used else None


def _entry_score(layer: nn.Module, handler, idxs) -> torch.Tensor | None:
    weight = getattr(layer, "weight", None)
    if weight is None or weight.grad is None:
        return None
    idxs = torch.as_tensor(list(idxs), dtype=torch.long, device=weight.device)
    if isinstance(layer, nn.Conv2d | nn.Linear) and handler in OUT:
        w, g = weight[idxs].flatten(1), weight.grad[idxs].flatten(1)
        return ((w * g) ** 2).sum(1)
    if isinstance(layer, nn.Conv2d | nn.Linear) and handler in IN:
        w, g = weight.transpose(0, 1)[idxs].flatten(1), weight.grad.transpose(0, 1)[idxs].flatten(1)
        return ((w * g) ** 2).sum(1)
    if isinstance(layer, nn.GroupNorm) and layer.affine and handler == tp.prune_groupnorm_out_channels:
        return (weight[idxs] * weight.grad[idxs]).abs()
    return None
