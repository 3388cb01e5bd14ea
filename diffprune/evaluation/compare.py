"""Teacher-vs-student evaluation: paired samples, FID per seed, SSIM, conditional accuracy, MACs and
the latency of the denoiser and of the whole pipeline.

Teacher and student sample from the same noise and the same conditions (classes in turn: a
class-balanced set; or the held-out captions), so their images pair up one to one. Sample sets are
cached by content (every part's weights + sampler settings + conditions + seed + count), so the
teacher's samples are generated once and reused by every student evaluated against it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from diffprune.common.atomic import atomic_dir, atomic_file
from diffprune.common.runtime import resolve_device
from diffprune.data.datasets import Prepared
from diffprune.evaluation.clip_score import clip_scorer
from diffprune.evaluation.features import classify, project_classifier
from diffprune.evaluation.metrics import FidReference, classifier_cache, fid_reference, latency_pair, real_floor, ssim
from diffprune.evaluation.sampling import SamplerOptions, generate, grid, paired_grid, save_pngs
from diffprune.family import fast_path as inference
from diffprune.family.diffusion import Diffusion
from diffprune.family.models import model_hash
from diffprune.pipeline.stage_params import EvaluateParams
from diffprune.pruning.macs import macs_and_params


def diffusion_hash(model: Diffusion) -> str:
    """Content hash of every part (only the denoiser's for unconditional pixel models, as it always was)."""
    parts = [model_hash(m) for m in model.modules().values()]
    return parts[0] if len(parts) == 1 else hashlib.sha256("".join(parts).encode()).hexdigest()[:16]


def sampler_options(params: EvaluateParams) -> SamplerOptions:
    """How evaluate samples, teacher and student alike."""
    return SamplerOptions(params.sampler, params.steps, params.eta, params.guidance_scale, params.batch_size,
                          params.fast)


def sample_set(model: Diffusion, weights_hash: str, n: int, seed: int, params: EvaluateParams, device: torch.device,
               ref: FidReference, tag: str, conditions: list | None = None) -> tuple[np.ndarray, np.ndarray, Path]:
    """Images, FID features and the PNG folder of ``n`` samples of ``seed`` (cached by content;
    ``weights_hash`` is :func:`diffusion_hash` of ``model``, computed once by the caller)."""
    path = inference.resolve(params.fast, device).describe()
    key_parts = [weights_hash, params.sampler, params.steps, params.eta, params.batch_size, n, seed,
                 path["precision"], path["channels_last"], path["compile"]]
    if conditions is not None:
        wanted = json.dumps([str(c) for c in conditions]).encode()
        key_parts += [params.guidance_scale, hashlib.sha256(wanted).hexdigest()]
    key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:16]
    folder = Path(params.cache_dir) / "samples" / key
    feats_file = folder / f"features-{ref.name}.npy"
    if not (folder / "images.npy").is_file():
        images = generate(model, n, seed, sampler_options(params), conditions=conditions, device=device,
                          desc=f"sample {tag} seed {seed}")
        with atomic_dir(folder) as tmp:
            np.save(tmp / "images.npy", images, allow_pickle=False)
            save_pngs(images, tmp / "png")
    if not feats_file.is_file():
        feats = ref.features(folder / "png", params.batch_size)
        with atomic_file(feats_file, "wb") as fh:
            np.save(fh, feats, allow_pickle=False)
    return np.load(folder / "images.npy"), np.load(feats_file), folder / "png"


