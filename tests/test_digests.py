"""Content digests: large inputs from outside the store are not re-read when unchanged, across processes."""

import json
import os
import subprocess
import sys

from diffprune.common.digests import dir_digest, input_digest

READS = """
import json, sys
from diffprune.common import digests
reads = []
original = digests.sha256_file
digests.sha256_file = lambda p: reads.append(str(p)) or original(p)
print(json.dumps({"digest": digests.input_digest(sys.argv[1]), "reads": len(reads)}))
"""


def _fresh_process(folder, cache) -> dict:
    env = {**os.environ, "DIFFPRUNE_DIGEST_CACHE": str(cache)}
    out = subprocess.run([sys.executable, "-c", READS, str(folder)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_an_unchanged_folder_of_2000_images_is_not_read_again_by_the_next_run(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2000):
        (folder / f"{i:04d}.png").write_bytes(i.to_bytes(2, "little") * 64)
        os.utime(folder / f"{i:04d}.png", (1.7e9, 1.7e9))  # an image folder made earlier
    cache = tmp_path / "digests.sqlite"
    first = _fresh_process(folder, cache)
    assert first == {"digest": dir_digest(folder), "reads": 2000}, "the same digest as a full read"
    assert _fresh_process(folder, cache) == {"digest": first["digest"], "reads": 0}
    (folder / "0007.png").write_bytes(b"changed")
    os.utime(folder / "0007.png", (1.75e9, 1.75e9))
    assert _fresh_process(folder, cache)["reads"] == 1
    (folder / "0008.png").write_bytes(b"just now")  # within the clock's granularity: read until it is older
    changed = _fresh_process(folder, cache)
    assert changed["reads"] == 1 and changed["digest"] == dir_digest(folder) != first["digest"]
    assert _fresh_process(folder, cache)["reads"] == 1, "a file written just now is read again"


def test_a_single_file_input_digests_as_its_content(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFPRUNE_DIGEST_CACHE", str(tmp_path / "d.sqlite"))
    (tmp_path / "w.pt").write_bytes(b"weights")
    assert input_digest(tmp_path / "w.pt") == dir_digest(tmp_path / "w.pt")
