"""The content-addressed stage store: one entry per (stage, cache key), published whole or not at all.

``orchestration.store`` is a local path or a URL (``s3://bucket/prefix``, ``file:///shared/mount``: see
:mod:`diffprune.tasks.object_store`). Every entry holds ``output/`` (the model, data, scores or samples),
``metrics/``, the ``params.yaml`` the stage ran with, and ``manifest.json``: the digest of everything else
and each file's size and sha256 (``files``). Content that no longer matches its manifest is absent, so a
damaged or half-written entry is recomputed, never handed to a later stage.

A path store keeps ``<root>/<stage>/<key>/``, built in a scratch folder and renamed into place under a
per-key file lock: runs with different params write different folders; a second run with the same params
waits for the lock and finds the first's result. Stages read and write local files only: a URL store's
entry is read through a copy in this host's cache folder (``orchestration.store_cache``), laid out as a
path store entry, and published after the stage succeeds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, NamedTuple

from diffprune.common.atomic import file_lock, refused_writes, write_json
from diffprune.common.digests import dir_digest, sha256_file
from diffprune.common.errors import DiffpruneError

if TYPE_CHECKING:
    from diffprune.tasks.object_store import ObjectStore

MANIFEST = "manifest.json"
log = logging.getLogger(__name__)


class StoreUnreachable(DiffpruneError):
    """The store's URL does not answer, lacks its bucket or refuses the credentials (exit 2: fix the setting)."""


class Entry(NamedTuple):
    stage: str
    key: str
    size: int  # bytes, everything stored under the entry
    created: float  # epoch seconds


def is_url(root: str | Path) -> bool:
    return "://" in str(root)


def beside(root: str, cache: str) -> Path:
    """The local folder for what sits beside the store (reports): a path store's parent, or a URL store's
    cache's parent (both ``artifacts/`` by default)."""
    return Path(cache if is_url(root) else root).parent


@dataclass(frozen=True)
class Store:
    """A store root (a path or a URL) and, for a URL store, this host's local cache of its entries."""

    root: str
    cache: str | None = None

    @classmethod
    def at(cls, root: str | Path | Store, cache: str | Path | None = None) -> Store:
        return root if isinstance(root, Store) else cls(str(root), None if cache is None else str(cache))

    def __str__(self) -> str:
        return self.root

    def entry(self, stage: str, key: str) -> Path | str:
        """Where the entry lives: a folder, or a URL."""
        return f"{self.root.rstrip('/')}/{stage}/{key}" if is_url(self.root) else Path(self.root) / stage / key

    def local(self, stage: str, key: str) -> Path:
        """Where this host reads the entry's files: the entry itself, or its copy in the cache."""
        if not is_url(self.root):
            return Path(self.root) / stage / key
        if self.cache is None:
            raise ValueError(f"store {self.root}: a URL store needs a local cache folder (orchestration.store_cache)")
        return Path(self.cache) / stage / key

    def lookup(self, stage: str, key: str) -> dict | None:
        """The manifest of a complete, undamaged entry; ``None`` if it is missing or its content changed."""
        if is_url(self.root):
            return _remote(self.root).lookup(stage, key)
        folder = self.local(stage, key)
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            if manifest.get("digest") == dir_digest(folder, exclude=(MANIFEST,)):
                return manifest
        except (OSError, ValueError):
            pass
        return None

    def manifest_of(self, ref: dict) -> dict:
        """The verified manifest behind a stage reference (``{"stage", "key"}``) returned by a task."""
        manifest = self.lookup(ref["stage"], ref["key"])
        if manifest is None:
            raise FileNotFoundError(f"{self.entry(ref['stage'], ref['key'])}: stage output missing or damaged")
        return manifest

    def folder(self, ref: dict) -> Path:
        """A local folder holding the entry's files (a URL store's entry is fetched into the cache first)."""
        stage, key = ref["stage"], ref["key"]
        local = self.local(stage, key)
        if not is_url(self.root):
            return local
        manifest = self.manifest_of(ref)
        if _holds(local, manifest):
            return local
        with refused_writes(local), self.locked(stage, key):
            if not _holds(local, manifest):  # else another process of this host fetched it meanwhile
                log.info("downloading %s into %s", self.entry(stage, key), local)
                with _scratch(local) as scratch:
                    _remote(self.root).download(manifest, scratch)
                    write_json(scratch / MANIFEST, manifest)
                    install(scratch, local)
        return local

    @contextlib.contextmanager
    def locked(self, stage: str, key: str) -> Iterator[None]:
        """Hold an exclusive lock on one key on this host (processes and threads alike) while it is computed
        or fetched. Across hosts a URL store's conditional create decides, not a lock."""
        with file_lock(self.local(stage, key).parent / ".locks" / f"{key}.lock"):
            yield

    def publish(self, stage: str, key: str, build: Callable[[Path], dict], record: dict) -> tuple[dict, bool]:
        """Return the entry's manifest, building it with ``build(scratch_dir)`` unless a valid one exists.

        ``build`` fills the scratch folder and returns the stage summary; the entry appears only once its
        manifest is written. Returns ``(manifest, built)``: built is False when the entry was found, or when
        another writer published the key first (its manifest is returned, this build discarded).
        """
        local = self.local(stage, key)
        with refused_writes(local), self.locked(stage, key):  # a full disk here: one line, not a traceback
            found = self.lookup(stage, key)
            if found is not None:
                return found, False
            with _scratch(local) as scratch:
                start = time.perf_counter()
                summary = build(scratch)
                manifest = {**record, "stage": stage, "key": key, "summary": summary,
                            "seconds": round(time.perf_counter() - start, 2), "created": time.time(),
                            **_content(scratch)}
                if is_url(self.root):
                    return _remote(self.root).publish(manifest, scratch, local)
                write_json(scratch / MANIFEST, manifest)
                install(scratch, local)
                return manifest, True

    def entries(self) -> list[Entry]:
        """Every entry with a manifest (not verified: listing must stay cheap), by stage and key."""
        if is_url(self.root):
            return _remote(self.root).entries()
        out = []
        for manifest in sorted(Path(self.root).glob(f"*/*/{MANIFEST}")):
            stage, key = manifest.parts[-3], manifest.parts[-2]
            if not stage.startswith((".", "_")) and not key.startswith("."):
                size = sum(f.stat().st_size for f in manifest.parent.rglob("*") if f.is_file())
                out.append(Entry(stage, key, size, manifest.stat().st_mtime))
        return out

    def remove(self, stage: str, key: str) -> bool:
        """Delete an entry, its manifest first (so it is never seen half-deleted); True if it had one."""
        with self.locked(stage, key):
            if is_url(self.root):
                had = _remote(self.root).remove(stage, key)
                shutil.rmtree(self.local(stage, key), ignore_errors=True)
                return had
            folder = self.local(stage, key)
            had = (folder / MANIFEST).exists()
            (folder / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(folder, ignore_errors=True)
            return had

    def check(self) -> None:
        """Raise :class:`StoreUnreachable` in seconds, one line naming the URL and the cause, unless a URL
        store answers and holds its bucket (or mount folder). A path store is created when first written."""
        if is_url(self.root):
            _remote(self.root).check()


def _remote(root: str) -> ObjectStore:
    from diffprune.tasks.object_store import ObjectStore  # fsspec and its S3 client: only for a URL store

    return ObjectStore(root)


def _content(folder: Path) -> dict:
    """The manifest's content fields: each file's size and sha256, and the digests
    :func:`~diffprune.common.digests.dir_digest` would give (each file is read once, however large)."""
    files = {p.relative_to(folder).as_posix(): [p.stat().st_size, sha256_file(p)]
             for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder).parts[0] != MANIFEST}
    output = {rel[len("output/"):]: v for rel, v in files.items() if rel.startswith("output/")}
    if "output" in files:  # a single file
        output_digest = files["output"][1]
    else:
        output_digest = files_digest(output) if (folder / "output").is_dir() else None
    # output_digest is what later stages' keys see: it must not move with wall times in metrics/
    return {"digest": files_digest(files), "output_digest": output_digest, "files": files}


