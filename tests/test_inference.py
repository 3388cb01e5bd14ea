import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diffprune.evaluation.metrics import latency_pair
from diffprune.evaluation.sampling import SamplerOptions, generate
from diffprune.family import fast_path as inference
from diffprune.family.diffusion import Diffusion
from diffprune.family.models import load_pipeline, make_scheduler
from diffprune.pipeline.stage_params import FastPathParams

PLAIN = SamplerOptions(steps=8, batch_size=6)


def test_auto_is_plain_fp32_on_the_cpu_and_the_settings_resolve_as_written():
    assert inference.resolve(FastPathParams(), "cpu").describe() == {
        "device": "cpu", "precision": "fp32", "channels_last": False, "compile": False}
    chosen = inference.resolve(FastPathParams(precision="bf16", channels_last=True, compile=True), "cpu")
    assert (chosen.dtype, chosen.channels_last, chosen.compile) == (torch.bfloat16, True, True)
    assert inference.resolve(None, "cpu") == inference.resolve(FastPathParams(precision="fp32", channels_last=False),
                                                               "cpu")


def test_channels_last_gives_the_plain_images(trained_tiny):
    model = Diffusion(copy.deepcopy(trained_tiny), make_scheduler(100))
    plain = generate(model, 12, 0, PLAIN, progress=False)
    fast = generate(Diffusion(copy.deepcopy(trained_tiny), make_scheduler(100)), 12, 0,
                    replace(PLAIN, fast=FastPathParams(precision="fp32", channels_last=True)), progress=False)
    assert np.abs(plain.astype(int) - fast.astype(int)).max() <= 1  # float rounding: at most one grey level
    assert (plain != fast).mean() < 0.01


def test_bf16_stays_close_to_fp32(trained_tiny):
    """Reduced precision is numerically different, not a different model: samples from the same noise stay
    near their fp32 twins (mean error a few grey levels)."""
    plain = generate(Diffusion(copy.deepcopy(trained_tiny), make_scheduler(100)), 12, 0, PLAIN, progress=False)
    bf16 = generate(Diffusion(copy.deepcopy(trained_tiny), make_scheduler(100)), 12, 0,
                    replace(PLAIN, fast=FastPathParams(precision="bf16")), progress=False)
    assert bf16.dtype == np.uint8 and bf16.shape == plain.shape
    assert np.abs(plain.astype(float) - bf16.astype(float)).mean() < 6


def test_guided_latent_sampling_on_the_fast_path_matches_the_plain_path(tmp_path):
    from families import tiny_family

    model = tiny_family("latent-class", tmp_path)
    labels = [0, 1, 2, 3]
    guided = SamplerOptions(steps=4, guidance=2.0)
    plain = generate(model, 4, 0, guided, conditions=labels, progress=False)
    fast = generate(model, 4, 0, replace(guided, fast=FastPathParams(precision="fp32", channels_last=True)),
                    conditions=labels, progress=False)
    assert np.abs(plain.astype(int) - fast.astype(int)).max() <= 1


def test_latency_on_the_fast_path(trained_tiny):
    models = {"a": Diffusion(copy.deepcopy(trained_tiny), make_scheduler(100)),
              "b": Diffusion(copy.deepcopy(trained_tiny), make_scheduler(100))}
    out = latency_pair(models, batch=4, steps=2, repeats=1, device=torch.device("cpu"),
                       fast=FastPathParams(channels_last=True))
    assert set(out) == {"a", "b"} and all(v["denoise_s"] > 0 and v["decode_s"] == 0 for v in out.values())


def test_load_pipeline_applies_the_fast_path(tiny_model_dir, tmp_path):
    pipe = load_pipeline(tiny_model_dir, fast=FastPathParams(precision="bf16", channels_last=True))
    assert pipe.unet.dtype == torch.bfloat16
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images  # diffusers cannot turn bf16 tensors into numpy itself
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    plain = load_pipeline(tiny_model_dir, fast=None)
    assert plain.unet.dtype == torch.float32
    # channels-last weights are only a layout: saving them still works (safetensors wants contiguous copies)
    save_file({k: v.contiguous() for k, v in pipe.unet.state_dict().items()}, tmp_path / "w.safetensors")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_on_cuda_is_reduced_precision_and_channels_last():
    path = inference.resolve(FastPathParams(), "cuda")
    assert path.dtype in (torch.bfloat16, torch.float16) and path.channels_last
