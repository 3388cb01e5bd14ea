"""Model families: loading by folder content, save → load, conditions, guidance, bad input."""

import json
import pickle
import shutil
from typing import ClassVar

import numpy as np
import pytest
import torch
from families import CONTEXT, tiny_family

from diffprune.common.errors import DiffpruneError
from diffprune.evaluation.sampling import SamplerOptions, generate
from diffprune.family.diffusion import Diffusion
from diffprune.family.models import load_diffusion, save_diffusion

KINDS = {"pixel": "pixel-unconditional", "latent-vq": "latent-unconditional", "pixel-class": "pixel-class",
         "latent-class": "latent-class", "latent-text": "latent-text"}


@pytest.fixture
def no_pickle(monkeypatch):
    """Any unpickling while loading is a failure."""
    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_family_saves_and_loads_bit_identical_without_pickle(kind, tmp_path, no_pickle):
    model = tiny_family(kind, tmp_path)
    save_diffusion(model, tmp_path / "m")
    loaded = load_diffusion(tmp_path / "m")
    assert loaded.family == KINDS[kind]
    assert set(loaded.modules()) == set(model.modules())
    for folder, module in model.modules().items():
        got = loaded.modules()[folder].state_dict()
        for key, value in module.state_dict().items():
            assert torch.equal(got[key], value), (folder, key)
    n = 3
    conditions = model.sample_conditions(_FakeData(), n)
    options = SamplerOptions(steps=2, guidance=2.0)
    a = generate(model, n, 5, options, conditions=conditions, progress=False)
    b = generate(loaded, n, 5, options, conditions=conditions, progress=False)
    assert a.shape == (n, 8, 8, 1) and np.array_equal(a, b)


class _FakeData:
    captions: ClassVar[dict] = {"test": ["a one", "a two"]}


def test_folders_name_the_diffusers_pipeline_that_loads_them(tmp_path):
    from diffusers import LDMPipeline, StableDiffusionPipeline

    for kind, cls in (("latent-vq", LDMPipeline), ("latent-text", StableDiffusionPipeline)):
        save_diffusion(tiny_family(kind, tmp_path), tmp_path / kind)
        assert json.loads((tmp_path / kind / "model_index.json").read_text())["_class_name"] == cls.__name__
        pipe = cls.from_pretrained(tmp_path / kind)
        assert pipe.unet is not None


def test_a_stable_diffusion_folder_saved_by_diffusers_loads_as_it_is(tmp_path):
    from diffusers import StableDiffusionPipeline

    model = tiny_family("latent-text", tmp_path)
    StableDiffusionPipeline(vae=model.autoencoder, text_encoder=model.condition.module,
                            tokenizer=model.condition.tokenizer, unet=model.unet, scheduler=model.scheduler,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                            ).save_pretrained(tmp_path / "sd", safe_serialization=True)
    loaded = load_diffusion(tmp_path / "sd")
    assert loaded.family == "latent-text" and loaded.condition.tokenizer.model_max_length == 8


def test_guidance_combines_the_conditional_and_null_predictions(tmp_path):
    model = tiny_family("pixel-class", tmp_path)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 50])
    ctx, null = model.context([3, 7]), model.null_context(2)
    cond, uncond = model.predict(x, t, ctx), model.predict(x, t, null)
    guided = model.predict(x, t, ctx, guidance=3.0, null=null)
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), atol=1e-5, rtol=1e-4)
    assert ctx.shape == (2, 1, CONTEXT) and model.null_context(1).shape == (1, 1, CONTEXT)


def test_a_missing_autoencoder_is_one_line(tmp_path):
    save_diffusion(tiny_family("latent-class", tmp_path), tmp_path / "m")
    shutil.rmtree(tmp_path / "m" / "vae")
    with pytest.raises(DiffpruneError, match=r"lists vae but vae/config\.json is missing"):
        load_diffusion(tmp_path / "m")


def test_a_conditional_unet_without_its_conditioner_is_one_line(tmp_path):
    save_diffusion(tiny_family("pixel-class", tmp_path), tmp_path / "m")
    shutil.rmtree(tmp_path / "m" / "label_embedding")
    with pytest.raises(DiffpruneError, match="has no label_embedding/ or text_encoder/"):
        load_diffusion(tmp_path / "m")


def test_labels_out_of_range_are_one_line(tmp_path):
    model = tiny_family("pixel-class", tmp_path)

    class Data:
        train_labels = np.array([0, 3, 12])
        test_labels = np.array([0])

    with pytest.raises(DiffpruneError, match=r"labels must be integers in 0..9 \(got 12\)"):
        model.conditions(Data())


def test_text_model_without_captions_says_how_to_add_them(tmp_path):
    model = tiny_family("latent-text", tmp_path)

    class Data:
        captions = None

    with pytest.raises(DiffpruneError, match=r"caption_template or data\.captions"):
        model.conditions(Data())


def test_a_conditional_model_refuses_to_sample_without_conditions(tmp_path):
    with pytest.raises(DiffpruneError, match="one condition per image"):
        generate(tiny_family("pixel-class", tmp_path), 2, 0, SamplerOptions(steps=1), progress=False)


def test_latent_encode_decode_round_trip_shapes(tmp_path):
    model = tiny_family("latent-class", tmp_path)
    images = np.random.default_rng(0).integers(0, 255, (5, 8, 8, 1), dtype=np.uint8)
    z = model.encode(images)
    assert z.shape == (5, 4, 4, 4) and model.decode(z).shape == (5, 1, 8, 8)
    assert isinstance(model, Diffusion) and model.image_size == 8 and model.image_channels == 1


def test_latents_are_never_clipped_while_sampling(tmp_path):
    """Clipping x0 to [-1, 1] is right for pixels and destroys latents (unit variance, unbounded)."""
    from diffprune.evaluation.sampling import make_sampler

    pixel, latent = tiny_family("pixel", tmp_path), tiny_family("latent-class", tmp_path)
    assert pixel.scheduler.config.clip_sample and latent.scheduler.config.clip_sample
    assert make_sampler(pixel.scheduler, "ddim", 4).config.clip_sample
    assert not make_sampler(latent.scheduler, "ddim", 4, latent=True).config.clip_sample
    assert not make_sampler(latent.scheduler, "ddpm", 4, latent=True).config.clip_sample
