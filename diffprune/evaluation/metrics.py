"""Metrics: FID (clean-fid, extractor named), SSIM, MACs/params and sampling latency."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from cleanfid import fid as cleanfid

from diffprune.common.atomic import atomic_dir
from diffprune.data.datasets import Prepared, dataset_key
from diffprune.evaluation.features import Extractor, classifier_extractor, inception_extractor
from diffprune.evaluation.sampling import save_pngs
from diffprune.family import fast_path as inference
from diffprune.family.diffusion import Diffusion
from diffprune.pipeline.stage_params import EvaluateParams, FastPathParams


@dataclass
class FidReference:
    """An extractor plus the cached statistics of the real training images (the FID reference)."""

    name: str
    extract: Extractor
    mu: np.ndarray
    sigma: np.ndarray
    test_features: np.ndarray
    native_size: bool
    device: torch.device
    info: dict = field(default_factory=dict)

    def features(self, folder: str | Path, batch_size: int = 256) -> np.ndarray:
        resize = (lambda x: x.astype(np.float32)) if self.native_size else None
        return cleanfid.get_folder_features(
            str(folder), model=self.extract, num_workers=0, batch_size=batch_size, device=self.device,
            mode="clean", custom_fn_resize=resize, verbose=False,
        )

    def fid(self, feats: np.ndarray) -> float:
        return frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), self.mu, self.sigma)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), the FID formula of clean-fid and pytorch-fid.

    Tr((Σ1 Σ2)^½) is the sum of the square roots of the eigenvalues of Σ1^½ Σ2 Σ1^½ (similar to Σ1 Σ2,
    but symmetric), so no general matrix square root is needed: clean-fid's call of
    ``scipy.linalg.sqrtm(..., disp=False)`` fails on scipy ≥ 1.18, and sqrtm can return complex noise.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    inner = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fid_reference(data: Prepared, params: EvaluateParams, device: torch.device) -> FidReference:
    """Choose the extractor, write the real images once, and cache reference statistics per dataset+extractor."""
    root = Path(params.cache_dir) / dataset_key(data)
    real = root / "real"
    if not (real / "done").is_file():
        with atomic_dir(real) as tmp:
            save_pngs(data.train, tmp / "train")
            save_pngs(data.test, tmp / "test")
            (tmp / "done").write_text("ok\n")
    use_inception = params.fid_extractor == "inception" or (
        params.fid_extractor == "auto" and Path(params.inception_path).is_file()
    )
    if use_inception:
        name, info, native = "inception-clean", {}, False
        extract = inception_extractor(params, device)
    else:
        ex = params.extractor
        extract, info = classifier_extractor(data, ex, classifier_cache(data, params), device)
        name, native = f"classifier-{ex.feature_dim}d-{_extractor_id(params)}", True
    stats = root / f"stats-{name}"
    ref = FidReference(name, extract, np.zeros(0), np.zeros(0), np.zeros(0), native, device, info)
    if not (stats / "train_mu.npy").is_file():
        train_feats = ref.features(real / "train", params.batch_size)
        with atomic_dir(stats) as tmp:
            np.save(tmp / "train_mu.npy", train_feats.mean(0))
            np.save(tmp / "train_sigma.npy", np.cov(train_feats, rowvar=False))
            np.save(tmp / "test_features.npy", ref.features(real / "test", params.batch_size))
    ref.mu = np.load(stats / "train_mu.npy")
    ref.sigma = np.load(stats / "train_sigma.npy")
    ref.test_features = np.load(stats / "test_features.npy")
    return ref


def _extractor_id(params: EvaluateParams) -> str:
    return hashlib.sha256(params.extractor.model_dump_json().encode()).hexdigest()[:8]


def classifier_cache(data: Prepared, params: EvaluateParams) -> Path:
    """Where the dataset's classifier is kept: FID features and conditional accuracy share it."""
    return Path(params.cache_dir) / dataset_key(data) / f"classifier-{_extractor_id(params)}"


def real_floor(ref: FidReference, n: int, seeds: tuple[int, ...]) -> tuple[list[float], int]:
    """FID of held-out real images against the training reference, with ``n`` images when possible."""
    feats = ref.test_features
    if n >= len(feats):
        return [ref.fid(feats)], len(feats)
    out = []
    for seed in seeds:
        idx = np.random.default_rng(seed).choice(len(feats), n, replace=False)
        out.append(ref.fid(feats[idx]))
    return out, n


def ssim(a: np.ndarray, b: np.ndarray, window: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Per-image SSIM of NHWC uint8 batches on [0, 1] (Gaussian window, valid region, as pytorch_msssim)."""
    x = torch.from_numpy(a).permute(0, 3, 1, 2).double() / 255
    y = torch.from_numpy(b).permute(0, 3, 1, 2).double() / 255
    c = x.shape[1]
    win = min(window, x.shape[-1], x.shape[-2])
    coords = torch.arange(win, dtype=torch.double) - (win - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum()).view(1, 1, -1)
    k = (g.transpose(-1, -2) * g).unsqueeze(0).expand(c, 1, win, win)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, k, groups=c)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).numpy()


def latency_pair(models: dict[str, Diffusion], batch: int, steps: int, repeats: int, device: torch.device,
                 guidance: float = 1.0, fast: FastPathParams | None = None) -> dict[str, dict[str, float]]:
    """Per model: ``denoise_s``, seconds of ``steps`` denoising calls at ``batch`` (guided calls when
    ``guidance`` ≠ 1: both halves), and ``decode_s``, seconds to decode the batch (0 for pixel models), both
    on the fast path ``fast`` (None: plain fp32). Medians of ``repeats``, the models interleaved so that
    machine noise hits all of them alike."""
    path = inference.resolve(fast, device)
    unets = {name: inference.prepare(model.to(device).unet, path) for name, model in models.items()}
    times: dict[str, dict[str, list[float]]] = {name: {"denoise_s": [], "decode_s": []} for name in models}
    with inference.running(path):
        for _ in range(repeats + 1):  # the first round warms up allocators and kernels
            for name, model in models.items():
                x = torch.randn(batch, *model.input_shape, device=device)
                context = model.null_context(batch, device)  # any context costs the same
                null = context if guidance != 1.0 else None
                _sync(device)
                t0 = time.perf_counter()
                for t in range(steps):
                    eps = model.predict(inference.layout(x, path), torch.tensor(999 - t, device=device), context,
                                        unet=unets[name], guidance=guidance, null=null)
                    x = eps.float().contiguous()
                _sync(device)
                t1 = time.perf_counter()
                model.decode(x)
                _sync(device)
                times[name]["denoise_s"].append(t1 - t0)
                times[name]["decode_s"].append(time.perf_counter() - t1 if model.autoencoder is not None else 0.0)
    return {name: {k: float(np.median(v[1:])) for k, v in parts.items()} for name, parts in times.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
