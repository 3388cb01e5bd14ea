import json
import urllib.error

import numpy as np
import pytest
from PIL import Image

from diffprune.common.errors import DiffpruneError
from diffprune.data.datasets import load_prepared, prepare_dataset
from diffprune.pipeline.stage_params import DataParams


def test_digits_prepared_with_fixed_split(tmp_path):
    params = DataParams(resolution=16)
    manifest = prepare_dataset(params, tmp_path / "a")
    data = load_prepared(tmp_path / "a")
    assert data.train.shape == (1438, 16, 16, 1) and data.test.shape == (359, 16, 16, 1)
    assert data.train.dtype == np.uint8 and data.train.max() > 200
    assert manifest["n_train"] + manifest["n_test"] == 1797
    assert sorted(np.unique(data.train_labels)) == list(range(10))
    prepare_dataset(params, tmp_path / "b")
    again = load_prepared(tmp_path / "b")
    assert np.array_equal(data.test, again.test) and np.array_equal(data.train_labels, again.train_labels)
    other = prepare_dataset(DataParams(resolution=16, seed=1), tmp_path / "c")
    assert other["files"]["test.npy"] != manifest["files"]["test.npy"]


def test_imagefolder_labels_from_subfolders_resize_and_crop(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(5):
            arr = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
            ext = ["png", "jpg", "webp"][i % 3]
            Image.fromarray(arr).save(tmp_path / "imgs" / cls / f"{i}.{ext}")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image, and ignored")
    manifest = prepare_dataset(DataParams(dataset="imagefolder", path=str(tmp_path / "imgs"), resolution=8,
                                          test_fraction=0.2), tmp_path / "out")
    data = load_prepared(tmp_path / "out")
    assert manifest["classes"] == ["cat", "dog"]
    assert data.train.shape[1:] == (8, 8, 3) and len(data.train) + len(data.test) == 10
    assert set(np.concatenate([data.train_labels, data.test_labels])) == {0, 1}
    gray = prepare_dataset(DataParams(dataset="imagefolder", path=str(tmp_path / "imgs"), resolution=8,
                                      channels=1), tmp_path / "gray")
    assert gray["channels"] == 1 and load_prepared(tmp_path / "gray").train.shape[-1] == 1


def test_flat_imagefolder_has_no_labels(tmp_path):
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), i * 40, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    prepare_dataset(DataParams(dataset="imagefolder", path=str(tmp_path), resolution=8, test_fraction=0.25),
                    tmp_path / "out")
    assert (load_prepared(tmp_path / "out").train_labels == -1).all()


@pytest.mark.parametrize("setup", ["empty", "non_image", "corrupt", "missing"])
def test_bad_imagefolder_fails_cleanly(tmp_path, setup):
    root = tmp_path / "imgs"
    if setup != "missing":
        root.mkdir()
    if setup == "non_image":
        (root / "a.txt").write_text("hello")
    if setup == "corrupt":
        (root / "a.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "out"
    with pytest.raises(DiffpruneError) as info:
        prepare_dataset(DataParams(dataset="imagefolder", path=str(root)), out)
    assert "\n" not in str(info.value)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_failed_prepare_keeps_previous_output(tmp_path):
    out = tmp_path / "out"
    prepare_dataset(DataParams(resolution=8, max_images=50), out)
    before = (out / "manifest.json").read_text()
    with pytest.raises(DiffpruneError):
        prepare_dataset(DataParams(dataset="imagefolder", path=str(tmp_path / "nowhere")), out)
    assert (out / "manifest.json").read_text() == before


def test_tampered_prepared_data_is_refused(tmp_path):
    out = tmp_path / "out"
    prepare_dataset(DataParams(resolution=8, max_images=50), out)
    arr = np.load(out / "train.npy")
    np.save(out / "train.npy", arr[::-1].copy())
    with pytest.raises(DiffpruneError, match="checksum"):
        load_prepared(out)
    with pytest.raises(DiffpruneError, match="not a prepared dataset"):
        load_prepared(tmp_path)


class _FakeCIFAR10:
    """Stands in for torchvision's class: the local-copy layout is torchvision's business."""

    classes = ("airplane", "automobile")

    def __init__(self, root, train, download):
        n = 10 if train else 4
        self.data = np.random.default_rng(int(train)).integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
        self.targets = [i % 2 for i in range(n)]


def test_cifar10_uses_torchvision_and_resizes(tmp_path, monkeypatch):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _FakeCIFAR10)
    manifest = prepare_dataset(DataParams(dataset="cifar10", path=str(tmp_path), resolution=16), tmp_path / "out")
    data = load_prepared(tmp_path / "out")
    assert data.train.shape == (10, 16, 16, 3) and data.test.shape == (4, 16, 16, 3)
    assert manifest["classes"] == ["airplane", "automobile"]


def test_cifar10_offline_without_copy_says_how_to_provide_it(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(root, train, download):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DiffpruneError) as info:
        prepare_dataset(DataParams(dataset="cifar10", path=str(tmp_path / "c10")), tmp_path / "out")
    message = str(info.value)
    assert "cifar-10-python.tar.gz" in message and str(tmp_path / "c10") in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_manifest_is_json_with_checksums(digits_dir):
    manifest = json.loads((digits_dir / "manifest.json").read_text())
    assert set(manifest["files"]) == {"train.npy", "train_labels.npy", "test.npy", "test_labels.npy"}
    assert manifest["source"] == "sklearn.datasets.load_digits"
