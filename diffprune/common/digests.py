"""Content digests: what cache keys and store manifests compare (content, never paths or times)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import time
from collections.abc import Iterator
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
    digest = _folder_digest(path, {f: sha256_file(f) for f in files})
    if signature == tuple((str(f), *_stat(f)) for f in files):  # unchanged while it was read
        _DIGESTS[memo_key] = (signature, digest)
    return digest


def _folder_digest(root: Path, digests: dict[Path, str]) -> str:
    """A folder's digest from its files' content digests (in path order): relative path and digest of each."""
    h = hashlib.sha256()
    for f in sorted(digests):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + digests[f].encode() + b"\n")
    return h.hexdigest()


_DIGESTS: dict[tuple, tuple[tuple, str]] = {}


def _stat(f: Path) -> tuple[int, int, int]:
    st = f.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


def input_digest(path: str | Path) -> str:
    """:func:`dir_digest` of a large input from outside the store (an image folder, a teacher folder), with
    each file's content hash remembered across processes by its path, size, modification time and inode:
    an unchanged folder is not read again, a changed file is. Store entries are always read in full
    (:func:`dir_digest`): a damaged entry must be caught. The memory is an SQLite file at
    ``$DIFFPRUNE_DIGEST_CACHE`` (default ``~/.cache/diffprune/digests.sqlite``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    with _remembered() as db:
        known = {}
        for f in files:
            key, stat = str(f.resolve()), _stat(f)
            row = db.execute("SELECT sha FROM files WHERE path = ? AND size = ? AND mtime = ? AND ino = ?",
                             (key, *stat)).fetchone()
            known[f] = (key, stat, row[0] if row else None)
        new = []
        for f, (key, stat, digest) in known.items():
            if digest is None:
                digest = sha256_file(f)
                # Remembered only when unchanged while read and older than the clock's granularity: a file
                # rewritten within the same tick keeps its size and mtime ("racily clean", as git says).
                if _stat(f) == stat and time.time_ns() - stat[1] > _RACY_NS:
                    new.append((key, *stat, digest))
                known[f] = (key, stat, digest)
        with db:  # a short write at the end: other processes hashing their own inputs are not held up
            db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", new)
    if path.is_file():
        return known[path][2]
    return _folder_digest(path, {f: digest for f, (_, _, digest) in known.items()})


_RACY_NS = 2_000_000_000


@contextlib.contextmanager
def _remembered() -> Iterator[sqlite3.Connection]:
    location = Path(os.environ.get("DIFFPRUNE_DIGEST_CACHE") or Path.home() / ".cache" / "diffprune" / "digests.sqlite")
    location.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(location, timeout=60)  # the processes of a sweep share it
    try:
        db.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INT, mtime INT, ino INT, sha TEXT)")
        yield db
    finally:
        db.close()
