"""Structural pruning of diffusers UNets (``UNet2DModel``, ``UNet2DConditionModel``) with the paper's
channel-count semantics.

torch-pruning's dependency graph finds the coupled groups (skip connections, q/k/v, GroupNorm);
we choose the channels. Local pruning: in a group of C channels, n = C − int(C·(1−ratio)) go. If
the group is split into G chunks (its GroupNorm's groups; attention heads), each chunk loses
⌊n/G⌋ of its own lowest-scored channels. This rule turns the CIFAR-10 DDPM (35.7 M / 6.1 G) at ratio
0.3 into 19.8 M / 3.4 G, the paper's Table 1 figures; its params, 35.7463 M → 19.8512 M, equal the
official code's log to the digit (tests/test_pruning.py and ``benchmarks/paper_presets.py --check``
check it; docs/results.md §1). (Stock torch-pruning 1.6.1 keeps ⌊(C/G)·(1−ratio)⌋ per chunk instead
and reaches 13.9 M / 2.1 G.)

Conditional UNets add three rules: cross-attention key/value *inputs* keep the context width (they
read the text encoder or label embedding, never traced as prunable); attention heads stay whole
(each head loses the same number of channels); a GEGLU's value and gate halves lose the same inner
channels (torch-pruning sees one Linear, so the two halves' scores are summed and one choice is
applied to both). ``round_to`` keeps every pruned width a multiple of it (the official LDM path: 2).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch_pruning as tp
from diffusers import UNet2DModel
from diffusers.models.activations import GEGLU
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from diffprune.common.errors import DiffpruneError
from diffprune.family.diffusion import example_inputs_for
from diffprune.pruning.criteria import criterion as criterion_row
from diffprune.pruning.macs import macs_and_params, weightless


def prune_unet(
    unet: UNet2DModel,
    ratio: float,
    criterion: str,
    grads: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    round_to: int | None = None,
    variant: str = "diffusers",
) -> UNet2DModel:
    """Prune ``unet`` in place at ``ratio`` (per group, paper semantics) and return it; ``variant`` picks the
    gradient criteria's channel score (:data:`diffprune.pruning.criteria.VARIANTS`)."""
    _check_ratio(ratio)
    with _gradients(unet, criterion, grads):
        graph, scored = score_groups(unet, criterion, seed, variant)
        _apply(unet, graph, choose(scored, ratio, round_to))
    return unet


def plan_pruning(unet: UNet2DModel, ratio: float, criterion: str, seed: int = 0, round_to: int | None = None,
                 variant: str = "diffusers") -> tuple:
    """The dependency graph and, per group, (root module, pruning function, channel indices to remove).
    Gradients must already sit in ``.grad``."""
    graph, scored = score_groups(unet, criterion, seed, variant)
    return graph, choose(scored, ratio, round_to)


@dataclass(frozen=True)
class ScoredGroup:
    """One coupled group's channel scores, and what its choice must respect; the same at every ratio."""

    root: nn.Module
    handler: object  # torch-pruning's pruning function of the root (out- or in-channels)
    scores: torch.Tensor
    chunks: int  # GroupNorm groups / attention heads that must shrink alike
    gated: bool  # a GEGLU projection: value and gate halves lose the same channels


