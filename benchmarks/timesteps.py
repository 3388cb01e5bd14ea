"""Timestep ablation (the paper's "pruned timesteps" study) on the built-in teacher.

    python benchmarks/timesteps.py              # ~10 minutes on 2 CPU cores

For each Diff-Pruning threshold: the timesteps its gradient pass visits, and how close the pruned but
not yet fine-tuned model stays to the teacher (SSIM of samples from the same noise), next to the
magnitude and random baselines. Also the loss over t of the full pass (thr 0 = all timesteps).
Writes benchmarks/results/timesteps.{json,md} and timesteps_loss.png.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.common import RESULTS, save
from diffprune.data.datasets import load_prepared, prepare_dataset
from diffprune.evaluation.metrics import ssim
from diffprune.evaluation.sampling import SamplerOptions, sample
from diffprune.family.diffusion import Diffusion, images_to_tensor
from diffprune.family.models import BUILTIN_TEACHER, load_model
from diffprune.pipeline.config import load_params
from diffprune.pruning.importance import ScoreOptions, accumulate_gradients
from diffprune.pruning.structural import prune_unet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--thresholds", nargs="+", type=float, default=[0.0, 0.02, 0.05, 0.1])
    ap.add_argument("--images", type=int, default=64, help="samples per model for SSIM")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    params = load_params(args.params)
    teacher, scheduler = load_model(BUILTIN_TEACHER)
    with tempfile.TemporaryDirectory() as tmp:
        prepare_dataset(params.data, Path(tmp) / "data")
        data = load_prepared(Path(tmp) / "data")
    order = np.random.default_rng(params.score.seed).permutation(len(data.train))[: params.score.batch_size]
    x0 = images_to_tensor(data.train[order])
    ratio, steps = params.prune.pruning_ratio or 0.25, params.evaluate.steps

    def closeness(model) -> float:
        options = SamplerOptions(steps=steps, batch_size=args.images)
        return float(ssim(sample(teacher, scheduler, args.images, 0, options, progress=False),
                          sample(model, scheduler, args.images, 0, options, progress=False)).mean())

    rows, curve = [], None
    for thr in sorted(args.thresholds):
        scored = accumulate_gradients(Diffusion(copy.deepcopy(teacher), scheduler), [x0],
                                      ScoreOptions("diff-pruning", thr))
        if thr == 0.0:
            curve = {"t": scored.timesteps, "loss": scored.losses}
        pruned = prune_unet(copy.deepcopy(teacher), ratio, "diff-pruning", scored.grads, params.prune.seed)
        rows.append({"method": f"diff-pruning thr={thr:g}", "thr": thr, "timesteps": len(scored.timesteps),
                     "last_t": scored.timesteps[-1], "score_s": scored.seconds, "ssim": closeness(pruned)})
        print(rows[-1], flush=True)
    for criterion in ("magnitude", "random"):
        pruned = prune_unet(copy.deepcopy(teacher), ratio, criterion, None, params.prune.seed)
        rows.append({"method": criterion, "thr": None, "timesteps": 0, "last_t": None, "score_s": 0.0,
                     "ssim": closeness(pruned)})
        print(rows[-1], flush=True)
    markdown = render(rows, ratio, steps, args.images)
    print(markdown)
    save("timesteps", {"rows": rows, "loss_over_t": curve, "pruning_ratio": ratio}, markdown, args.out)
    if curve:
        plot(curve, rows, args.out / "timesteps_loss.png")


def render(rows: list[dict], ratio: float, steps: int, n: int) -> str:
    lines = [f"Pruned at ratio {ratio} and not fine-tuned; SSIM to the teacher over {n} DDIM-{steps} samples "
             "from the same noise.", "",
             "| method | timesteps visited | last t | scoring s | SSIM to teacher |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        last = "–" if r["last_t"] is None else r["last_t"]
        lines.append(f"| {r['method']} | {r['timesteps']} | {last} | {r['score_s']:.1f} | {r['ssim']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(curve: dict, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=130)
    ax.plot(curve["t"], curve["loss"], lw=1, label="loss at t (fixed batch and noise)")
    for r in rows:
        if r["thr"]:
            ax.axvline(r["last_t"], ls="--", lw=0.8, color="gray")
            ax.text(r["last_t"], max(curve["loss"]) * 0.9, f"thr {r['thr']:g}", rotation=90, fontsize=7)
    ax.set_xlabel("timestep t")
    ax.set_ylabel("denoising loss")
    ax.set_yscale("log")
    ax.set_title("Where Diff-Pruning stops scoring")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
