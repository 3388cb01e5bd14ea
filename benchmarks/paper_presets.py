"""The paper-scale presets (presets/*.yaml): what they run, and a CPU check of their real architectures.

    python benchmarks/paper_presets.py --check            # both presets and the latent/conditional architectures
    python benchmarks/paper_presets.py --check cifar10    # one of them
    python benchmarks/paper_presets.py --time cuda        # a GPU's step times → expected GPU hours

The check builds each preset's teacher architecture with random weights, scores a few timesteps, prunes
at the preset's ratio, runs two training and two sampling steps of the pruned model, and compares params
and MACs before and after pruning with the paper's tables (within 1 %). The full runs need a GPU:
    diffprune run --params presets/cifar10.yaml
    # several GPUs: --set orchestration.train_processes=8 (accelerate launch --multi_gpu for teacher/finetune)
``--time`` measures, with random weights of the real architectures, the pruned model's training step at
the preset's batch and precision and the denoising call of teacher and pruned model (speed-up next to
the MACs ratio), and extrapolates the preset's fine-tuning and 50K-sample evaluation time.
Writes benchmarks/results/paper_presets.{json,md} (``--time``: paper_presets_time.{json,md}).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks.architectures import ARCHITECTURES, REFERENCES
from benchmarks.architectures import render as render_architectures
from benchmarks.common import RESULTS, save
from diffprune.evaluation.metrics import latency_pair
from diffprune.evaluation.sampling import SamplerOptions, sample
from diffprune.family import fast_path as inference
from diffprune.family.diffusion import Diffusion
from diffprune.family.models import build_unet, make_scheduler
from diffprune.pipeline.config import load_params
from diffprune.pipeline.stage_params import TrainParams
from diffprune.pruning.importance import ScoreOptions, accumulate_gradients
from diffprune.pruning.macs import macs_and_params
from diffprune.pruning.structural import prune_unet
from diffprune.training.loop import train

PRESETS = Path(__file__).resolve().parents[1] / "presets"
# The paper's numbers (Tables 1 and 2; CIFAR-10 to the digit in the official code's log).
PAPER = {
    "cifar10": {"params": (35.7463e6, 19.8512e6), "macs": (6.0655e9, 3.3928e9)},
    "celeba64": {"params": (78.7e6, 43.7e6), "macs": (23.9e9, 13.3e9)},
}


def check(name: str) -> dict:
    params = load_params(PRESETS / f"{name}.yaml")
    res, ch = params.data.resolution, params.data.n_channels
    torch.manual_seed(0)
    unet = build_unet(params.teacher.architecture, res, ch)
    macs0, params0 = macs_and_params(unet)
    x0 = torch.rand(2, ch, res, res) * 2 - 1
    start = time.perf_counter()
    scored = accumulate_gradients(Diffusion(unet, make_scheduler(3)), [x0], ScoreOptions(params.score.criterion, 0.0),
                                  progress=False)
    pruned = prune_unet(unet, params.prune.pruning_ratio, params.score.criterion, scored.grads, params.prune.seed)
    macs1, params1 = macs_and_params(pruned)
    images = np.random.default_rng(0).integers(0, 256, (8, res, res, ch), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as ckpt:
        trained = train(Diffusion(pruned, make_scheduler(params.teacher.num_train_timesteps)), images,
                        TrainParams(steps=2, batch_size=2, checkpoint_every=2, device="cpu"), ckpt).model
    out = sample(trained, make_scheduler(params.teacher.num_train_timesteps), 2, 0,
                 SamplerOptions(steps=2, batch_size=2), progress=False)
    paper = PAPER[name]
    measured = {"params": (params0, params1), "macs": (macs0, macs1)}
    match = all(abs(m - p) / p <= 0.01 for key in paper for m, p in zip(measured[key], paper[key], strict=True))
    return {"preset": name, "pruning_ratio": params.prune.pruning_ratio, "criterion": params.score.criterion,
            "params": measured["params"], "macs": measured["macs"], "paper": paper, "match_1pct": match,
            "timesteps_scored": len(scored.timesteps), "sample_shape": list(out.shape),
            "seconds": round(time.perf_counter() - start, 1)}


def timing(name: str, device: str) -> dict:
    """Seconds per training step and per denoising call on ``device``; the preset's GPU hours from them."""
    params = load_params(PRESETS / f"{name}.yaml")
    res, ch, ft, ev = params.data.resolution, params.data.n_channels, params.finetune, params.evaluate
    torch.manual_seed(0)
    teacher = build_unet(params.teacher.architecture, res, ch)
    pruned = prune_unet(build_unet(params.teacher.architecture, res, ch), params.prune.pruning_ratio, "magnitude",
                        round_to=params.prune.round_to)
    (macs0, _), (macs1, _) = macs_and_params(teacher), macs_and_params(pruned)
    images = np.random.default_rng(0).integers(0, 256, (4 * ft.batch_size, res, res, ch), dtype=np.uint8)
    spent = {}
    for steps in (10, 40):  # the difference cancels set-up, first-step compilation and the final checkpoint
        with tempfile.TemporaryDirectory() as ckpt:
            tp = TrainParams(steps=steps, batch_size=ft.batch_size, lr=ft.lr, mixed_precision=ft.mixed_precision,
                             ema_decay=ft.ema_decay, checkpoint_every=steps, device=device)
            spent[steps] = train(Diffusion(pruned, make_scheduler(params.teacher.num_train_timesteps)), images, tp,
                                 ckpt).seconds
    step_s = (spent[40] - spent[10]) / 30
    pair = {"teacher": Diffusion(teacher, None), "pruned": Diffusion(pruned, None)}
    calls = {b: {name: v["denoise_s"] for name, v in latency_pair(pair, b, steps=10, repeats=3,
                                                                  device=torch.device(device), fast=ev.fast).items()}
             for b in (ft.batch_size, ev.batch_size)}
    call_s = calls[ev.batch_size]["pruned"] / 10
    return {"preset": name, "device": torch.cuda.get_device_name(0) if device == "cuda" else device,
            "batch": ft.batch_size, "mixed_precision": ft.mixed_precision, "train_step_s": step_s,
            "fast_path": inference.resolve(ev.fast, device).describe(), "round_to": params.prune.round_to,
            "latency": {b: {**v, "speedup": v["teacher"] / v["pruned"]} for b, v in calls.items()},
            "macs_ratio": macs1 / macs0, "ideal_speedup": macs0 / macs1,
            "finetune_hours": ft.steps * step_s / 3600,
            "sampling_hours": ev.n_samples / ev.batch_size * ev.steps * call_s / 3600,
            "finetune_steps": ft.steps, "n_samples": ev.n_samples, "sampler_steps": ev.steps}


