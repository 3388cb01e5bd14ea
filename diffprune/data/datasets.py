"""Datasets → a versionable prepared folder: uint8 arrays, labels and a JSON manifest.

Layout written by :func:`prepare_dataset` (all arrays NHWC uint8, saved with ``allow_pickle=False``)::

    train.npy  train_labels.npy  test.npy  test_labels.npy  manifest.json  [captions.json]

``captions.json`` (``{"train": [...], "test": [...]}``, one caption per image) is written for text
models, from ``data.captions`` (a JSONL file) or ``data.caption_template`` over the class names.
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from diffprune.common.atomic import atomic_dir, write_json
from diffprune.common.digests import sha256_file
from diffprune.common.errors import DiffpruneError
from diffprune.common.version import VERSION
from diffprune.pipeline.stage_params import DataParams

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
_ARRAYS = ("train", "train_labels", "test", "test_labels")


@dataclass(frozen=True)
class Prepared:
    train: np.ndarray
    train_labels: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray
    manifest: dict
    captions: dict[str, list[str]] | None = None  # "train" / "test": one caption per image

    @property
    def channels(self) -> int:
        return int(self.train.shape[-1])

    @property
    def resolution(self) -> int:
        return int(self.train.shape[1])


def prepare_dataset(params: DataParams, out_dir: str | Path) -> dict:
    """Build the dataset named by ``params`` and write it atomically to ``out_dir``; return the manifest."""
    loader = {"digits": _digits, "imagefolder": _imagefolder, "cifar10": _cifar10}[params.dataset]
    train, train_labels, test, test_labels, source, classes, captions = loader(params)
    if params.caption_template is not None:
        if not classes:
            raise DiffpruneError("data.caption_template needs class labels (class subfolders for imagefolder)")
        captions = {split: [params.caption_template.format(label=classes[i]) for i in labels]
                    for split, labels in (("train", train_labels), ("test", test_labels))}
    manifest = {
        "dataset": params.dataset,
        "source": source,
        "resolution": params.resolution,
        "channels": params.n_channels,
        "n_train": len(train),
        "n_test": len(test),
        "classes": classes,
        "seed": params.seed,
        "diffprune_version": VERSION,
        "files": {},
    }
    with atomic_dir(out_dir) as tmp:
        for name, arr in zip(_ARRAYS, (train, train_labels, test, test_labels), strict=True):
            np.save(tmp / f"{name}.npy", arr, allow_pickle=False)
            manifest["files"][f"{name}.npy"] = sha256_file(tmp / f"{name}.npy")
        if captions is not None:
            write_json(tmp / "captions.json", captions)
            manifest["files"]["captions.json"] = sha256_file(tmp / "captions.json")
        write_json(tmp / "manifest.json", manifest)
    return manifest


def dataset_key(data: Prepared) -> str:
    """Content hash of a prepared dataset (its files' checksums)."""
    files = data.manifest["files"]
    return hashlib.sha256("".join(files[k] for k in sorted(files)).encode()).hexdigest()[:16]


def load_prepared(data_dir: str | Path) -> Prepared:
    """Load a prepared folder, refusing missing or altered files with a one-line error."""
    data_dir = Path(data_dir)
    manifest_path = data_dir / "manifest.json"
    if not manifest_path.is_file():
        raise DiffpruneError(f"{data_dir}: not a prepared dataset (no manifest.json); run `diffprune prepare`")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        raise DiffpruneError(f"{manifest_path}: unreadable manifest; re-run `diffprune prepare`") from None
    arrays = []
    for name in _ARRAYS:
        path = data_dir / f"{name}.npy"
        if not path.is_file() or sha256_file(path) != files.get(path.name):
            raise DiffpruneError(f"{path}: missing or does not match its checksum in manifest.json")
        arrays.append(np.load(path, allow_pickle=False))
    captions = None
    if "captions.json" in files:
        path = data_dir / "captions.json"
        if not path.is_file() or sha256_file(path) != files["captions.json"]:
            raise DiffpruneError(f"{path}: missing or does not match its checksum in manifest.json")
        captions = json.loads(path.read_text())
    return Prepared(*arrays, manifest=manifest, captions=captions)


def _split(images: np.ndarray, labels: np.ndarray, params: DataParams, texts: list[str] | None = None) -> tuple:
    """(train, train labels, test, test labels, captions or None) of a seeded split."""
    rng = np.random.default_rng(params.seed)
    order = rng.permutation(len(images))
    if params.max_images:
        order = order[: params.max_images]
    n_test = max(1, round(len(order) * params.test_fraction))
    if n_test >= len(order):
        raise DiffpruneError(f"data.test_fraction {params.test_fraction} leaves no training images")
    test, train = order[:n_test], order[n_test:]
    captions = None if texts is None else {"train": [texts[i] for i in train], "test": [texts[i] for i in test]}
    return images[train], labels[train], images[test], labels[test], captions


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


def _digits(params: DataParams):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    raw = np.clip(bunch.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    images = np.stack([_to_array(Image.fromarray(im), params) for im in raw])
    labels = bunch.target.astype(np.int64)
    train, train_labels, test, test_labels, _ = _split(images, labels, params)
    return train, train_labels, test, test_labels, "sklearn.datasets.load_digits", [str(c) for c in range(10)], None


def _imagefolder(params: DataParams):
    root = Path(params.path or "")
    if not root.is_dir():
        raise DiffpruneError(f"data.path {root}: no such directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DiffpruneError(f"data.path {root}: no PNG/JPEG/WebP images found")
    # Labels come from first-level class folders only when every image sits in one.
    rel = [p.relative_to(root).parts for p in files]
    classes = sorted({r[0] for r in rel}) if all(len(r) > 1 for r in rel) else []
    images = []
    for path in files:
        try:
            with Image.open(path) as img:
                images.append(_to_array(img, params))
        except (UnidentifiedImageError, OSError) as exc:
            raise DiffpruneError(f"{path}: not a readable image ({type(exc).__name__})") from None
    labels = np.array([classes.index(r[0]) if classes else -1 for r in rel], dtype=np.int64)
    texts = _read_captions(params, root, ["/".join(r) for r in rel]) if params.captions else None
    *arrays, captions = _split(np.stack(images), labels, params, texts)
    return (*arrays, f"imagefolder:{root.resolve()}", classes, captions)


def _read_captions(params: DataParams, root: Path, names: list[str]) -> list[str]:
    """One caption per image from a JSONL file of ``{"file": <path relative to data.path>, "text": ...}``."""
    path = Path(params.captions)
    path = path if path.is_absolute() or path.is_file() else root / path
    texts: dict[str, str] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise DiffpruneError(f"data.captions {path}: cannot read ({exc.strerror})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            texts[str(row["file"])] = str(row["text"])
        except (ValueError, KeyError, TypeError):
            raise DiffpruneError(f"{path}:{n}: expected a JSON object with 'file' and 'text'") from None
    missing = [name for name in names if name not in texts]
    if missing:
        raise DiffpruneError(f"{path}: no caption for {len(missing)} of the {len(names)} images, e.g. {missing[0]}")
    unknown = sorted(set(texts) - set(names))
    if unknown:
        raise DiffpruneError(f"{path}: captions for {len(unknown)} files that are not images of data.path, "
                             f"e.g. {unknown[0]}")
    return [texts[name] for name in names]


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
        splits += [images, labels]
    return (*splits, f"torchvision.CIFAR10:{root.resolve()}", list(ds.classes), None)