def evaluate_pair(data: Prepared, teacher: Diffusion, student: Diffusion, params: EvaluateParams,
                  samples_dir: Path) -> dict:
    """Compare ``student`` with ``teacher``; PNGs and grids go to ``samples_dir``."""
    device = resolve_device(params.device)
    ref = fid_reference(data, params, device)
    n = params.n_samples or len(data.test)
    floor, floor_n = real_floor(ref, n, params.seeds)
    models = {"teacher": teacher, "pruned": student}
    result = {name: {"fid_per_seed": []} for name in models}
    conditions = teacher.sample_conditions(data, n)
    judge = _accuracy_judge(teacher, data, params, device)
    clip = clip_scorer(params.clip_model, device) if teacher.conditional and teacher.condition.clip_score else None
    ssims = []
    hashes = {name: diffusion_hash(model) for name, model in models.items()}
    with atomic_dir(samples_dir) as out:
        for seed in params.seeds:
            per_model = {}
            for name, model in models.items():
                images, feats, png = sample_set(model, hashes[name], n, seed, params, device, ref, name, conditions)
                result[name]["fid_per_seed"].append(ref.fid(feats))
                if judge is not None:
                    result[name].setdefault("accuracy_per_seed", []).append(judge(images, conditions))
                if clip is not None and clip.available:
                    result[name].setdefault("clip_score_per_seed", []).append(clip.score(images, conditions))
                _link_tree(png, out / name / f"seed{seed}")
                per_model[name] = images
            ssims.append(float(ssim(per_model["teacher"], per_model["pruned"]).mean()))
            if seed == params.seeds[0]:
                k = params.grid_images
                grid(per_model["teacher"][:k], scale=2).save(out / "grid_teacher.png")
                grid(per_model["pruned"][:k], scale=2).save(out / "grid_pruned.png")
                paired_grid(per_model["teacher"][:k], per_model["pruned"][:k]).save(out / "grid_pairs.png")
    lat = latency_pair(models, params.latency_batch, params.latency_steps, params.latency_repeats, device,
                       params.guidance_scale if teacher.conditional else 1.0, params.fast)
    for name, model in models.items():
        r = result[name]
        macs, n_params = macs_and_params(model.unet.to(device), model.example_inputs(device=device))
        fids = r["fid_per_seed"]
        call_s = lat[name]["denoise_s"] / params.latency_steps
        r.update(fid=float(np.mean(fids)), fid_std=float(np.std(fids)), macs=macs, params=n_params,
                 latency_s=lat[name]["denoise_s"], decode_s=lat[name]["decode_s"],
                 pipeline_s=params.steps * call_s + lat[name]["decode_s"])
        for metric in ("accuracy", "clip_score"):
            if f"{metric}_per_seed" in r:
                r[metric] = float(np.mean(r[f"{metric}_per_seed"]))
                r[f"{metric}_std"] = float(np.std(r[f"{metric}_per_seed"]))
    result["pruned"].update(ssim=float(np.mean(ssims)), ssim_per_seed=ssims)
    t, p = result["teacher"], result["pruned"]
    result.update(
        family=teacher.family, fid_extractor=ref.name, fid_extractor_info=ref.info, n_samples=n,
        seeds=list(params.seeds), sampler=params.sampler, sampler_steps=params.steps, eta=params.eta,
        guidance_scale=params.guidance_scale if teacher.conditional else None, device=device.type,
        fid_real_floor=float(np.mean(floor)), fid_real_floor_std=float(np.std(floor)), fid_real_floor_n=floor_n,
        macs_ratio=p["macs"] / t["macs"], params_ratio=p["params"] / t["params"],
        speedup=t["latency_s"] / p["latency_s"], pipeline_speedup=t["pipeline_s"] / p["pipeline_s"],
        fid_ratio=p["fid"] / t["fid"] if t["fid"] else None,
        latency_batch=params.latency_batch, latency_steps=params.latency_steps,
        fast_path=inference.resolve(params.fast, device).describe(), fast_path_params=params.fast.model_dump(),
    )
    if "accuracy" in t:
        result["accuracy_drop"] = t["accuracy"] - p["accuracy"]
    if clip is not None and not clip.available:
        result["clip_score"] = f"not reported: {clip.reason}"
    return result


def _accuracy_judge(model: Diffusion, data: Prepared, params: EvaluateParams, device: torch.device):
    """For models whose conditions are the dataset's labels: the share of generated images the project's
    classifier assigns to the requested label (the classifier of the FID features, trained once per dataset)."""
    if model.condition is None or not model.condition.class_accuracy:
        return None
    net, _ = project_classifier(data, params.extractor, classifier_cache(data, params), device)

    def judge(images: np.ndarray, labels: list) -> float:
        return float((classify(net, images) == np.asarray(labels)).mean())

    return judge


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link (or copy across devices) cached PNGs into the stage's output folder."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)
