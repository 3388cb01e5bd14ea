"""Datasets → a versionable prepared folder: uint8 arrays, labels and a JSON manifest.

Layout written by :func:`prepare_dataset` (all arrays NHWC uint8, saved with ``allow_pickle=False``)::

    train.npy  train_labels.npy  test.npy  test_labels.npy  manifest.json  [captions.json]

``captions.json`` (``{"train": [...], "test": [...]}``: per image its caption, or the list of its captions)
is written for text models, from ``data.captions`` (a JSONL file) or ``data.caption_template`` over the
class names.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffprune.common.atomic import atomic_dir, write_json
from diffprune.common.digests import sha256_file
from diffprune.common.errors import DiffpruneError
from diffprune.common.version import VERSION
from diffprune.data.sources import Split, load_source
from diffprune.pipeline.stage_params import DataParams

_ARRAYS = ("train", "train_labels", "test", "test_labels")


@dataclass(frozen=True)
class Prepared:
    train: np.ndarray
    train_labels: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray
    manifest: dict
    captions: dict[str, list] | None = None  # "train" / "test": per image a caption or a list of captions

    @property
    def channels(self) -> int:
        return int(self.train.shape[-1])

    @property
    def resolution(self) -> int:
        return int(self.train.shape[1])


def prepare_dataset(params: DataParams, out_dir: str | Path) -> dict:
    """Build the dataset named by ``params`` and write it atomically to ``out_dir``; return the manifest."""
    source = load_source(params)
    train, test, classes = source.train, source.test, source.classes
    captions = None if train.texts is None else {"train": train.texts, "test": test.texts}
    if params.caption_template is not None:
        if not classes:
            raise DiffpruneError("data.caption_template needs class labels (class subfolders for imagefolder)")
        captions = {name: [params.caption_template.format(label=classes[i]) for i in split.labels]
                    for name, split in (("train", train), ("test", test))}
    manifest = {
        "dataset": params.dataset,
        "source": source.name,
        "resolution": params.resolution,
        "channels": params.n_channels,
        "n_train": train.n,
        "n_test": test.n,
        "classes": classes,
        "seed": params.seed,
        "diffprune_version": VERSION,
        "files": {},
    }
    with atomic_dir(out_dir) as tmp:
        for name, split in (("train", train), ("test", test)):
            _write_images(tmp / f"{name}.npy", split, params)
            np.save(tmp / f"{name}_labels.npy", split.labels, allow_pickle=False)
        for name in _ARRAYS:
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
        # Memory-mapped: a stage reads the images it uses, never the whole set at once.
        arrays.append(np.load(path, mmap_mode="r", allow_pickle=False))
    captions = None
    if "captions.json" in files:
        path = data_dir / "captions.json"
        if not path.is_file() or sha256_file(path) != files["captions.json"]:
            raise DiffpruneError(f"{path}: missing or does not match its checksum in manifest.json")
        captions = json.loads(path.read_text())
    return Prepared(*arrays, manifest=manifest, captions=captions)


def _write_images(path: Path, split: Split, params: DataParams) -> None:
    """The split's images into one ``.npy`` file, one image at a time (never the whole array in memory)."""
    shape = (split.n, params.resolution, params.resolution, params.n_channels)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    for k in range(split.n):
        out[k] = split.read(k)
        if (k + 1) % 1024 == 0:
            out.flush()  # written pages can leave memory
    out.flush()
    del out
