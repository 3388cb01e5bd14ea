"""A URL store entry of many small files (evaluate's sample images): the store's batched transfer vs one request
per file, side by side on one S3 server.

    python benchmarks/store_transfer.py                  # 2000 files of 4 KB
    python benchmarks/store_transfer.py --files 500 --kb 64

A SeaweedFS S3 gateway on loopback (the tests' launcher). "batched" is diffprune's own `ObjectStore.publish` and
`download` (one fsspec `put`/`get` over the entry's file lists); "per file" uploads and downloads the same files
with one `put_file`/`get_file` call each, as the store did before. Writes benchmarks/results/store_transfer.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the launcher the tests use

from benchmarks.common import save
from diffprune.common.digests import sha256_file
from diffprune.tasks.object_store import ObjectStore
from diffprune.tasks.store import files_digest


def _entry(folder: Path, n: int, size: int) -> dict[str, list]:
    for i in range(n):
        path = folder / "samples" / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
    return {p.relative_to(folder).as_posix(): [p.stat().st_size, sha256_file(p)]
            for p in sorted(folder.rglob("*")) if p.is_file()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--kb", type=int, default=4)
    args = ap.parse_args()
    from servers import seaweed

    seconds: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="diffprune-store-transfer-") as tmp, seaweed(Path(tmp) / "s3") as s3:
        tmp = Path(tmp)
        os.environ.update(s3.env)
        store = ObjectStore(f"s3://{s3.bucket}/bench")
        files = _entry(tmp / "batched", args.files, args.kb * 1024)
        manifest = {"stage": "evaluate", "key": "batched", "files": files, "digest": files_digest(files)}
        start = time.perf_counter()
        published, _ = store.publish(manifest, tmp / "batched", tmp / "installed")
        up = time.perf_counter() - start
        start = time.perf_counter()
        store.download(published, tmp / "batched-down")
        seconds["batched"] = {"upload": up, "download": time.perf_counter() - start}

        _entry(tmp / "single", args.files, args.kb * 1024)
        remote = f"{s3.bucket}/bench/evaluate/single"
        start = time.perf_counter()
        for rel in files:
            store.fs.put_file(str(tmp / "single" / rel), f"{remote}/{rel}")
        up = time.perf_counter() - start
        start = time.perf_counter()
        for rel in files:
            (tmp / "single-down" / rel).parent.mkdir(parents=True, exist_ok=True)
            store.fs.get_file(f"{remote}/{rel}", str(tmp / "single-down" / rel))
        seconds["per file"] = {"upload": up, "download": time.perf_counter() - start}

    markdown = (f"{args.files} files of {args.kb} KB, SeaweedFS S3 on loopback\n\n| transfer | upload | download |\n"
                "|---|---:|---:|\n" + "".join(f"| {name} | {s['upload']:.1f} s | {s['download']:.1f} s |\n"
                                              for name, s in seconds.items()))
    print(markdown)
    save("store_transfer", {"files": args.files, "kb": args.kb, "seconds": seconds}, markdown)


if __name__ == "__main__":
    main()
