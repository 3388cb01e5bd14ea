"""FID feature extractors: clean-fid's Inception when its weight file is present, else a classifier
trained on the prepared dataset's labels (cached per dataset; its test accuracy is reported).

Both are called the way clean-fid calls extractors: a float batch ``[B, 3, H, W]`` with values
0..255 → features ``[B, D]``. Numbers from different extractors are never comparable, so every FID
carries its extractor's name.
"""

from __future__ import annotations

import json
import urllib.error
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from diffprune.common.atomic import atomic_dir
from diffprune.common.errors import DiffpruneError
from diffprune.common.progress import bar as progress_bar
from diffprune.common.runtime import derive_seed
from diffprune.data.datasets import Prepared
from diffprune.pipeline.stage_params import EvaluateParams, ExtractorParams

Extractor = Callable[[torch.Tensor], torch.Tensor]
INCEPTION_FILE = "inception-2015-12-05.pt"


class DigitClassifier(nn.Module):
    """A small CNN; its ``feature_dim`` penultimate activations are the FID features."""

    def __init__(self, channels: int, classes: int, feature_dim: int = 64) -> None:
        super().__init__()
        self.channels = channels
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.SiLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(64, feature_dim), nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: float in [-1, 1], NCHW."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def project_classifier(data: Prepared, params: ExtractorParams, cache: Path,
                       device: torch.device) -> tuple[DigitClassifier, dict]:
    """The dataset's classifier, trained once and cached in ``cache`` (its held-out accuracy in the info)."""
    if (data.train_labels < 0).any() or len(np.unique(data.train_labels)) < 2:
        raise DiffpruneError(
            "FID: the dataset has no class labels to train a feature extractor on; place clean-fid's "
            f"{INCEPTION_FILE} at evaluate.inception_path (or use class subfolders)"
        )
    classes = int(data.train_labels.max()) + 1
    if not (cache / "classifier.safetensors").is_file():
        net, info = _train_classifier(data, params, classes)
        with atomic_dir(cache) as tmp:
            save_file(net.state_dict(), tmp / "classifier.safetensors")
            (tmp / "classifier.json").write_text(json.dumps(info, indent=2))
    info = json.loads((cache / "classifier.json").read_text())
    net = DigitClassifier(data.channels, classes, params.feature_dim)
    net.load_state_dict(load_file(cache / "classifier.safetensors"))
    return net.to(device).eval(), info


@torch.no_grad()
def classify(net: DigitClassifier, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Predicted labels of NHWC uint8 images."""
    device = next(net.parameters()).device
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return torch.cat([net(b.to(device)).argmax(1).cpu() for b in x.split(batch_size)]).numpy()


def classifier_extractor(
    data: Prepared, params: ExtractorParams, cache: Path, device: torch.device
) -> tuple[Extractor, dict]:
    """The dataset's classifier (:func:`project_classifier`) wrapped as a clean-fid extractor."""
    net, info = project_classifier(data, params, cache, device)
    channels = data.channels

    def extract(batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(device).float() / 127.5 - 1.0
        if channels == 1:
            x = x.mean(dim=1, keepdim=True)  # clean-fid hands over RGB copies of gray PNGs
        with torch.no_grad():
            return net.features(x)

    return extract, info


def inception_extractor(params: EvaluateParams, device: torch.device) -> Extractor:
    """clean-fid's TorchScript Inception from ``params.inception_path`` (downloaded there when online)."""
    from cleanfid.downloads_helper import check_download_inception
    from cleanfid.inception_torchscript import InceptionV3W

    path = Path(params.inception_path)
    if path.name != INCEPTION_FILE:
        raise DiffpruneError(f"evaluate.inception_path {path}: the file must be named {INCEPTION_FILE}")
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            check_download_inception(fpath=str(path.parent))
        except (urllib.error.URLError, OSError) as exc:
            raise DiffpruneError(
                f"evaluate.inception_path {path}: missing and the download failed ({exc}); copy "
                f"{INCEPTION_FILE} there, or set evaluate.fid_extractor to classifier"
            ) from None
    model = InceptionV3W(str(path.parent), download=False, resize_inside=False).to(device).eval()

    def extract(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(batch.to(device))

    return extract


def _train_classifier(data: Prepared, params: ExtractorParams, classes: int) -> tuple[DigitClassifier, dict]:
    torch.manual_seed(params.seed)
    net = DigitClassifier(data.channels, classes, params.feature_dim)
    x = torch.from_numpy(np.array(data.train)).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = torch.from_numpy(np.array(data.train_labels))
    opt = torch.optim.AdamW(net.parameters(), lr=params.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(derive_seed(params.seed, 0))
    for _ in progress_bar(range(params.epochs), desc="fid-classifier", unit="epoch", leave=False):
        net.train()
        for idx in torch.randperm(len(x), generator=gen).split(params.batch_size):
            xb = _shift(x[idx], gen)
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        xt = torch.from_numpy(np.array(data.test)).permute(0, 3, 1, 2).float() / 127.5 - 1
        acc = (net(xt).argmax(1).numpy() == data.test_labels).mean()
    return net, {"test_accuracy": float(acc), "classes": classes, "feature_dim": params.feature_dim,
                 "epochs": params.epochs, "n_train": len(x), "n_test": len(xt)}


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random ±1-pixel translations: cheap augmentation that keeps features robust to jitter."""
    dx, dy = (torch.randint(-1, 2, (2,), generator=gen)).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))
