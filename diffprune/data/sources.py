"""Where prepared datasets come from: the built-in digits, an image folder (with captions), CIFAR-10.

Each source is a list of images that are read one at a time (decoded, resized once to the target size and
centre-cropped), with their labels and captions, so that preparing a large folder never holds it whole.
"""

from __future__ import annotations

import json
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from diffprune.common.errors import DiffpruneError
from diffprune.pipeline.stage_params import DataParams

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


@dataclass(frozen=True)
class Split:
    """Images of one split, read on demand: ``read(i)`` is image ``i`` as HWC uint8 at the target size."""

    n: int
    read: Callable[[int], np.ndarray]
    labels: np.ndarray
    texts: list[str] | None = None

    def subset(self, order: np.ndarray) -> Split:
        texts = None if self.texts is None else [self.texts[i] for i in order]
        return Split(len(order), lambda k: self.read(int(order[k])), self.labels[order], texts)


@dataclass(frozen=True)
class Source:
    train: Split
    test: Split
    name: str
    classes: list[str]


def load_source(params: DataParams) -> Source:
    """The dataset ``params`` names, split into train and held-out images."""
    return {"digits": _digits, "imagefolder": _imagefolder, "cifar10": _cifar10}[params.dataset](params)


def _split(whole: Split, params: DataParams) -> tuple[Split, Split]:
    """(train, test) of a seeded split."""
    rng = np.random.default_rng(params.seed)
    order = rng.permutation(whole.n)
    if params.max_images:
        order = order[: params.max_images]
    n_test = max(1, round(len(order) * params.test_fraction))
    if n_test >= len(order):
        raise DiffpruneError(f"data.test_fraction {params.test_fraction} leaves no training images")
    return whole.subset(order[n_test:]), whole.subset(order[:n_test])


def _in_memory(images: np.ndarray, labels: np.ndarray, texts: list[str] | None = None) -> Split:
    return Split(len(images), images.__getitem__, labels, texts)


def _to_array(img: Image.Image, params: DataParams) -> np.ndarray:
    """Resize the shorter side to the resolution (bicubic), centre-crop, convert channels."""
    img = img.convert("L" if params.n_channels == 1 else "RGB")
    w, h = img.size
    scale = params.resolution / min(w, h)
    size = (max(params.resolution, round(w * scale)), max(params.resolution, round(h * scale)))
    if size != (w, h):
        img = img.resize(size, Image.BICUBIC)
    left, top = (size[0] - params.resolution) // 2, (size[1] - params.resolution) // 2
    img = img.crop((left, top, left + params.resolution, top + params.resolution))
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def _digits(params: DataParams) -> Source:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    raw = np.clip(bunch.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    images = np.stack([_to_array(Image.fromarray(im), params) for im in raw])  # 1,797 tiny images
    train, test = _split(_in_memory(images, bunch.target.astype(np.int64)), params)
    return Source(train, test, "sklearn.datasets.load_digits", [str(c) for c in range(10)])


def _imagefolder(params: DataParams) -> Source:
    root = Path(params.path or "")
    if not root.is_dir():
        raise DiffpruneError(f"data.path {root}: no such directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DiffpruneError(f"data.path {root}: no PNG/JPEG/WebP images found")
    # Labels come from first-level class folders only when every image sits in one.
    rel = [p.relative_to(root).parts for p in files]
    classes = sorted({r[0] for r in rel}) if all(len(r) > 1 for r in rel) else []

    def read(i: int) -> np.ndarray:
        try:
            with Image.open(files[i]) as img:
                return _to_array(img, params)
        except (UnidentifiedImageError, OSError) as exc:
            raise DiffpruneError(f"{files[i]}: not a readable image ({type(exc).__name__})") from None

    labels = np.array([classes.index(r[0]) if classes else -1 for r in rel], dtype=np.int64)
    texts = _read_captions(params, root, ["/".join(r) for r in rel]) if params.captions else None
    train, test = _split(Split(len(files), read, labels, texts), params)
    return Source(train, test, f"imagefolder:{root.resolve()}", classes)


def _read_captions(params: DataParams, root: Path, names: list[str]) -> list[str | list[str]]:
    """The captions of every image from a JSONL file of ``{"file": <path relative to data.path>, "text": ...}``:
    one line per caption, several lines for an image with several (kept as a list, in file order)."""
    path = Path(params.captions)
    path = path if path.is_absolute() or path.is_file() else root / path
    texts: dict[str, list[str]] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise DiffpruneError(f"data.captions {path}: cannot read ({exc.strerror})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            texts.setdefault(str(row["file"]), []).append(str(row["text"]))
        except (ValueError, KeyError, TypeError):
            raise DiffpruneError(f"{path}:{n}: expected a JSON object with 'file' and 'text'") from None
    missing = [name for name in names if name not in texts]
    if missing:
        raise DiffpruneError(f"{path}: no caption for {len(missing)} of the {len(names)} images, e.g. {missing[0]}")
    unknown = sorted(set(texts) - set(names))
    if unknown:
        raise DiffpruneError(f"{path}: captions for {len(unknown)} files that are not images of data.path, "
                             f"e.g. {unknown[0]}")
    return [texts[name][0] if len(texts[name]) == 1 else texts[name] for name in names]


def _cifar10(params: DataParams):
    from torchvision.datasets import CIFAR10

    root = Path(params.path or "data/cifar10")
    splits = []
    for train in (True, False):
        try:
            ds = CIFAR10(str(root), train=train, download=params.download)
        except (urllib.error.URLError, OSError, RuntimeError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DiffpruneError(
                f"cifar10: no usable copy under {root} and download failed ({reason}); place "
                f"cifar-10-python.tar.gz or the extracted cifar-10-batches-py/ in {root} (set data.path)"
            ) from None
        images = np.asarray(ds.data, dtype=np.uint8)
        if params.resolution != 32 or params.n_channels != 3:
            images = np.stack([_to_array(Image.fromarray(im), params) for im in images])
        labels = np.asarray(ds.targets, dtype=np.int64)
        if params.max_images:
            keep = max(1, int(params.max_images * (1 - params.test_fraction if train else params.test_fraction)))
            images, labels = images[:keep], labels[:keep]
        splits.append(_in_memory(images, labels))
    return Source(*splits, f"torchvision.CIFAR10:{root.resolve()}", list(ds.classes))
