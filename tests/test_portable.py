"""Pruned folders load with stock diffusers calls and generate exactly what diffprune's own loader does."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DiffusionPipeline, LDMPipeline, StableDiffusionPipeline
from families import tiny_family

import diffprune
from diffprune.family.models import load_diffusion, save_diffusion
from diffprune.pruning.structural import prune_unet

# family → (the pipeline class its folder names, the call that generates two images)
FAMILIES = {
    "pixel": (DDPMPipeline, {"batch_size": 2}),
    "latent-vq": (LDMPipeline, {"batch_size": 2}),
    "latent-text": (StableDiffusionPipeline, {"prompt": ["a1", "b2"], "height": 8, "width": 8,
                                              "guidance_scale": 1.0}),
}


def _saved(kind: str, tmp_path, pruned: bool = True):
    model = tiny_family(kind, tmp_path)
    if pruned:
        model = model.with_unet(prune_unet(model.unet, 0.5, "random"))
    return save_diffusion(model, tmp_path / kind)


def _images(pipe, kwargs: dict) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)  # LDMPipeline's DDPM steps draw their noise from the global generator
    return pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=3, output_type="np", **kwargs).images


def _ours(folder, pipeline_class):
    """The same pipeline class around the parts diffprune's own loader reads."""
    model = load_diffusion(folder)
    parts = {"unet": model.unet, "scheduler": model.scheduler, **model.modules()}
    if model.condition is not None and getattr(model.condition, "tokenizer", None) is not None:
        parts["tokenizer"] = model.condition.tokenizer
    if pipeline_class is StableDiffusionPipeline:
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipeline_class(**parts)


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_stock_diffusers_loads_a_pruned_folder_and_generates_what_diffprune_does(kind, tmp_path):
    pipeline_class, call = FAMILIES[kind]
    folder = _saved(kind, tmp_path)
    assert json.loads((folder / "model_index.json").read_text())["unet"][0] == "diffprune"
    named = pipeline_class.from_pretrained(folder)
    generic = DiffusionPipeline.from_pretrained(folder)
    assert type(generic) is pipeline_class and isinstance(named.unet, diffprune.PrunedUNet2DModel
                                                         if kind != "latent-text" else
                                                         diffprune.PrunedUNet2DConditionModel)
    cfg = named.unet.config
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    kwargs = {"encoder_hidden_states": torch.randn(2, 3, 24)} if kind == "latent-text" else {}
    ours = load_diffusion(folder).unet
    assert torch.equal(named.unet(x, 7, **kwargs).sample, ours(x, 7, **kwargs).sample), "the denoiser is exact"
    expected = _images(_ours(folder, pipeline_class), call)
    for images in (_images(named, call), _images(generic, call)):
        assert np.array_equal(images, expected), "bit-identical images, frozen parts included"


def test_a_re_saved_pipeline_and_a_dropped_in_unet_still_load(tmp_path):
    folder = _saved("pixel", tmp_path)
    expected = _images(DDPMPipeline.from_pretrained(folder), {"batch_size": 2})
    DDPMPipeline.from_pretrained(folder).save_pretrained(tmp_path / "resaved")
    assert np.array_equal(_images(DDPMPipeline.from_pretrained(tmp_path / "resaved"), {"batch_size": 2}), expected)
    # the one-liner into an existing (unpruned) pipeline
    base = _saved("pixel", tmp_path / "base", pruned=False)
    unet = diffprune.PrunedUNet2DModel.from_pretrained(folder, subfolder="unet")
    assert np.array_equal(_images(DDPMPipeline.from_pretrained(base, unet=unet), {"batch_size": 2}), expected)


def test_the_teacher_s_own_scheduler_is_kept_in_the_folders_it_leads_to(tmp_path):
    from diffusers import DDPMScheduler, PNDMScheduler

    teacher = tiny_family("latent-text", tmp_path)
    teacher.source_scheduler = PNDMScheduler.from_config(teacher.scheduler.config, skip_prk_steps=True,
                                                         steps_offset=1)
    save_diffusion(teacher, tmp_path / "teacher")
    loaded = load_diffusion(tmp_path / "teacher")
    assert type(loaded.scheduler) is DDPMScheduler and type(loaded.source_scheduler) is PNDMScheduler
    folder = save_diffusion(loaded.with_unet(prune_unet(loaded.unet, 0.5, "random")), tmp_path / "pruned")
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "PNDMScheduler" and config["skip_prk_steps"] and config["steps_offset"] == 1
    assert json.loads((folder / "model_index.json").read_text())["scheduler"] == ["diffusers", "PNDMScheduler"]
    assert type(StableDiffusionPipeline.from_pretrained(folder).scheduler) is PNDMScheduler


