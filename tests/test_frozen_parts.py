"""The parts that never train (autoencoder, text encoder, a label embedding not trained) are frozen by use, not by
flag: loaded, they keep requires_grad as stock diffusers leaves it (so they compute what a stock pipeline does, see
conditioning.FROZEN), and yet training and scoring never compute a gradient for them or change them."""

import numpy as np
import pytest
import torch
from families import tiny_family

from diffprune.family.models import load_diffusion, save_diffusion
from diffprune.pruning.importance import ScoreOptions, accumulate_gradients
from diffprune.training.loop import train
from diffprune.training.options import Conditioning
from tiny import tiny_train

CONDITIONS = {"latent-class": [3, 1, 4, 1, 5, 9, 2, 6], "latent-text": ["a1", "b2", "c3", "d4"] * 2}


def _loaded(kind: str, tmp_path):
    return load_diffusion(save_diffusion(tiny_family(kind, tmp_path), tmp_path / kind))


@pytest.mark.parametrize("kind", sorted(CONDITIONS))
def test_loaded_frozen_parts_keep_the_stock_flags(kind, tmp_path):
    for name, module in _loaded(kind, tmp_path).modules().items():
        assert all(p.requires_grad for p in module.parameters()), name
        assert name == "unet" or not module.training, name


@pytest.mark.parametrize("kind", sorted(CONDITIONS))
def test_training_and_scoring_compute_no_gradient_for_the_frozen_parts(kind, tmp_path):
    model = _loaded(kind, tmp_path)
    frozen = {name: module for name, module in model.modules().items() if name != "unet"}
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in frozen.items()}
    images = np.random.default_rng(0).integers(0, 255, (8, 8, 8, 1), dtype=np.uint8)
    x0, values = model.encode(images), CONDITIONS[kind]
    result = train(model, x0, tiny_train(steps=2, checkpoint_every=2), tmp_path / "ckpt",
                   conditioning=Conditioning(values, 0.5))
    assert len(result.losses) == 2
    contexts = [model.context(values[:4])]
    assert not contexts[0].requires_grad
    accumulate_gradients(model, [x0[:4]], ScoreOptions("taylor", 0.0, timestep_batch=50), contexts=contexts,
                         progress=False)
    for name, module in frozen.items():
        assert all(p.grad is None for p in module.parameters()), f"{name} got gradients"
        assert all(torch.equal(v, before[name][k]) for k, v in module.state_dict().items()), f"{name} changed"