def render_timing(rows: list[dict]) -> str:
    lines = ["| preset | device | train step (batch, precision) | fine-tuning | denoising speed-up (batch) | "
             "ideal (MACs) | 50K-sample evaluation |", "|---|---|---:|---:|---|---:|---:|"]
    for r in rows:
        speedups = ", ".join(f"{v['speedup']:.2f}× ({b})" for b, v in r["latency"].items())
        lines.append(f"| {r['preset']} | {r['device']} | {1000 * r['train_step_s']:.1f} ms ({r['batch']}, "
                     f"{r['mixed_precision']}) | {r['finetune_hours']:.1f} h for {r['finetune_steps']:,} steps | "
                     f"{speedups} | {r['ideal_speedup']:.2f}× | {60 * r['sampling_hours']:.0f} min "
                     f"(DDIM-{r['sampler_steps']}) |")
    return "\n".join(lines) + "\n"


def render(rows: list[dict]) -> str:
    lines = ["| preset | ratio | params before → after | paper | MACs before → after | paper | within 1 % |",
             "|---|---:|---|---|---|---|---|"]
    for r in rows:
        p, m, pp, pm = r["params"], r["macs"], r["paper"]["params"], r["paper"]["macs"]
        lines.append(f"| {r['preset']} | {r['pruning_ratio']} | {p[0] / 1e6:.4f} M → {p[1] / 1e6:.4f} M | "
                     f"{pp[0] / 1e6:.4g} M → {pp[1] / 1e6:.4g} M | {m[0] / 1e9:.4f} G → {m[1] / 1e9:.4f} G | "
                     f"{pm[0] / 1e9:.4g} G → {pm[1] / 1e9:.4g} G | {'yes' if r['match_1pct'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="build, score, prune, train and sample on CPU")
    ap.add_argument("--time", choices=["cpu", "cuda"], help="time training and sampling steps on this device")
    ap.add_argument("presets", nargs="*", default=sorted(PAPER) + list(ARCHITECTURES),
                    help=f"pixel presets {sorted(PAPER)} and latent/conditional architectures {list(ARCHITECTURES)}")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.time:
        rows = [timing(name, args.time) for name in args.presets]
        markdown = render_timing(rows)
        print(markdown)
        save("paper_presets_time", {"rows": rows}, markdown, args.out)
        return 0
    if not args.check:
        for name in args.presets:
            print(f"{name}: diffprune run --params presets/{name}.yaml")
        return 0
    torch.set_num_threads(max(1, torch.get_num_threads()))
    unknown = set(args.presets) - set(PAPER) - set(ARCHITECTURES)
    if unknown:
        ap.error(f"unknown preset or architecture {sorted(unknown)[0]!r}")
    ok = True
    rows = [check(name) for name in args.presets if name in PAPER]
    if rows:
        markdown = render(rows)
        print(markdown)
        save("paper_presets", {"rows": rows}, markdown, args.out)
        ok = all(r["match_1pct"] for r in rows)
    # Each latent/conditional architecture in its own process: its peak memory is then its own.
    script = Path(__file__).with_name("architectures.py")
    big = [json.loads(subprocess.run([sys.executable, str(script), name], check=True, capture_output=True,
                                     text=True).stdout.strip().splitlines()[-1])
           for name in args.presets if name in ARCHITECTURES]
    if big:
        markdown = render_architectures(big)
        print(markdown)
        save("architectures", {"rows": big, "references": REFERENCES}, markdown, args.out)
        ok = ok and all(r["save_load_identical"] for r in big)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