def test_an_unpruned_folder_names_stock_diffusers(tmp_path):
    folder = _saved("pixel", tmp_path, pruned=False)
    assert json.loads((folder / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DModel"]


def test_without_diffprune_imported_one_clear_error(tmp_path):
    folder = _saved("pixel", tmp_path)
    code = f"from diffusers import DDPMPipeline\nDDPMPipeline.from_pretrained({str(folder)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "import diffprune before calling `from_pretrained`" in proc.stderr, proc.stderr[-1500:]
    assert "shape" not in proc.stderr.splitlines()[-1]


def _class_family(kind: str, tmp_path):
    """``pixel-class``, ``latent-class`` (KL) or ``latent-vq-class``: a VQ decoder's mid-block attention is where
    a frozen flag once moved the images (see conditioning.FROZEN)."""
    if kind != "latent-vq-class":
        return tiny_family(kind, tmp_path)
    from families import CONTEXT, IMAGE, tiny_conditional_unet, tiny_vq

    from diffprune.family.conditioning import ClassCondition, LabelEmbedding
    from diffprune.family.diffusion import Diffusion
    from diffprune.family.models import make_scheduler

    torch.manual_seed(0)
    return Diffusion(tiny_conditional_unet(IMAGE // 2, 3), make_scheduler(100), tiny_vq().eval(), "vqvae",
                     ClassCondition(LabelEmbedding(10, CONTEXT)))


def _class_images(pipe, labels, seed: int, guidance: float, output_type: str = "np"):
    """One generator per image, seeded as diffprune's sampler seeds image i of ``seed``."""
    from diffprune.common.runtime import derive_seed

    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(derive_seed(seed, i)) for i in range(len(labels))]
    return pipe(class_labels=labels, generator=gens, num_inference_steps=3, guidance_scale=guidance,
                output_type=output_type).images


@pytest.mark.parametrize("kind", ["pixel-class", "latent-class", "latent-vq-class"])
def test_a_class_conditional_folder_loads_with_diffprune_s_pipeline_and_generates_what_diffprune_does(kind, tmp_path):
    from diffprune.evaluation.sampling import SamplerOptions, generate, make_sampler

    model = _class_family(kind, tmp_path)
    folder = save_diffusion(model.with_unet(prune_unet(model.unet, 0.5, "random")), tmp_path / kind)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "ClassConditionalPipeline" and index["unet"][0] == "diffprune"
    pipe = diffprune.ClassConditionalPipeline.from_pretrained(folder)
    assert isinstance(pipe.unet, diffprune.PrunedUNet2DConditionModel)
    assert (pipe.vae, pipe.vqvae) == {"pixel-class": (None, None), "latent-class": (pipe.vae, None),
                                      "latent-vq-class": (None, pipe.vqvae)}[kind] and pipe.label_embedding is not None
    ours = _ours(folder, diffprune.ClassConditionalPipeline)
    labels = [3, 7]
    for guidance in (1.0, 2.0):  # plain and classifier-free guided, with the folder's own (DDPM) scheduler
        assert np.array_equal(_class_images(pipe, labels, 0, guidance), _class_images(ours, labels, 0, guidance))
    # diffprune's own sampler (evaluate's DDIM, guidance 2): the same PNG bytes
    loaded = load_diffusion(folder)
    ddim = make_sampler(loaded.scheduler, "ddim", 3, latent=loaded.autoencoder is not None)
    pipe.scheduler = ddim
    pil = _class_images(pipe, labels, 5, 2.0, output_type="pil")
    expected = generate(loaded, 2, 5, SamplerOptions(steps=3, guidance=2.0), conditions=labels, progress=False)
    assert np.array_equal(np.stack([np.asarray(im) for im in pil])[..., None], expected)
    with pytest.raises(AttributeError, match="has no attribute ClassConditionalPipeline"):
        DiffusionPipeline.from_pretrained(folder)  # diffusers resolves _class_name within diffusers only


def test_a_fine_tuned_and_a_re_saved_class_conditional_folder_load_too(tmp_path):
    from diffprune.training.loop import train
    from diffprune.training.options import Conditioning
    from tiny import tiny_train

    model = tiny_family("pixel-class", tmp_path)
    pruned = model.with_unet(prune_unet(model.unet, 0.5, "random"))
    images = np.random.default_rng(0).integers(0, 255, (8, 8, 8, 1), dtype=np.uint8)
    result = train(pruned, images, tiny_train(steps=2, checkpoint_every=2), tmp_path / "ckpt",
                   conditioning=Conditioning(np.arange(8) % 10, 0.5, train_embedding=True))
    folder = save_diffusion(result.trained(pruned), tmp_path / "finetuned")
    pipe = diffprune.ClassConditionalPipeline.from_pretrained(folder)
    ours = _ours(folder, diffprune.ClassConditionalPipeline)
    expected = _class_images(ours, [1, 9], 0, 2.0)
    assert np.array_equal(_class_images(pipe, [1, 9], 0, 2.0), expected)
    pipe.save_pretrained(tmp_path / "resaved")
    resaved = diffprune.ClassConditionalPipeline.from_pretrained(tmp_path / "resaved")
    assert np.array_equal(_class_images(resaved, [1, 9], 0, 2.0), expected)
    assert load_diffusion(tmp_path / "resaved").family == "pixel-class"
    # a folder saved before the pipeline existed names "DiffusionPipeline": the named class still loads it
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "DiffusionPipeline"}))
    assert np.array_equal(_class_images(diffprune.ClassConditionalPipeline.from_pretrained(folder), [1, 9], 0, 2.0),
                          expected)


def test_the_shipped_class_conditional_teacher_loads_with_stock_diffusers_machinery():
    from diffprune.family.shipped import ASSETS

    pipe = diffprune.ClassConditionalPipeline.from_pretrained(ASSETS / "latent-digits32")
    images = pipe([3, 7], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert images.images.shape[0] == 2 and np.isfinite(images.images).all()
