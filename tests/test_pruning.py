import copy

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, UNet2DModel
from families import CONTEXT as CONTEXT_WIDTH
from torch import nn

from diffprune.family.diffusion import Diffusion, images_to_tensor
from diffprune.family.models import make_scheduler
from diffprune.pruning.importance import ScoreOptions, accumulate_gradients
from diffprune.pruning.macs import macs_and_params
from diffprune.pruning.structural import (
    _lowest_per_chunk,
    layer_widths,
    plan_pruning,
    prune_to_macs,
    prune_unet,
    reinitialise,
)
from diffprune.training.loop import train
from tiny import tiny_train


@pytest.fixture
def grads(tiny_unet, digits):
    x0 = images_to_tensor(digits.train[:8])
    return accumulate_gradients(Diffusion(tiny_unet, make_scheduler(40)), [x0], ScoreOptions("taylor", 0.0),
                                progress=False).grads


def _plans(unet, criterion, grads=None):
    unet = copy.deepcopy(unet)
    if grads:
        for name, p in unet.named_parameters():
            p.grad = grads.get(name)
    _, plans = plan_pruning(unet, 0.5, criterion, seed=0)
    return [tuple(idxs) for _, _, idxs in plans]


def test_criteria_rank_channels_differently(tiny_unet, grads):
    plans = {c: _plans(tiny_unet, c, grads) for c in ("random", "magnitude", "taylor", "diff-pruning")}
    assert len({tuple(p) for p in plans.values()}) == 4
    assert _plans(tiny_unet, "random") == _plans(tiny_unet, "random")  # seeded


def test_ratio_follows_the_papers_per_group_rule(tiny_unet):
    # GroupNorm(4): 16 channels lose (16 - int(16*0.7)) // 4 = 1 per group, 32 lose 10 // 4 = 2 per group.
    unet = prune_unet(tiny_unet, 0.3, "magnitude")
    assert unet.conv_in.out_channels == 12
    assert unet.down_blocks[1].resnets[0].conv1.out_channels == 24
    for m in unet.modules():
        if isinstance(m, nn.GroupNorm):
            assert m.num_groups == 4 and m.num_channels % 4 == 0
    assert unet.conv_out.out_channels == 1  # ignored layer


def test_each_chunk_loses_its_own_lowest_channels(tiny_unet):
    scores = torch.tensor([5.0, 1, 7, 8, 0, 9, 9, 9, 3, 2, 1, 9, 9, 9, 9, 0.5])
    # 16 channels at ratio 0.3: n = 16 - int(11.2) = 5 → ⌊5/4⌋ = 1 per GroupNorm chunk, its own lowest
    assert _lowest_per_chunk(scores, 0.3, chunks=4) == [1, 4, 10, 15]
    assert _lowest_per_chunk(scores, 0.3, chunks=1) == [1, 4, 9, 10, 15]  # no groups: the 5 lowest
    _, plans = plan_pruning(copy.deepcopy(tiny_unet), 0.3, "magnitude")
    # GN-coupled 16 → 4 removed, 32 → 8; ungrouped q/k/v 32 → 10; time embedding 64 → 20
    assert {len(idxs) for _, _, idxs in plans} == {4, 8, 10, 20}


def test_qkv_stay_consistent(tiny_unet):
    unet = prune_unet(tiny_unet, 0.5, "magnitude")
    attn = unet.down_blocks[1].attentions[0]
    assert attn.to_q.out_features == attn.to_k.out_features == attn.to_v.out_features == attn.to_out[0].in_features
    assert attn.to_q.in_features == attn.group_norm.num_channels


def test_target_macs_lands_at_or_under_target(tiny_unet):
    base, _ = macs_and_params(tiny_unet)
    pruned, ratio = prune_to_macs(copy.deepcopy(tiny_unet), 0.6, "magnitude")
    macs, _ = macs_and_params(pruned)
    assert macs <= 0.6 * base and 0 < ratio < 0.95
    looser = prune_unet(copy.deepcopy(tiny_unet), max(0.0, ratio - 0.01), "magnitude")
    assert macs_and_params(looser)[0] > 0.6 * base  # the smallest ratio that meets the target


