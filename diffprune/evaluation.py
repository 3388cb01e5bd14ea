"""Teacher-vs-student evaluation: paired samples, FID per seed, SSIM, MACs and latency.

Sample sets are cached by content (model weights + sampler settings + seed + count), so the
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

from diffprune.atomic import atomic_dir, atomic_file
from diffprune.config import EvaluateParams
from diffprune.data import Prepared
from diffprune.devices import resolve_device
from diffprune.macs import macs_and_params
from diffprune.metrics import (
    FidReference,
    fid_reference,
    latency_pair,
    real_floor,
    ssim,
)
from diffprune.models import model_hash
from diffprune.sampling import grid, paired_grid, sample, save_pngs


def sample_set(unet, scheduler, weights_hash: str, n: int, seed: int, params: EvaluateParams,
               device: torch.device, ref: FidReference, tag: str) -> tuple[np.ndarray, np.ndarray, Path]:
    """Images, FID features and the PNG folder of ``n`` samples of ``seed`` (cached by content;
    ``weights_hash`` is :func:`model_hash` of ``unet``, computed once by the caller)."""
    key = hashlib.sha256(json.dumps(
        [weights_hash, params.sampler, params.steps, params.eta, params.batch_size, n, seed],
    ).encode()).hexdigest()[:16]
    folder = Path(params.cache_dir) / "samples" / key
    feats_file = folder / f"features-{ref.name}.npy"
    if not (folder / "images.npy").is_file():
        images = sample(unet, scheduler, n, seed, sampler=params.sampler, steps=params.steps, eta=params.eta,
                        batch_size=params.batch_size, device=device, desc=f"sample {tag} seed {seed}")
        with atomic_dir(folder) as tmp:
            np.save(tmp / "images.npy", images, allow_pickle=False)
            save_pngs(images, tmp / "png")
    if not feats_file.is_file():
        feats = ref.features(folder / "png", params.batch_size)
        with atomic_file(feats_file, "wb") as fh:
            np.save(fh, feats, allow_pickle=False)
    return np.load(folder / "images.npy"), np.load(feats_file), folder / "png"


def evaluate_pair(data: Prepared, teacher: tuple, student: tuple, params: EvaluateParams, samples_dir: Path) -> dict:
    """Compare ``student`` with ``teacher`` (each ``(unet, scheduler)``); PNGs and grids go to ``samples_dir``."""
    device = resolve_device(params.device)
    ref = fid_reference(data, params, device)
    n = params.n_samples or len(data.test)
    floor, floor_n = real_floor(ref, n, params.seeds)
    result = {name: {"fid_per_seed": []} for name in ("teacher", "pruned")}
    ssims = []
    hashes = {"teacher": model_hash(teacher[0]), "pruned": model_hash(student[0])}
    with atomic_dir(samples_dir) as out:
        for seed in params.seeds:
            per_model = {}
            for name, (unet, sched) in (("teacher", teacher), ("pruned", student)):
                images, feats, png = sample_set(unet, sched, hashes[name], n, seed, params, device, ref, name)
                result[name]["fid_per_seed"].append(ref.fid(feats))
                _link_tree(png, out / name / f"seed{seed}")
                per_model[name] = images
            ssims.append(float(ssim(per_model["teacher"], per_model["pruned"]).mean()))
            if seed == params.seeds[0]:
                k = params.grid_images
                grid(per_model["teacher"][:k], scale=2).save(out / "grid_teacher.png")
                grid(per_model["pruned"][:k], scale=2).save(out / "grid_pruned.png")
                paired_grid(per_model["teacher"][:k], per_model["pruned"][:k]).save(out / "grid_pairs.png")
    for name, (unet, _) in (("teacher", teacher), ("pruned", student)):
        macs, n_params = macs_and_params(unet.to(device))
        fids = result[name]["fid_per_seed"]
        result[name].update(fid=float(np.mean(fids)), fid_std=float(np.std(fids)), macs=macs, params=n_params)
    lat = latency_pair({"teacher": teacher[0], "pruned": student[0]}, params.latency_batch,
                       params.latency_steps, params.latency_repeats, device)
    for name in lat:
        result[name]["latency_s"] = lat[name]
    result["pruned"].update(ssim=float(np.mean(ssims)), ssim_per_seed=ssims)
    t, p = result["teacher"], result["pruned"]
    result.update(
        fid_extractor=ref.name, fid_extractor_info=ref.info, n_samples=n, seeds=list(params.seeds),
        sampler=params.sampler, sampler_steps=params.steps, eta=params.eta, device=device.type,
        fid_real_floor=float(np.mean(floor)), fid_real_floor_std=float(np.std(floor)), fid_real_floor_n=floor_n,
        macs_ratio=p["macs"] / t["macs"], params_ratio=p["params"] / t["params"],
        speedup=t["latency_s"] / p["latency_s"], fid_ratio=p["fid"] / t["fid"] if t["fid"] else None,
        latency_batch=params.latency_batch, latency_steps=params.latency_steps,
    )
    return result


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link (or copy across devices) cached PNGs into the stage's output folder."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)