def files_digest(files: dict[str, list]) -> str:
    """dir_digest's formula over a ``files`` map: relative path and sha256 of each file, in path order."""
    h = hashlib.sha256()
    for rel in sorted(files, key=lambda r: PurePosixPath(r).parts):
        h.update(rel.encode() + b"\0" + files[rel][1].encode() + b"\n")
    return h.hexdigest()


def _holds(local: Path, manifest: dict) -> bool:
    """Does the local copy hold exactly the manifest's content?"""
    try:
        return dir_digest(local, exclude=(MANIFEST,)) == manifest["digest"]
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _scratch(target: Path) -> Iterator[Path]:
    """A scratch folder beside ``target``, removed unless it was renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def install(scratch: Path, target: Path) -> None:
    """Rename ``scratch`` to ``target``; damaged leftovers there are set aside, then dropped."""
    if target.exists():
        aside = target.with_name(f".{target.name}.damaged-{os.getpid()}")
        os.replace(target, aside)
        shutil.rmtree(aside, ignore_errors=True)
    os.replace(scratch, target)


# The functional API the tasks and flows call; ``root`` is a path or URL string, or a Store (which also
# knows this host's cache folder for a URL store).
Root = str | Path | Store


def entry(root: Root, stage: str, key: str) -> Path | str:
    return Store.at(root).entry(stage, key)


def lookup(root: Root, stage: str, key: str) -> dict | None:
    return Store.at(root).lookup(stage, key)


def folder(root: Root, ref: dict) -> Path:
    return Store.at(root).folder(ref)


def manifest_of(root: Root, ref: dict) -> dict:
    return Store.at(root).manifest_of(ref)


def locked(root: Root, stage: str, key: str) -> contextlib.AbstractContextManager[None]:
    return Store.at(root).locked(stage, key)


def publish(root: Root, stage: str, key: str, build: Callable[[Path], dict], record: dict) -> tuple[dict, bool]:
    return Store.at(root).publish(stage, key, build, record)


def entries(root: Root) -> list[Entry]:
    return Store.at(root).entries()


def remove(root: Root, stage: str, key: str) -> bool:
    return Store.at(root).remove(stage, key)


def check(root: Root) -> None:
    Store.at(root).check()


def reference(stage: str, key: str) -> dict:
    """The small JSON-able value a task returns: which entry, never its content nor a path. A cached
    reference is thus valid for whichever store holds the entry (the cache policy checks that it does)."""
    return {"stage": stage, "key": key}
