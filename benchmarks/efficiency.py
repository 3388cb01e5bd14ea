"""Efficiency of the built-in default: what the pruned model buys, and what each speed lever adds.

    python benchmarks/efficiency.py              # ~15 minutes on 2 CPU cores
    python benchmarks/efficiency.py --quick      # latency and scoring only: ~6 minutes
    python benchmarks/efficiency.py --cuda-only  # the same on a GPU (round_to, fast path, batched scoring)

Every ratio below comes from models timed side by side in one run (interleaved, medians):
1. ``round_to``: the default prune (ratio 0.25, round_to 1, the paper's exact widths) next to prunes at
   the same MACs budget with widths rounded to 8, 16 and 32; speed-up over the teacher at several batch
   sizes, next to the ideal (the MACs ratio);
2. the fast sampling path at batch 64: plain fp32, channels-last, bf16 autocast (and torch.compile with
   ``--compile``), teacher and pruned model on each;
3. exact batched scoring: diff-pruning (thr 0.05) one timestep per pass vs ``timestep_batch`` 8 and 16
   (same visited steps; the largest gradient difference relative to the gradient's scale);
4. the training step of teacher vs pruned model, and the peak resident memory of each stage process.
Writes benchmarks/results/efficiency.{json,md} (``--cuda-only``: efficiency_cuda.{json,md}).
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import yaml

from benchmarks.common import RESULTS, save
from diffprune.data.datasets import load_prepared, prepare_dataset
from diffprune.evaluation.metrics import latency_pair
from diffprune.family.diffusion import Diffusion, images_to_tensor
from diffprune.family.models import BUILTIN_TEACHER, load_model
from diffprune.pipeline.config import load_params
from diffprune.pipeline.stage_params import FastPathParams, TrainParams
from diffprune.pipeline.table import LIBRARY
from diffprune.pruning.importance import ScoreOptions, accumulate_gradients
from diffprune.pruning.macs import macs_and_params
from diffprune.pruning.structural import layer_widths, prune_to_macs, prune_unet
from diffprune.training.loop import train

STAGES = tuple(s.name for s in LIBRARY)
PATHS = {"plain fp32": None, "fp32 channels-last": FastPathParams(precision="fp32", channels_last=True),
         "bf16": FastPathParams(precision="bf16", channels_last=False),
         "bf16 channels-last": FastPathParams(precision="bf16", channels_last=True)}


def rounded_prunes(teacher, ratio: float, round_tos: list[int]) -> dict[str, dict]:
    """The default prune and, per ``round_to``, the prune with rounded widths at the same MACs budget."""
    base = macs_and_params(teacher)[0]
    default = prune_unet(copy.deepcopy(teacher), ratio, "magnitude")
    budget = macs_and_params(default)[0] / base
    out = {"round_to 1 (default)": {"model": default, "ratio": ratio}}
    for r in round_tos:
        model, found = prune_to_macs(copy.deepcopy(teacher), budget + 1e-9, "magnitude", round_to=r)
        out[f"round_to {r}"] = {"model": model, "ratio": found}
    for v in out.values():
        v["macs_ratio"] = macs_and_params(v["model"])[0] / base
        v["widths"] = sorted({w for n, w in layer_widths(v["model"]).items() if "conv" in n and w > 1})
    return out


def latency_table(teacher, prunes: dict[str, dict], batches: list[int], device: torch.device,
                  fast: FastPathParams | None, repeats: int = 7) -> list[dict]:
    """Teacher and every pruned model timed together (interleaved) at each batch size."""
    rows = []
    for batch in batches:
        models = {"teacher": Diffusion(teacher, None), **{k: Diffusion(v["model"], None) for k, v in prunes.items()}}
        t = latency_pair(models, batch, steps=10, repeats=repeats, device=device, fast=fast)
        for name, v in prunes.items():
            speedup = t["teacher"]["denoise_s"] / t[name]["denoise_s"]
            rows.append({"device": device.type, "batch": batch, "model": name, "teacher_s": t["teacher"]["denoise_s"],
                         "pruned_s": t[name]["denoise_s"], "speedup": speedup, "ideal": 1 / v["macs_ratio"],
                         "of_ideal": speedup * v["macs_ratio"]})
    return rows


def fast_paths(teacher, pruned, batch: int, device: torch.device, compile_too: bool) -> list[dict]:
    """Each fast-path variant on teacher and pruned model; times relative to the plain fp32 teacher."""
    paths = dict(PATHS)
    if device.type == "cuda":
        paths = {"plain fp32": None, "bf16 channels-last (auto)": FastPathParams(),
                 "fp16 channels-last": FastPathParams(precision="fp16", channels_last=True)}
    if compile_too:
        paths["auto + compile"] = FastPathParams(compile=True)
    rows = []
    for name, fast in paths.items():
        models = {"teacher": Diffusion(copy.deepcopy(teacher), None), "pruned": Diffusion(copy.deepcopy(pruned), None)}
        t = latency_pair(models, batch, steps=10, repeats=7, device=device, fast=fast)
        rows.append({"device": device.type, "batch": batch, "path": name, "teacher_s": t["teacher"]["denoise_s"],
                     "pruned_s": t["pruned"]["denoise_s"],
                     "speedup": t["teacher"]["denoise_s"] / t["pruned"]["denoise_s"]})
    base = rows[0]["teacher_s"]
    for r in rows:
        r["pruned_vs_plain_teacher"] = base / r["pruned_s"]
    return rows


def scoring(teacher, scheduler, x0: torch.Tensor, device: str, chunks: tuple[int, ...] = (1, 8, 16)) -> dict:
    runs = {k: accumulate_gradients(Diffusion(copy.deepcopy(teacher), scheduler), [x0],
                                    ScoreOptions("diff-pruning", 0.05, timestep_batch=k), device=device)
            for k in chunks}
    one = runs[chunks[0]]
    scale = max(float(g.abs().max()) for g in one.grads.values())
    out = {}
    for k, r in runs.items():
        err = max(float((r.grads[n] - g).abs().max()) for n, g in one.grads.items()) / scale
        out[str(k)] = {"seconds": r.seconds, "timesteps": len(r.timesteps),
                       "same_timesteps": r.timesteps == one.timesteps, "max_grad_error": err,
                       "speedup": one.seconds / r.seconds}
    return out


def train_step(model, scheduler, images: np.ndarray, steps: int, device: str = "cpu") -> float:
    with tempfile.TemporaryDirectory() as ckpt:
        result = train(Diffusion(copy.deepcopy(model), scheduler), images,
                       TrainParams(steps=steps, batch_size=64, checkpoint_every=steps, device=device), ckpt)
    return result.seconds / steps


def step_pair(teacher, pruned, scheduler, images: np.ndarray, steps: int, device: str = "cpu") -> dict:
    step = {"teacher_s": train_step(teacher, scheduler, images, steps, device),
            "pruned_s": train_step(pruned, scheduler, images, steps, device)}
    return {**step, "speedup": step["teacher_s"] / step["pruned_s"]}


def peak_memory(params_file: str) -> dict[str, float]:
    """Max RSS (MB) of each stage process of a short default chain in a scratch folder."""
    peaks = {}
    with tempfile.TemporaryDirectory() as work:
        raw = yaml.safe_load(Path(params_file).read_text()) or {}
        raw["finetune"] = {**raw.get("finetune", {}), "steps": 20, "checkpoint_every": 20}
        raw["evaluate"] = {**raw.get("evaluate", {}), "seeds": [0], "n_samples": 256, "cache_dir": f"{work}/fid"}
        Path(work, "params.yaml").write_text(yaml.safe_dump(raw))
        for stage in STAGES:
            # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent across exec.
            code = (f"import runpy, sys\nsys.argv = ['diffprune', {stage!r}]\ntry:\n"
                    "    runpy.run_module('diffprune', run_name='__main__')\n"
                    "except SystemExit as exc:\n    code = exc.code\nelse:\n    code = 0\n"
                    "hwm = [x for x in open('/proc/self/status') if x.startswith('VmHWM')][0].split()[1]\n"
                    "print('MAXRSS', hwm)\nsys.exit(code)")
            proc = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True,
                                  env={**os.environ, "TQDM_DISABLE": "1"}, timeout=1800)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("MAXRSS")), None)
            if proc.returncode != 0 or line is None:
                raise RuntimeError(f"{stage}: {proc.stderr[-2000:]}")
            peaks[stage] = int(line.split()[1]) / 1024
    return peaks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64, 256])
    ap.add_argument("--round-to", nargs="+", type=int, default=[8, 16, 32])
    ap.add_argument("--quick", action="store_true", help="latency and scoring only")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile on a CPU)")
    ap.add_argument("--cuda-only", action="store_true", help="everything on the GPU")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    params = load_params(args.params)
    device = torch.device("cuda" if args.cuda_only else "cpu")
    if args.cuda_only and not torch.cuda.is_available():
        raise SystemExit("--cuda-only: no CUDA device")
    teacher, scheduler = load_model(BUILTIN_TEACHER)
    prunes = rounded_prunes(teacher, params.prune.pruning_ratio or 0.25, args.round_to)
    default = prunes["round_to 1 (default)"]["model"]
    with tempfile.TemporaryDirectory() as tmp:
        prepare_dataset(params.data, Path(tmp) / "data")
        data = load_prepared(Path(tmp) / "data")
    order = np.random.default_rng(params.score.seed).permutation(len(data.train))[: params.score.batch_size]
    x0 = images_to_tensor(data.train[order])
    fast = params.evaluate.fast
    payload = {
        "prunes": {k: {kk: vv for kk, vv in v.items() if kk != "model"} for k, v in prunes.items()},
        "latency": latency_table(teacher, prunes, args.batches, device, fast),
        "fast_path": fast_paths(teacher, default, 64, device, args.compile),
        "scoring": scoring(teacher, scheduler, x0, device.type),
    }
    if not args.quick:
        payload["train_step"] = step_pair(teacher, default, scheduler, data.train, 12, device.type)
        if not args.cuda_only:
            payload["peak_rss_mb"] = peak_memory(args.params)
    markdown = render(payload)
    print(markdown)
    save("efficiency_cuda" if args.cuda_only else "efficiency", payload, markdown, args.out)


def render(p: dict) -> str:
    lines = ["| pruned model | ratio | MACs ratio | conv widths |", "|---|---:|---:|---|"]
    lines += [f"| {k} | {v['ratio']:.3f} | {v['macs_ratio']:.3f} | {', '.join(map(str, v['widths']))} |"
              for k, v in p["prunes"].items()]
    lines += ["", "Sampling latency, 10 denoising calls (speed-up over the teacher; ideal = 1 / MACs ratio):", "",
              "| device | batch | model | teacher s | pruned s | speed-up | ideal | of ideal |",
              "|---|---:|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['device']} | {r['batch']} | {r['model']} | {r['teacher_s']:.4f} | {r['pruned_s']:.4f} | "
              f"{r['speedup']:.2f}× | {r['ideal']:.2f}× | {r['of_ideal']:.2f} |" for r in p["latency"]]
    lines += ["", "Fast sampling path, default prune, batch 64 (10 calls):", "",
              "| path | teacher s | pruned s | pruned vs teacher | pruned vs plain fp32 teacher |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['path']} | {r['teacher_s']:.4f} | {r['pruned_s']:.4f} | {r['speedup']:.2f}× | "
              f"{r['pruned_vs_plain_teacher']:.2f}× |" for r in p["fast_path"]]
    lines += ["", "Diff-Pruning scoring (thr 0.05, batch 32), timesteps per forward/backward:", "",
              "| timestep_batch | seconds | timesteps | same timesteps | max grad error / scale | speed-up |",
              "|---:|---:|---:|---|---:|---:|"]
    lines += [f"| {k} | {v['seconds']:.1f} | {v['timesteps']} | {v['same_timesteps']} | {v['max_grad_error']:.1e} | "
              f"{v['speedup']:.2f}× |" for k, v in p["scoring"].items()]
    if "train_step" in p:
        st = p["train_step"]
        lines += ["", f"Training step (batch 64): teacher {st['teacher_s']:.4f} s, pruned {st['pruned_s']:.4f} s "
                  f"({st['speedup']:.2f}×)."]
    if p.get("peak_rss_mb"):
        lines += ["", "| stage | peak RSS (MB) |", "|---|---:|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in p["peak_rss_mb"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
