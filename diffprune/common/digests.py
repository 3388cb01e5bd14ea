"""Content digests: what cache keys and store manifests compare (content, never paths or times)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Chunked so multi-GB checkpoints are never read into memory whole."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def dir_digest(path: str | Path, exclude: tuple[str, ...] = ()) -> str:
    """sha256 over every file's relative path and content (a single file: its content).

    ``exclude`` names top-level entries left out (a manifest that records the digest itself). Within one
    process a folder is read once: later calls re-stat its files and reuse the digest while every file
    keeps its size, modification time and inode (a run checks the same store entry several times; each
    new process reads everything again, so a damaged entry is still caught by the next run).
    """
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise FileNotFoundError(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.relative_to(path).parts[0] not in exclude)
    signature = tuple((str(f), *_stat(f)) for f in files)
    memo_key = (str(path.resolve()), exclude)
    known = _DIGESTS.get(memo_key)
    if known is not None and known[0] == signature:
        return known[1]
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + sha256_file(f).encode() + b"\n")
    if signature == tuple((str(f), *_stat(f)) for f in files):  # unchanged while it was read
        _DIGESTS[memo_key] = (signature, h.hexdigest())
    return h.hexdigest()


_DIGESTS: dict[tuple, tuple[tuple, str]] = {}


def _stat(f: Path) -> tuple[int, int, int]:
    st = f.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino
