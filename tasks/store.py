"""The content-addressed stage store: one folder per (stage, cache key), published whole or not at all.

``<root>/<stage>/<key>/`` holds ``output/`` (the model, data, scores or samples), ``metrics/``, the
``params.yaml`` the stage ran with, and ``manifest.json`` recording a digest of everything else. A
folder whose content no longer matches its digest is treated as absent, so a damaged or half-deleted
output is recomputed, never handed to a later stage. Runs with different params write different
folders; runs with the same params take a per-key file lock, so the second one finds the first's result.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from diffprune.common.atomic import file_lock, refused_writes, write_json
from diffprune.common.digests import dir_digest

MANIFEST = "manifest.json"


def entry(root: str | Path, stage: str, key: str) -> Path:
    return Path(root) / stage / key


def lookup(root: str | Path, stage: str, key: str) -> dict | None:
    """The manifest of a complete, undamaged entry; ``None`` if it is missing or its content changed."""
    folder = entry(root, stage, key)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("digest") == dir_digest(folder, exclude=(MANIFEST,)):
            return manifest
    except (OSError, ValueError):
        pass
    return None


def folder(root: str | Path, ref: dict) -> Path:
    """Where a stage reference's entry lives in the store at ``root``."""
    return entry(root, ref["stage"], ref["key"])


def manifest_of(root: str | Path, ref: dict) -> dict:
    """The verified manifest behind a stage reference (``{"stage", "key"}``) returned by a task."""
    manifest = lookup(root, ref["stage"], ref["key"])
    if manifest is None:
        raise FileNotFoundError(f"{folder(root, ref)}: stage output missing or damaged")
    return manifest


@contextlib.contextmanager
def locked(root: str | Path, stage: str, key: str) -> Iterator[None]:
    """Hold an exclusive lock on one key (processes and threads alike) while it is computed."""
    with file_lock(Path(root) / stage / ".locks" / f"{key}.lock"):
        yield


def publish(root: str | Path, stage: str, key: str, build: Callable[[Path], dict], record: dict) -> tuple[dict, bool]:
    """Return the entry's manifest, building it with ``build(scratch_dir)`` unless a valid one exists.

    ``build`` fills the scratch folder and returns the stage summary; the folder is renamed into place
    only after its digest and manifest are written. Returns ``(manifest, built)``.
    """
    folder = entry(root, stage, key)
    with refused_writes(folder), locked(root, stage, key):  # a full disk here: one line, not a traceback
        found = lookup(root, stage, key)
        if found is not None:
            return found, False
        scratch = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=folder.parent))
        try:
            start = time.perf_counter()
            summary = build(scratch)
            manifest = {**record, "stage": stage, "key": key, "summary": summary,
                        "seconds": round(time.perf_counter() - start, 2), "created": time.time(),
                        "digest": dir_digest(scratch, exclude=(MANIFEST,)),
                        # what later stages consume: their keys must not move with wall times in metrics/
                        "output_digest": dir_digest(scratch / "output") if (scratch / "output").exists() else None}
            write_json(scratch / MANIFEST, manifest)
            if folder.exists():  # damaged leftovers: set aside, then drop
                aside = folder.with_name(f".{key}.damaged-{os.getpid()}")
                os.replace(folder, aside)
                shutil.rmtree(aside, ignore_errors=True)
            os.replace(scratch, folder)
            return manifest, True
        finally:
            if scratch.exists():
                shutil.rmtree(scratch, ignore_errors=True)


def reference(stage: str, key: str) -> dict:
    """The small JSON-able value a task returns: which entry, never its content nor a path. A cached
    reference is thus valid for whichever store holds the entry (the cache policy checks that it does)."""
    return {"stage": stage, "key": key}