def score_groups(unet: UNet2DModel, criterion: str, seed: int = 0, variant: str = "diffusers"
                 ) -> tuple[tp.DependencyGraph, list[ScoredGroup]]:
    """Trace ``unet`` once and score every prunable group (gradients must already sit in ``.grad``)."""
    importance = criterion_row(criterion).ranker(variant)
    unet = unet.eval()
    if getattr(unet, "is_gradient_checkpointing", False):
        unet.disable_gradient_checkpointing()  # its wrappers hide layers from the tracer (Diff-Pruning #8)
    graph = tp.DependencyGraph().build_dependency(unet, example_inputs=example_inputs_for(unet), verbose=False)
    heads = {m: a.heads for a in unet.modules() if isinstance(a, Attention) for m in (a.to_q, a.to_k, a.to_v)}
    gated = {m.proj for m in unet.modules() if isinstance(m, GEGLU)}
    scored = []
    torch.manual_seed(seed)  # the random criterion draws from the global RNG
    for group in graph.get_all_groups(ignored_layers=[unet.conv_out], root_module_types=[nn.Conv2d, nn.Linear]):
        scores = importance(group)
        if scores is None:
            continue
        root, handler = group[0].dep.target.module, group[0].dep.handler
        scored.append(ScoredGroup(root, handler, scores.detach().cpu(), _chunks(group, graph, heads),
                                  root in gated and graph.is_out_channel_pruning_fn(handler)))
    return graph, scored


def choose(scored: list[ScoredGroup], ratio: float, round_to: int | None = None) -> list[tuple]:
    """Per group, (root module, pruning function, channel indices to remove) at ``ratio``: no tracing."""
    plans = []
    for g in scored:
        if g.gated:
            half = len(g.scores) // 2
            keep_out = _lowest_per_chunk(g.scores[:half] + g.scores[half:], ratio, g.chunks, round_to)
            idxs = keep_out + [i + half for i in keep_out]
        else:
            idxs = _lowest_per_chunk(g.scores, ratio, g.chunks, round_to)
        if idxs:
            plans.append((g.root, g.handler, idxs))
    return plans


def prune_to_macs(
    unet: UNet2DModel,
    target: float,
    criterion: str,
    grads: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    tol: float = 1e-3,
    round_to: int | None = None,
    variant: str = "diffusers",
    inputs: dict[str, torch.Tensor] | None = None,
) -> tuple[UNet2DModel, float]:
    """Prune ``unet`` in place at the smallest ratio (bisection, to ``tol``) whose MACs are at or under
    ``target`` × the original's; return it and the ratio.

    ``inputs``: the denoiser call the MACs are counted at — pass the model's own (a text model's real context
    length), so that the target is met at the cost that is reported and gated. The model is traced and scored
    once; each trial prunes a weightless copy on the meta device (its graph traced there, where no op computes)
    and counts its MACs, so a trial costs neither memory nor arithmetic. Bisection rather than interpolation:
    MACs move in steps (channel groups and attention heads go whole).
    """
    with _gradients(unet, criterion, grads):
        graph, scored = score_groups(unet, criterion, seed, variant)
        shadow_inputs = {k: v.to("meta") for k, v in (inputs or example_inputs_for(unet)).items()}
        base_macs, _ = macs_and_params(weightless(unet), shadow_inputs)
        names = {id(m): n for n, m in unet.named_modules()}

        def meets(ratio: float) -> bool:
            shadow = weightless(unet)
            modules = dict(shadow.named_modules())
            plans = [(modules[names[id(root)]], fn, idxs) for root, fn, idxs in choose(scored, ratio, round_to)]
            _apply(shadow, tp.DependencyGraph().build_dependency(shadow, shadow_inputs, verbose=False), plans)
            return macs_and_params(shadow, shadow_inputs)[0] <= target * base_macs

        lo, hi, reached = 0.0, 0.95, False
        while hi - lo > tol:
            mid = (lo + hi) / 2
            if meets(mid):
                hi, reached = mid, True
            else:
                lo = mid
        if not reached and not meets(hi):
            raise DiffpruneError(f"target_macs {target}: not reachable even at ratio {hi:.2f}")
        _apply(unet, graph, choose(scored, hi, round_to))
    return unet, hi


def _check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise DiffpruneError(f"pruning ratio {ratio} outside [0, 1)")


