"""Latent and conditional UNets at their real sizes, checked on a CPU with random weights.

    python benchmarks/paper_presets.py --check ldm-celebahq-256 ldm-cin256-v2 sd15

For each architecture: dense and pruned (Diff-Pruning's gradient pass over 2 timesteps, ratio 0.3,
``round_to`` 2 as the official LDM path) params and MACs of one denoiser call, a forward pass of the
pruned model, save → load bit-identical (safetensors + architecture JSON, nothing unpickled), one
distillation step of the pruned model from the dense one (the fine-tuning loop, its condition
dropout included) and the process's peak memory (each architecture runs in its own process).

Where the configurations come from:
- ``ldm-celebahq-256``: the ``unet/config.json`` of the diffusers model ``CompVis/ldm-celebahq-256``
  (the official ``ldm_prune.py`` target): UNet2DModel on 64×64×3 VQ-f4 latents, widths 224·(1,2,3,4),
  2 layers per block, attention at the three lower resolutions (diffusers' UNet2DModel defaults).
- ``ldm-cin256-v2``: CompVis latent-diffusion ``configs/latent-diffusion/cin256-v2.yaml`` (the
  official ``ldm_exp/prune_ldm.py`` target) in diffusers terms: model_channels 192, channel_mult
  (1,2,3,5), 2 res blocks, spatial transformers (depth 1, 1 head) at downsampling 2, 4, 8, context 512
  from a ClassEmbedder of 1001 labels, 64×64×3 VQ-f4 latents.
- ``sd15``: the ``unet/config.json`` of Stable Diffusion 1.5: UNet2DConditionModel (320,640,1280,1280),
  2 layers per block, 8 heads, cross-attention width 768 (CLIP ViT-L/14 text encoder, 77 tokens), 64×64×4
  latents; ≈ 859.5 M parameters.
"""

from __future__ import annotations

import copy
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from diffprune.family.conditioning import ClassCondition, LabelEmbedding
from diffprune.family.diffusion import Diffusion
from diffprune.family.models import make_scheduler
from diffprune.family.persist import ARCH_FILE, describe, load_exact
from diffprune.pipeline.stage_params import TrainParams
from diffprune.pruning.importance import ScoreOptions, accumulate_gradients
from diffprune.pruning.macs import macs_and_params
from diffprune.pruning.structural import prune_unet
from diffprune.training.loop import train
from diffprune.training.options import Conditioning, Distillation

RATIO, ROUND_TO = 0.3, 2


def _celebahq() -> tuple[torch.nn.Module, int]:
    return UNet2DModel(sample_size=64, in_channels=3, out_channels=3, block_out_channels=(224, 448, 672, 896),
                       layers_per_block=2, attention_head_dim=32), 0


def _cin256() -> tuple[torch.nn.Module, int]:
    return UNet2DConditionModel(
        sample_size=64, in_channels=3, out_channels=3, block_out_channels=(192, 384, 576, 960), layers_per_block=2,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",), cross_attention_dim=512,
        attention_head_dim=1), 1  # one head (num_heads: 1); context: one label embedding


def _sd15() -> tuple[torch.nn.Module, int]:
    return UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768,
                                attention_head_dim=8), 77  # diffusers' defaults are the SD-1.x UNet


ARCHITECTURES = {"ldm-celebahq-256": _celebahq, "ldm-cin256-v2": _cin256, "sd15": _sd15}
# Published compressed Stable Diffusion UNets, for scale (BK-SDM, Kim et al. 2024, model cards).
REFERENCES = {"SD-1.4 UNet": 0.86e9, "BK-SDM-Base": 0.58e9, "BK-SDM-Small": 0.49e9, "BK-SDM-Tiny": 0.33e9}


class _Context(ClassCondition):
    """A stand-in conditioner: random contexts of the real width and length (the text encoder is not pruned)."""

    def __init__(self, length: int, width: int) -> None:
        super().__init__(LabelEmbedding(1000, width))
        self.length = length

    def embed(self, values, device):
        gen = torch.Generator().manual_seed(len(values))
        return torch.randn(len(values), self.length, self.module.config.dim, generator=gen).to(device)


def check(name: str) -> dict:
    torch.manual_seed(0)
    start = time.perf_counter()
    unet, context_len = ARCHITECTURES[name]()
    unet.eval()
    scheduler = make_scheduler()
    width = getattr(unet.config, "cross_attention_dim", None)
    condition = None
    if width:
        condition = ClassCondition(LabelEmbedding(1000, width)) if context_len == 1 else _Context(context_len, width)
    model = Diffusion(unet, scheduler, condition=condition)
    inputs = model.example_inputs()
    macs0, params0 = macs_and_params(unet, inputs)
    x0 = torch.randn(1, *model.input_shape)
    contexts = [model.context([3])] if condition else None
    scored = accumulate_gradients(Diffusion(unet, make_scheduler(2)), [x0], ScoreOptions("diff-pruning", 0.0),
                                  contexts=contexts, progress=False)
    pruned = prune_unet(copy.deepcopy(unet), RATIO, "diff-pruning", scored.grads, round_to=ROUND_TO)
    del scored
    macs1, params1 = macs_and_params(pruned, inputs)
    with torch.no_grad():
        out = pruned(**{k: v[:1] for k, v in inputs.items()}).sample
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "unet"
        pruned.save_pretrained(folder, safe_serialization=True)
        (folder / ARCH_FILE).write_text(json.dumps(describe(pruned)))
        loaded = load_exact(folder)
        identical = all(torch.equal(a, b) for a, b in zip(pruned.state_dict().values(),
                                                          loaded.state_dict().values(), strict=True))
        del loaded
        student = model.with_unet(pruned)
        labels = [0] if condition else None
        t0 = time.perf_counter()
        params = TrainParams(steps=1, batch_size=1, optimizer="adam", device="cpu", checkpoint_every=1)
        result = train(student, x0, params, Path(tmp) / "ck", distillation=Distillation(model, 0.7),
                       conditioning=Conditioning(labels, 0.1) if labels else None)
        step_s = time.perf_counter() - t0
    return {"architecture": name, "class": type(unet).__name__, "context_len": context_len if width else None,
            "params": [params0, params1], "macs": [macs0, macs1], "ratio": RATIO, "round_to": ROUND_TO,
            "forward_shape": list(out.shape), "save_load_identical": identical,
            "distill_step_loss": result.losses[0], "distill_step_s": round(step_s, 1),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "seconds": round(time.perf_counter() - start, 1)}


def render(rows: list[dict]) -> str:
    lines = ["| architecture | class | params dense → pruned | MACs dense → pruned | save → load | distill step | "
             "peak memory |", "|---|---|---|---|---|---:|---:|"]
    for r in rows:
        (p0, p1), (m0, m1) = r["params"], r["macs"]
        lines.append(f"| {r['architecture']} | {r['class']} | {p0 / 1e6:.1f} M → {p1 / 1e6:.1f} M ({p1 / p0:.2f}) | "
                     f"{m0 / 1e9:.1f} G → {m1 / 1e9:.1f} G ({m1 / m0:.2f}) | "
                     f"{'bit-identical' if r['save_load_identical'] else 'DIFFERS'} | {r['distill_step_s']} s | "
                     f"{r['peak_rss_gb']} GB |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # one architecture per process, so that peak memory is its own
    print(json.dumps(check(sys.argv[1])))
