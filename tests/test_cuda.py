"""Checks that only a CUDA machine can run: mixed precision training, sampling and evaluation on the GPU."""

import numpy as np
import pytest
import torch

from diffprune.common.errors import DiffpruneError
from diffprune.evaluation.compare import evaluate_pair
from diffprune.evaluation.sampling import SamplerOptions, sample
from diffprune.family.diffusion import Diffusion
from diffprune.family.models import make_scheduler
from diffprune.training.loop import train
from tiny import tiny_eval, tiny_train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("precision", ["no", "fp16", "bf16"])
def test_training_on_cuda_with_mixed_precision(tiny_unet, digits, tmp_path, precision):
    params = tiny_train(steps=30, mixed_precision=precision, device="cuda")
    result = train(Diffusion(tiny_unet, make_scheduler()), digits.train, params, tmp_path)
    assert all(np.isfinite(result.losses))
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5])
    assert all(p.dtype == torch.float32 for p in result.model.parameters())


def test_sampling_on_cuda_is_reproducible(tiny_unet):
    options = SamplerOptions(steps=4, batch_size=8)
    a = sample(tiny_unet, make_scheduler(), 8, 0, options, device="cuda", progress=False)
    b = sample(tiny_unet, make_scheduler(), 8, 0, options, device="cuda", progress=False)
    assert np.array_equal(a, b)


def test_evaluate_pair_on_cuda(tiny_unet, digits, tmp_path):
    teacher = Diffusion(tiny_unet, make_scheduler())
    result = evaluate_pair(digits, teacher, teacher, tiny_eval(tmp_path / "cache", device="cuda"), tmp_path / "s")
    assert result["device"] == "cuda"
    assert result["pruned"]["ssim"] == pytest.approx(1.0)


def test_fp16_refused_only_without_cuda(tiny_unet, digits, tmp_path):
    try:
        params = tiny_train(steps=1, mixed_precision="fp16", device="cuda")
        train(Diffusion(tiny_unet, make_scheduler()), digits.train, params, tmp_path)
    except DiffpruneError:
        pytest.fail("fp16 must be accepted on CUDA")


def test_pruning_on_the_gpu_removes_the_channels_the_cpu_removes(tiny_unet, tmp_path):
    """The prune stage traces, searches and prunes on its device; the result is saved from the CPU."""
    import json

    from diffprune.family.models import load_diffusion, model_hash, save_model
    from diffprune.pipeline.stage_params import PruneParams
    from diffprune.pipeline.stages import prune

    save_model(tiny_unet, make_scheduler(), tmp_path / "teacher")
    teacher_hash = model_hash(load_diffusion(tmp_path / "teacher").unet)

    widths = {}
    for device in ("cpu", "cuda"):
        scores = tmp_path / f"scores-{device}"
        scores.mkdir()
        (scores / "score.json").write_text(json.dumps({"criterion": "magnitude", "teacher": teacher_hash}))
        info = prune(PruneParams(target_macs=0.5, pruning_ratio=None, device=device), teacher=tmp_path / "teacher",
                     scores=scores, out=tmp_path / f"pruned-{device}", metrics=tmp_path / f"metrics-{device}")
        widths[device] = info["widths"]
    assert widths["cpu"] == widths["cuda"]


def test_an_ema_kept_on_the_cpu_gives_the_same_model(tiny_unet, digits, tmp_path):
    import copy

    results = [train(Diffusion(copy.deepcopy(tiny_unet), make_scheduler()), digits.train,
                     tiny_train(steps=4, device="cuda", ema_on_cpu=flag), tmp_path / str(flag))
               for flag in (False, True)]
    assert all(torch.allclose(a, b) for a, b in zip(results[0].model.state_dict().values(),
                                                    results[1].model.state_dict().values(), strict=True))