@contextlib.contextmanager
def _gradients(unet: UNet2DModel, criterion: str, grads: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """The score stage's gradients in ``.grad`` while the criterion reads them; cleared afterwards."""
    if criterion_row(criterion).needs_gradients and grads is None:
        raise DiffpruneError(f"criterion {criterion!r} needs the gradients of the score stage")
    if grads is not None:
        for name, p in unet.named_parameters():
            p.grad = grads[name].to(p.device, p.dtype) if name in grads else None
    try:
        yield
    finally:
        for p in unet.parameters():
            p.grad = None


def _apply(unet: UNet2DModel, graph: tp.DependencyGraph, plans: list[tuple]) -> None:
    for module, handler, idxs in plans:
        graph.get_pruning_group(module, handler, idxs).prune()
    _fix_diffusers_attributes(unet)


def reinitialise(unet: UNet2DModel, seed: int = 0) -> UNet2DModel:
    """Fresh weights for the pruned architecture: the paper's "scratch training" baseline."""
    torch.manual_seed(seed)
    for module in unet.modules():
        if hasattr(module, "reset_parameters") and module is not unet:
            module.reset_parameters()
    return unet


def layer_widths(unet: UNet2DModel) -> dict[str, int]:
    """Output width of every Conv2d / Linear: the architecture at a glance."""
    return {n: (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
            for n, m in unet.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}


def _chunks(group, graph, heads: dict) -> int:
    """Chunks that must shrink alike: GroupNorm groups and attention heads on these channels."""
    sizes = [1]
    for dep, _ in group:
        module = dep.target.module
        if isinstance(module, nn.GroupNorm):
            sizes.append(module.num_groups)
        elif module in heads and graph.is_out_channel_pruning_fn(dep.handler):
            sizes.append(heads[module])
    return math.lcm(*sizes)


def _lowest_per_chunk(scores: torch.Tensor, ratio: float, chunks: int, round_to: int | None = None) -> list[int]:
    total = len(scores)
    if total % chunks:
        raise DiffpruneError(f"a group of {total} channels cannot be split into {chunks} equal chunks")
    n_pruned = total - int(total * (1 - ratio))
    per_chunk = n_pruned // chunks
    size = total // chunks
    if per_chunk >= size:
        per_chunk = size - 1  # never remove a whole chunk: GroupNorm needs a channel per group
    while round_to and per_chunk > 0 and (chunks * (size - per_chunk)) % round_to:
        per_chunk -= 1  # keep a few more channels so the width stays a multiple of round_to
    if per_chunk <= 0:
        return []
    idxs = []
    for c in range(chunks):
        local = torch.argsort(scores[c * size:(c + 1) * size], stable=True)[:per_chunk]
        idxs += (local + c * size).tolist()
    return sorted(idxs)


def _fix_diffusers_attributes(unet: UNet2DModel) -> None:
    """diffusers keeps widths in attributes that forward() asserts on or reports; sync them."""
    for m in unet.modules():
        if isinstance(m, Upsample2D | Downsample2D):
            conv = m.conv
            m.channels = conv.in_channels
            m.out_channels = conv.out_channels
        elif isinstance(m, Attention):
            m.inner_dim = m.to_q.out_features
            m.inner_kv_dim = m.to_k.out_features
            m.query_dim = m.to_q.in_features
            m.out_dim = m.to_out[0].out_features
        elif isinstance(getattr(m, "proj_in", None), nn.Conv2d | nn.Linear) and hasattr(m, "inner_dim"):
            proj_in = m.proj_in  # Transformer2DModel
            m.in_channels = proj_in.in_channels if isinstance(proj_in, nn.Conv2d) else proj_in.in_features
            m.inner_dim = proj_in.out_channels if isinstance(proj_in, nn.Conv2d) else proj_in.out_features
            m.out_channels = m.proj_out.out_channels if isinstance(m.proj_out, nn.Conv2d) else m.proj_out.out_features
        for norm_attr in ("norm1", "norm2", "group_norm"):
            norm = getattr(m, norm_attr, None)
            if isinstance(norm, nn.GroupNorm) and norm.num_channels % norm.num_groups:
                raise DiffpruneError(f"pruning left {norm.num_channels} channels for {norm.num_groups} groups")