def test_the_macs_search_keeps_its_guarantee_where_costs_move_in_steps(tiny_unet):
    base, _ = macs_and_params(tiny_unet)
    pruned, ratio = prune_to_macs(copy.deepcopy(tiny_unet), 0.5, "magnitude")
    assert macs_and_params(pruned)[0] <= 0.5 * base
    tighter = prune_unet(copy.deepcopy(tiny_unet), ratio - 1e-3, "magnitude")
    assert macs_and_params(tighter)[0] > 0.5 * base


def test_the_macs_search_traces_the_real_model_once_and_its_trials_are_exact(tiny_unet, monkeypatch):
    """Trials prune weightless meta copies: the real weights are traced once, and the ratio found prunes the
    real model to exactly the MACs and widths that pruning a copy at that ratio gives."""
    import torch_pruning as tp

    traced = []
    build = tp.DependencyGraph.build_dependency

    def counting(graph, model, *args, **kwargs):
        traced.append(next(model.parameters()).is_meta)
        return build(graph, model, *args, **kwargs)

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", counting)
    reference = copy.deepcopy(tiny_unet)
    pruned, ratio = prune_to_macs(tiny_unet, 0.5, "magnitude")
    assert pruned is tiny_unet and traced.count(False) == 1 and traced.count(True) >= 5
    again = prune_unet(reference, ratio, "magnitude")
    assert layer_widths(again) == layer_widths(pruned) and macs_and_params(again) == macs_and_params(pruned)
    weights = zip(again.state_dict().values(), pruned.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in weights)


def test_pruned_model_samples_in_diffusers_pipelines_and_trains(tiny_unet, digits, tmp_path):
    unet = prune_unet(tiny_unet, 0.5, "random")
    sched = make_scheduler()
    ddim = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(sched.config))
    out = ddim(batch_size=2, num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 8, 8, 1) and np.isfinite(out.images).all()
    out = DDPMPipeline(unet=unet, scheduler=sched)(batch_size=1, num_inference_steps=3, output_type="np")
    assert out.images.shape == (1, 8, 8, 1)
    result = train(Diffusion(unet, sched), digits.train, tiny_train(steps=3), tmp_path)
    assert all(np.isfinite(result.losses))


def test_reinit_keeps_structure_and_replaces_weights(tiny_unet):
    unet = prune_unet(tiny_unet, 0.5, "random")
    before = copy.deepcopy(unet.state_dict())
    reinitialise(unet, seed=0)
    after = unet.state_dict()
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in after.items()}
    assert not torch.equal(before["conv_in.weight"], after["conv_in.weight"])


def test_cifar10_ddpm_architecture_matches_the_paper():
    unet = UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None, norm_num_groups=32,
    )
    macs, params = macs_and_params(unet)
    assert params == pytest.approx(35.7e6, rel=0.01) and macs == pytest.approx(6.1e9, rel=0.01)
    prune_unet(unet, 0.3, "magnitude")
    macs, params = macs_and_params(unet)
    assert params == pytest.approx(19.8e6, rel=0.01) and macs == pytest.approx(3.4e9, rel=0.01)


def _conditional(tmp_path):
    from families import tiny_family

    return tiny_family("latent-class", tmp_path)


