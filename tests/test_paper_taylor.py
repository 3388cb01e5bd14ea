"""The paper variant's channel score against a hand computation, and where it leads the pruning."""

import copy

import torch
import torch_pruning as tp
from torch import nn

from diffprune.pruning.paper_taylor import PaperTaylorImportance
from diffprune.pruning.structural import _lowest_per_chunk, plan_pruning


class ConvNormConv(nn.Module):
    """conv1 → GroupNorm → SiLU → conv2: one group whose members are known by hand."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.nn.functional.silu(self.norm(self.conv1(x))))


def test_score_is_the_sum_of_squared_weight_terms_plus_the_groupnorm_scale_term():
    torch.manual_seed(0)
    net = ConvNormConv()
    x = torch.randn(5, 2, 6, 6)
    nn.init.normal_(net.norm.weight)  # γ ≠ 1, so its term is not trivial
    net(x).pow(2).sum().backward()
    graph = tp.DependencyGraph().build_dependency(net, example_inputs=x)
    group = graph.get_pruning_group(net.conv1, tp.prune_conv_out_channels, idxs=list(range(4)))
    scores = PaperTaylorImportance()(group)
    w1, g1 = net.conv1.weight, net.conv1.weight.grad
    w2, g2 = net.conv2.weight, net.conv2.weight.grad
    gamma, g_gamma = net.norm.weight, net.norm.weight.grad
    by_hand = torch.tensor([
        sum(float(a * b) ** 2 for a, b in zip(w1[c].detach().flatten(), g1[c].flatten(), strict=True))
        + abs(float(gamma[c].detach() * g_gamma[c]))
        + sum(float(a * b) ** 2 for a, b in zip(w2[:, c].detach().flatten(), g2[:, c].flatten(), strict=True))
        for c in range(4)])
    torch.testing.assert_close(scores, by_hand.float(), rtol=1e-5, atol=1e-12)
    # which channels go at ratio 0.5: the lower-scored one of each GroupNorm group (2 groups of 2)
    removed = _lowest_per_chunk(scores, 0.5, chunks=2)
    assert removed == [int(torch.argmin(by_hand[:2])), 2 + int(torch.argmin(by_hand[2:]))]
    # not the diffusers path's Σ|w·∇w| (same group, same gradients)
    assert not torch.allclose(scores, tp.importance.TaylorImportance(multivariable=False)(group))


def test_the_variant_picks_its_own_channels(trained_tiny, digits):
    """Same gradients, two scores: the paper's squares rank some group's channels differently."""
    from diffprune.family.diffusion import Diffusion, images_to_tensor
    from diffprune.family.models import make_scheduler
    from diffprune.pruning.importance import ScoreOptions, accumulate_gradients

    unet = copy.deepcopy(trained_tiny)
    result = accumulate_gradients(Diffusion(unet, make_scheduler(100)), [images_to_tensor(digits.train[:8])],
                                  ScoreOptions("taylor", 0.0), progress=False)
    for name, p in unet.named_parameters():
        p.grad = result.grads.get(name)
    plans = {variant: [(str(m), idxs) for m, _, idxs in plan_pruning(unet, 0.5, "diff-pruning", variant=variant)[1]]
             for variant in ("diffusers", "paper")}
    assert len(plans["paper"]) == len(plans["diffusers"])
    assert plans["paper"] != plans["diffusers"]
