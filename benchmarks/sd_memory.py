"""Memory and time of diffprune's stages at the Stable Diffusion 1.5 UNet's size (random weights, nothing
downloaded): one scoring step, the prune stage's work (one ratio, and the MACs-target search), and one
fine-tuning step with and without gradient checkpointing.

    python benchmarks/sd_memory.py                 # the CPU (about 10 minutes on 2 cores, ~20 GB of memory)
    python benchmarks/sd_memory.py --device cuda   # the same measurements on a GPU

Each measurement runs in a fresh process, so its peak is its own: the process's peak resident memory on the
CPU, ``torch.cuda.max_memory_allocated`` on a GPU. The architecture is SD-1.5's (860 M parameters, 64×64×4
latents, a 77-token CLIP-sized context from a randomly initialised 123 M-parameter text encoder). Writes
benchmarks/results/sd_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PARTS = ("score", "prune_ratio", "prune_macs", "finetune", "finetune_checkpointing")


def sd15(device: str):
    """An SD-1.5-shaped model: its UNet, a CLIP-sized text encoder and a character tokenizer of 77 tokens."""
    import string
    import tempfile

    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from diffprune.family.conditioning import TextCondition
    from diffprune.family.diffusion import Diffusion
    from diffprune.family.models import make_scheduler

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    folder = Path(tempfile.mkdtemp())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + " ":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77,
                              pad_token="<|endoftext|>")
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=768, intermediate_size=3072,
                                           num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                           bos_token_id=0, eos_token_id=1, pad_token_id=1))
    model = Diffusion(unet, make_scheduler(), condition=TextCondition(encoder, tokenizer))
    return model.to(device)


def run_part(part: str, device: str) -> dict:
    import torch

    from diffprune.pruning.importance import ScoreOptions, accumulate_gradients
    from diffprune.pruning.macs import macs_and_params
    from diffprune.pruning.structural import prune_to_macs, prune_unet

    model = sd15("cpu" if part.startswith("prune") else device)
    latents = torch.randn(4, 4, 64, 64)
    start = time.perf_counter()
    if part == "score":
        # one timestep: a schedule of T = 1 makes the gradient pass a single forward/backward of the batch
        from diffprune.family.models import make_scheduler

        model.scheduler = make_scheduler(1)
        contexts = [model.context(["a photo"], device)]
        result = accumulate_gradients(model, [latents[:1]], ScoreOptions("taylor", 0.0), contexts=contexts,
                                      device=device, progress=False)
        extra = {"timesteps": len(result.timesteps), "batch": 1}
    elif part == "prune_ratio":
        inputs = model.example_inputs()
        before = macs_and_params(model.unet, inputs)[0]
        pruned = prune_unet(model.unet, 0.3, "magnitude")
        extra = {"macs_ratio": macs_and_params(pruned, inputs)[0] / before, "ratio": 0.3}
    elif part == "prune_macs":
        inputs = model.example_inputs()
        before = macs_and_params(model.unet, inputs)[0]
        pruned, ratio = prune_to_macs(model.unet, 0.5, "magnitude", tol=0.02, inputs=inputs)
        extra = {"macs_ratio": macs_and_params(pruned, inputs)[0] / before, "ratio": ratio, "target": 0.5}
    else:
        from diffprune.pipeline.stage_params import TrainParams
        from diffprune.training.loop import train
        from diffprune.training.options import Conditioning

        params = TrainParams(steps=1, batch_size=1, checkpoint_every=1000, device=device,
                             gradient_checkpointing=part == "finetune_checkpointing")
        import tempfile

        with tempfile.TemporaryDirectory() as checkpoints:  # one SD checkpoint is ~13 GB: never leave it behind
            train(model, latents, params, checkpoints, conditioning=Conditioning(["a photo"] * len(latents)))
        extra = {"batch": 1, "optimizer": "adamw", "ema": True}
    seconds = time.perf_counter() - start
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"part": part, "device": device, "peak_gib": round(peak, 2), "seconds": round(seconds, 1), **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--part", choices=PARTS, help="(internal) one measurement, printed as JSON")
    parser.add_argument("--parts", nargs="*", default=list(PARTS))
    args = parser.parse_args()
    if args.part:
        print(json.dumps(run_part(args.part, args.device)))
        return
    rows = []
    for part in args.parts:
        proc = subprocess.run([sys.executable, __file__, "--part", part, "--device", args.device],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append({"part": part, "device": args.device, "error": proc.stderr.strip().splitlines()[-1][:300]})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    from benchmarks.common import save

    lines = ["| part | device | peak memory (GiB) | seconds | notes |", "|---|---|---:|---:|---|"]
    for r in rows:
        notes = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                          if k not in ("part", "device", "peak_gib", "seconds"))
        lines.append(f"| {r['part']} | {r['device']} | {r.get('peak_gib', '–')} | {r.get('seconds', '–')} | {notes} |")
    save(f"sd_memory_{args.device.replace(':', '')}", {"rows": rows}, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
