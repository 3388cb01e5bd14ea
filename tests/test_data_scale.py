"""A prepared set larger than memory allows: prepare streams images into the arrays one at a time, and stages
map the arrays instead of loading them (measured as the process's anonymous memory: the mapped file's pages
are page cache, which the kernel takes back under pressure)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

N, SIDE = 2000, 256
ARRAY_MB = N * SIDE * SIDE * 3 / 2**20  # ≈ 375 MiB as one uint8 array

PEAK = """
import json, sys, threading, time
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
peak, done = [0.0], []
def watch():
    while not done:
        peak[0] = max(peak[0], anon()); time.sleep(0.002)
{setup}
base = anon(); thread = threading.Thread(target=watch); thread.start()
{work}
done.append(1); thread.join(); peak[0] = max(peak[0], anon())
print(json.dumps({{"increase_mb": peak[0] - base}}))
"""


def _peak_increase(setup: str, work: str) -> float:
    code = PEAK.format(setup=setup, work=work)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])["increase_mb"]


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("big") / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N):  # smooth random images: small PNGs, quick to write
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((SIDE, SIDE), Image.BILINEAR).save(root / f"{i:04d}.png", compress_level=1)
    return root


@pytest.mark.slow
def test_a_large_folder_prepares_and_is_read_without_holding_it(big_folder, tmp_path):
    params = f"DataParams(dataset='imagefolder', path={str(big_folder)!r}, resolution={SIDE}, channels=3)"
    prepare = _peak_increase(
        "from diffprune.data.datasets import prepare_dataset\nfrom diffprune.pipeline.stage_params import DataParams",
        f"prepare_dataset({params}, {str(tmp_path / 'prepared')!r})")
    assert prepare < ARRAY_MB / 2, f"prepare held {prepare:.0f} MiB of a {ARRAY_MB:.0f} MiB set"
    # a stage that reads the set: load and verify it, fingerprint it as training does, train on batches of it
    read = _peak_increase(
        "import numpy as np, torch\nfrom diffprune.data.datasets import load_prepared\n"
        "from diffprune.family.diffusion import images_to_tensor\n"
        "from diffprune.training.checkpoint import _content_digest",
        f"data = load_prepared({str(tmp_path / 'prepared')!r})\n"
        "digest = _content_digest(data.train)\n"
        "for step in range(20):\n"
        "    x0 = images_to_tensor(data.train[np.random.default_rng(step).integers(0, len(data.train), 16)])")
    assert read < ARRAY_MB / 2, f"reading held {read:.0f} MiB of a {ARRAY_MB:.0f} MiB set"


def test_a_mapped_set_fingerprints_as_its_bytes(tmp_path):
    from diffprune.data.datasets import load_prepared, prepare_dataset
    from diffprune.pipeline.stage_params import DataParams
    from diffprune.training.checkpoint import _content_digest

    prepare_dataset(DataParams(), tmp_path / "digits")
    data = load_prepared(tmp_path / "digits")
    assert isinstance(data.train, np.memmap)
    assert _content_digest(data.train) == _content_digest(np.array(data.train))
