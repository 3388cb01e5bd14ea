"""Atomic artifact writes: a reader (a later stage, a cache hit) never sees a half-written output."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diffprune.common.errors import OutputWriteError

# Errors of the machine, not of the program: each with what the user can do about it.
ENVIRONMENT_ERRORS = {
    errno.ENOSPC: "free disk space",
    errno.EDQUOT: "free space within your disk quota",
    errno.EFBIG: "a file-size limit (ulimit -f) is in the way: raise it",
    errno.EACCES: "no permission to write there: fix the folder's permissions or choose another output",
    errno.EPERM: "no permission to write there: fix the folder's permissions or choose another output",
    errno.EROFS: "the file system is read-only: choose another output",
}


def environment_error(exc: BaseException) -> OSError | None:
    """``exc`` as the OSError of a refused write, or None. safetensors reports those as
    ``SafetensorError: … I/O error: File too large (os error 27)``, which is not an OSError."""
    if isinstance(exc, OSError):
        return exc if exc.errno in ENVIRONMENT_ERRORS else None
    found = type(exc).__name__ == "SafetensorError" and re.search(r"os error (\d+)|Os \{ code: (\d+)", str(exc))
    if found:
        code = int(found.group(1) or found.group(2))
        return OSError(code, os.strerror(code)) if code in ENVIRONMENT_ERRORS else None
    return None


@contextlib.contextmanager
def refused_writes(target: str | Path) -> Iterator[None]:
    """Turn a refused write under ``target`` into one :class:`OutputWriteError` naming the path and the cause."""
    try:
        yield
    except Exception as exc:
        err = environment_error(exc)
        if err is None:
            raise
        name = Path(err.filename).name if err.filename else ""
        inside = f" ({name})" if name and name != Path(target).name else ""
        code = errno.errorcode.get(err.errno, err.errno)
        raise OutputWriteError(f"cannot write {target}{inside}: {err.strerror} ({code}); "
                               f"{ENVIRONMENT_ERRORS[err.errno]}. Nothing half-written was left; earlier outputs "
                               "are intact") from None


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a scratch directory that replaces ``target`` only if the block finishes.

    On error the scratch directory is removed and an existing ``target`` is left untouched.
    """
    target = Path(target)
    with refused_writes(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        with refused_writes(target):
            yield tmp
            _fsync_tree(tmp)
            old = None
            if target.exists():
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.replace(target, old)
            os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temp file next to ``target``; rename it over ``target`` when the block finishes."""
    target = Path(target)
    with refused_writes(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        with refused_writes(target):
            with os.fdopen(fd, mode) as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed): serialises processes and threads alike."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_file(path) as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
