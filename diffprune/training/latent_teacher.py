"""The recipe of the shipped latent, class-conditional teacher (``presets/latent-digits.yaml``).

``python -m diffprune.training.latent_teacher --out diffprune/assets/latent-digits32`` trains, on the built-in
digits at 32 px: a KL autoencoder (8×8×4 latents, 4× downsampling), then a ``UNet2DConditionModel``
whose cross-attention reads a learned label embedding (the paper's ImageNet-LDM conditioning), with
the label dropped 10 % of the time so that classifier-free guidance works. The data split is the
preset's, so the teacher never sees the held-out images that the FID floor uses.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from diffprune.data.datasets import load_prepared, prepare_dataset
from diffprune.family.autoencoder import build_autoencoder, reconstruction_error, train_autoencoder
from diffprune.family.conditioning import ClassCondition, LabelEmbedding
from diffprune.family.diffusion import Diffusion
from diffprune.family.models import make_scheduler, save_diffusion
from diffprune.pipeline.stage_params import DataParams, TrainParams
from diffprune.training.loop import train
from diffprune.training.options import Conditioning

RECIPE = {
    "data": {"dataset": "digits", "resolution": 32},
    "autoencoder": {"widths": (16, 32, 32), "latent_channels": 4, "groups": 8, "steps": 1500, "batch_size": 64,
                    "lr": 1e-3, "kl_weight": 1e-6, "seed": 0},
    "unet": {"widths": (32, 64), "context_dim": 64, "heads": 4, "groups": 8},
    "train": {"steps": 4000, "batch_size": 64, "lr": 1e-3, "optimizer": "adamw", "ema_decay": 0.999,
              "checkpoint_every": 500},
    "label_dropout": 0.1,
}


def build_conditional_unet(sample_size: int, channels: int, widths: tuple[int, ...], context_dim: int, heads: int,
                           groups: int) -> UNet2DConditionModel:
    """Cross-attention at every level and in the middle block; ``heads`` heads everywhere."""
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels, block_out_channels=widths,
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * len(widths),
        up_block_types=("CrossAttnUpBlock2D",) * len(widths), cross_attention_dim=context_dim,
        attention_head_dim=heads,  # diffusers' legacy name: the number of heads on this config style
        norm_num_groups=groups,
    )


def train_teacher(out: Path, recipe: dict, checkpoints: Path) -> dict:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        prepare_dataset(DataParams(**recipe["data"]), Path(tmp) / "data")
        data = load_prepared(Path(tmp) / "data")
    a = recipe["autoencoder"]
    torch.manual_seed(a["seed"])
    ae = build_autoencoder(data.channels, a["widths"], a["latent_channels"], a["groups"])
    ae, ae_losses = train_autoencoder(ae, data.train, a["steps"], a["batch_size"], a["lr"], a["kl_weight"], a["seed"])
    ae_seconds = time.perf_counter() - start
    u = recipe["unet"]
    latent_size = data.resolution // 2 ** (len(a["widths"]) - 1)
    torch.manual_seed(recipe["train"].get("seed", 0))
    unet = build_conditional_unet(latent_size, a["latent_channels"], u["widths"], u["context_dim"], u["heads"],
                                  u["groups"])
    classes = len(data.manifest["classes"])
    model = Diffusion(unet, make_scheduler(clip_sample=False), ae, "vae",
                      ClassCondition(LabelEmbedding(classes, u["context_dim"])))
    latents = model.encode(data.train)
    conditioning = Conditioning(data.train_labels, recipe["label_dropout"], train_embedding=True)
    result = train(model, latents, TrainParams(**recipe["train"]), checkpoints, conditioning=conditioning)
    model = result.trained(model)
    save_diffusion(model, out)
    info = {"recipe": recipe, "autoencoder_seconds": round(ae_seconds, 1),
            "autoencoder_final_loss": sum(ae_losses[-50:]) / len(ae_losses[-50:]),
            "autoencoder_test_mae_255": reconstruction_error(ae, data.test), "scaling_factor": model.scaling,
            "unet_seconds": round(result.seconds, 1), "unet_final_loss": result.final_loss,
            "seconds": round(time.perf_counter() - start, 1)}
    (Path(out) / "recipe.json").write_text(json.dumps(info, indent=2, default=list))
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="diffprune/assets/latent-digits32")
    parser.add_argument("--checkpoints", default="checkpoints/latent-teacher")
    parser.add_argument("--ae-steps", type=int, default=RECIPE["autoencoder"]["steps"])
    parser.add_argument("--steps", type=int, default=RECIPE["train"]["steps"])
    args = parser.parse_args(argv)
    recipe = json.loads(json.dumps(RECIPE))
    recipe["autoencoder"]["steps"], recipe["train"]["steps"] = args.ae_steps, args.steps
    recipe["autoencoder"]["widths"] = tuple(recipe["autoencoder"]["widths"])
    recipe["unet"]["widths"] = tuple(recipe["unet"]["widths"])
    print(json.dumps(train_teacher(Path(args.out), recipe, Path(args.checkpoints)), indent=2))


if __name__ == "__main__":
    main()
