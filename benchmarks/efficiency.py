"""Efficiency of the built-in default: what the pruned model buys and what each stage costs.

    python benchmarks/efficiency.py            # ~12 minutes on 2 CPU cores (the Taylor pass is most of it)
    python benchmarks/efficiency.py --cuda-only --batches 1 64 256 1024 4096   # latency, train step on a GPU

1. sampling latency of teacher vs pruned (ratio 0.25) at several batch sizes, on CPU and on CUDA when
   present, as speed-up next to the MACs ratio (the ideal);
2. importance-scoring time of diff-pruning (thr 0.05) vs Taylor (all 1,000 timesteps), same batch;
3. training-step time, teacher vs pruned;
4. peak resident memory of each stage (`diffprune <stage>` in its own process; short fine-tuning and
   evaluation, same batch sizes as the default, since memory follows the batch, not the step count).
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
from diffprune.config import TrainParams, load_params
from diffprune.data import load_prepared, prepare_dataset
from diffprune.family import Diffusion
from diffprune.importance import accumulate_gradients
from diffprune.macs import macs_and_params
from diffprune.metrics import latency_pair
from diffprune.models import BUILTIN_TEACHER, load_model
from diffprune.pruning import prune_unet
from diffprune.stage_table import LIBRARY
from diffprune.tensors import images_to_tensor
from diffprune.training import train

STAGES = tuple(s.name for s in LIBRARY)


def latency(teacher, pruned, batches: list[int], device: torch.device) -> list[dict]:
    rows = []
    for batch in batches:
        t = latency_pair({"teacher": Diffusion(teacher, None), "pruned": Diffusion(pruned, None)}, batch, steps=10,
                         repeats=5, device=device)
        t = {name: v["denoise_s"] for name, v in t.items()}
        rows.append({"device": device.type, "batch": batch, "teacher_s": t["teacher"], "pruned_s": t["pruned"],
                     "speedup": t["teacher"] / t["pruned"]})
    return rows


def scoring(teacher, scheduler, x0: torch.Tensor, device: str = "cpu") -> dict:
    out = {}
    for name, criterion, thr in (("diff-pruning", "diff-pruning", 0.05), ("taylor", "taylor", 0.0)):
        result = accumulate_gradients(copy.deepcopy(teacher), scheduler, [x0], criterion, thr, device=device)
        out[name] = {"seconds": result.seconds, "timesteps": len(result.timesteps)}
    out["ratio"] = out["diff-pruning"]["seconds"] / out["taylor"]["seconds"]
    return out


def train_step(model, scheduler, images: np.ndarray, steps: int, device: str = "cpu") -> float:
    with tempfile.TemporaryDirectory() as ckpt:
        result = train(copy.deepcopy(model), scheduler, images,
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
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--memory-only", action="store_true", help="re-measure peak memory into an existing result")
    ap.add_argument("--cuda-only", action="store_true", help="latency and training step on the GPU only")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    params = load_params(args.params)
    if args.memory_only:
        import json

        payload = json.loads((args.out / "efficiency.json").read_text())
        payload.pop("machine", None)
        payload["peak_rss_mb"] = peak_memory(args.params)
        save("efficiency", payload, render(payload), args.out)
        print(render(payload))
        return
    teacher, scheduler = load_model(BUILTIN_TEACHER)
    pruned = prune_unet(copy.deepcopy(teacher), params.prune.pruning_ratio or 0.25, "magnitude")
    (t_macs, t_params), (p_macs, p_params) = macs_and_params(teacher), macs_and_params(pruned)
    sizes = {"macs": {"teacher": t_macs, "pruned": p_macs, "ideal_speedup": t_macs / p_macs},
             "params": {"teacher": t_params, "pruned": p_params}}
    with tempfile.TemporaryDirectory() as tmp:
        prepare_dataset(params.data, Path(tmp) / "data")
        data = load_prepared(Path(tmp) / "data")
    order = np.random.default_rng(params.score.seed).permutation(len(data.train))[: params.score.batch_size]
    x0 = images_to_tensor(data.train[order])
    if args.cuda_only:
        if not torch.cuda.is_available():
            raise SystemExit("--cuda-only: no CUDA device")
        payload = {**sizes, "latency": latency(teacher, pruned, args.batches, torch.device("cuda")),
                   "train_step": step_pair(teacher, pruned, scheduler, data.train, 50, "cuda"),
                   "scoring": scoring(teacher, scheduler, x0, "cuda")}
        markdown = render(payload)
        print(markdown)
        save("efficiency_cuda", payload, markdown, args.out)
        return
    rows = latency(teacher, pruned, args.batches, torch.device("cpu"))
    if torch.cuda.is_available():
        rows += latency(teacher, pruned, args.batches, torch.device("cuda"))
    teacher, pruned = teacher.cpu(), pruned.cpu()
    step = step_pair(teacher, pruned, scheduler, data.train, 12)
    score = scoring(teacher, scheduler, x0)
    memory = {} if args.skip_memory else peak_memory(args.params)
    payload = {**sizes, "latency": rows, "train_step": step,
               "scoring": score, "peak_rss_mb": memory, "torch_threads": torch.get_num_threads()}
    markdown = render(payload)
    print(markdown)
    save("efficiency", payload, markdown, args.out)


def render(p: dict) -> str:
    lines = [f"MACs {p['macs']['teacher'] / 1e6:.2f} M → {p['macs']['pruned'] / 1e6:.2f} M: ideal speed-up "
             f"{p['macs']['ideal_speedup']:.2f}×", "",
             "| device | batch | teacher s / 10 calls | pruned s / 10 calls | speed-up | ideal (MACs) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in p["latency"]:
        lines.append(f"| {r['device']} | {r['batch']} | {r['teacher_s']:.4f} | {r['pruned_s']:.4f} | "
                     f"{r['speedup']:.2f}× | {p['macs']['ideal_speedup']:.2f}× |")
    st = p["train_step"]
    lines += ["", f"Training step (batch 64): teacher {st['teacher_s']:.4f} s, pruned {st['pruned_s']:.4f} s "
              f"({st['speedup']:.2f}×)."]
    if "scoring" not in p:
        return "\n".join(lines) + "\n"
    s = p["scoring"]
    lines += [f"Importance scoring (batch 32): diff-pruning {s['diff-pruning']['seconds']:.1f} s over "
              f"{s['diff-pruning']['timesteps']} timesteps, Taylor {s['taylor']['seconds']:.1f} s over "
              f"{s['taylor']['timesteps']}: ratio {s['ratio']:.2f}."]
    if p.get("peak_rss_mb"):
        lines += ["", "| stage | peak RSS (MB) |", "|---|---:|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in p["peak_rss_mb"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