def test_pruning_a_conditional_unet_keeps_context_width_whole_heads_geglu_halves_and_groups(tmp_path):
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention_processor import Attention

    model = _conditional(tmp_path)
    before = {n: m for n, m in copy.deepcopy(model.unet).named_modules()}
    pruned = prune_unet(copy.deepcopy(model.unet), 0.4, "magnitude")
    shrunk = 0
    for name, module in pruned.named_modules():
        if isinstance(module, Attention):
            assert module.heads == before[name].heads  # heads stay whole...
            assert module.to_q.out_features % module.heads == 0  # ...and equally wide
            if module.is_cross_attention:  # key/value inputs read the context: never pruned
                assert module.to_k.in_features == module.to_v.in_features == CONTEXT_WIDTH
            shrunk += module.to_q.out_features < before[name].to_q.out_features
        if isinstance(module, GEGLU):
            old = before[name].proj
            half, old_half = module.proj.out_features // 2, old.out_features // 2
            assert half < old_half
            kept = [int((old.bias == b).nonzero()[0]) for b in module.proj.bias]
            assert [k - old_half for k in kept[half:]] == kept[:half], "value and gate halves lose the same channels"
        if isinstance(module, torch.nn.GroupNorm):
            assert module.num_channels % module.num_groups == 0 and module.num_groups == before[name].num_groups
    assert shrunk > 0
    model = model.with_unet(pruned)
    x, t = torch.randn(2, 4, 4, 4), torch.tensor([3, 70])
    ctx, null = model.context([1, 2]), model.null_context(2)
    assert model.predict(x, t, ctx).shape == x.shape
    assert model.predict(x, t, ctx, guidance=2.5, null=null).shape == x.shape


def test_round_to_keeps_every_pruned_width_a_multiple(tmp_path):
    model = _conditional(tmp_path)
    pruned = prune_unet(copy.deepcopy(model.unet), 0.3, "magnitude", round_to=4)
    widths = layer_widths(pruned)
    original = layer_widths(model.unet)
    changed = {n: w for n, w in widths.items() if w != original[n]}
    assert changed and all(w % 4 == 0 for w in changed.values()), changed


@pytest.mark.parametrize("round_to", [8, 16])
def test_round_to_with_a_macs_target_keeps_groups_whole_and_lands_under_it(tiny_unet, round_to):
    """Hardware-aware widths: every pruned width a multiple of round_to, GroupNorm groups still whole (and
    as many), attention heads intact, and the MACs target still met."""
    base = macs_and_params(tiny_unet)[0]
    pruned, _ = prune_to_macs(copy.deepcopy(tiny_unet), 0.6, "magnitude", round_to=round_to)
    assert macs_and_params(pruned)[0] <= 0.6 * base
    original, widths = layer_widths(tiny_unet), layer_widths(pruned)
    changed = {n: w for n, w in widths.items() if w != original[n]}
    assert changed and all(w % round_to == 0 for w in changed.values()), changed
    before = dict(tiny_unet.named_modules())
    for name, module in pruned.named_modules():
        if isinstance(module, nn.GroupNorm):
            assert module.num_groups == before[name].num_groups and module.num_channels % module.num_groups == 0
    x = torch.randn(2, 1, 8, 8)
    assert pruned(x, torch.tensor([1, 5])).sample.shape == x.shape


def test_gradient_checkpointing_does_not_hide_layers_from_pruning(tmp_path):
    model = _conditional(tmp_path)
    plain = layer_widths(prune_unet(copy.deepcopy(model.unet), 0.3, "magnitude"))
    wrapped = copy.deepcopy(model.unet)
    wrapped.enable_gradient_checkpointing()
    assert layer_widths(prune_unet(wrapped, 0.3, "magnitude")) == plain


def test_a_macs_target_is_met_at_the_context_length_that_is_reported(tmp_path):
    """A text model's cross-attention cost grows with the prompt length: solving the target with a 1-token
    context (the old way) left this model at 0.604× of the teacher's MACs when counted with its 77 tokens."""
    from families import tiny_conditional_unet, tiny_kl, tiny_text_encoder, tiny_tokenizer

    from diffprune.family.conditioning import TextCondition

    tokenizer = tiny_tokenizer(tmp_path / "tok", max_length=77)
    model = Diffusion(tiny_conditional_unet(4, 4), make_scheduler(100), tiny_kl().eval(), "vae",
                      TextCondition(tiny_text_encoder(len(tokenizer), 77), tokenizer))
    real = model.example_inputs()
    assert real["encoder_hidden_states"].shape[1] == 77
    base = macs_and_params(model.unet, real)[0]
    pruned, _ = prune_to_macs(model.unet, 0.6, "random", inputs=real)
    assert macs_and_params(pruned, real)[0] <= 0.6 * base
