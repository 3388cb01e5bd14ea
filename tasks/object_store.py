"""The store at a URL: ``s3://bucket/prefix`` on any S3-compatible server (endpoint and credentials from the
standard AWS variables, e.g. ``AWS_ENDPOINT_URL``, or fsspec's config) or ``file:///shared/mount``.

An object store has no atomic rename. An entry is ``<root>/<stage>/<key>/manifest.json`` plus its files
under ``<key>/.parts-<writer uuid>/``, which the manifest names. A writer builds in a local scratch folder
(as for a path store), uploads the files under its own subprefix, then creates the manifest last with a
conditional create (``If-None-Match: *``; ``O_EXCL`` on a mount): the first writer wins, a loser deletes
its own parts and returns the winner's manifest.

Why a subprefix per writer: two hosts may build one key at once, and their files can differ (wall times in
``metrics/``). Uploading to shared paths, the loser could overwrite files that the winner's manifest already
describes; with its own subprefix no writer touches another's files, so a manifest always describes exactly
the objects it names. An upload cut off before its manifest leaves parts that no manifest names: never a
hit, garbage for :meth:`ObjectStore.remove`. A publisher whose create loses to a manifest that does not
verify (a damaged entry) deletes it and the parts it names, then creates its own.

A lookup reads the manifest and lists its parts, downloading nothing: the manifest's digest matches its
file list, and every file is present with its recorded size and stamp (ETag; mtime on a mount), so a part
rewritten or cut short is a miss. Downloads stream each file and check its sha256.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from diffprune.common.atomic import write_json
from diffprune.common.digests import sha256_file
from diffprune.common.errors import OutputWriteError, first_line
from diffprune.tasks.store import MANIFEST, Entry, StoreUnreachable, files_digest, install

PARTS = ".parts-"  # a writer's subprefix


class ObjectStore:
    """A URL store through fsspec: its file system and the root's path in it."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.fs, self.base = _filesystem(self.root)

    def _at(self, stage: str, key: str) -> str:
        return f"{self.base}/{stage}/{key}"

    def lookup(self, stage: str, key: str) -> dict | None:
        where = self._at(stage, key)
        try:
            return self._verified(where, self.fs.cat_file(f"{where}/{MANIFEST}"))
        except FileNotFoundError:
            return None

    def _verified(self, where: str, raw: bytes) -> dict | None:
        """The manifest ``raw`` if the parts it names are all there as uploaded, else None."""
        try:
            manifest = json.loads(raw)
            parts = f"{where}/{manifest['parts']}"
            listed = self.fs.find(parts, detail=True)
            ok = files_digest(manifest["files"]) == manifest["digest"] and all(
                (info := listed.get(f"{parts}/{rel}")) is not None and info["size"] == size
                and _stamp(info) == manifest["stamps"][rel] for rel, (size, _) in manifest["files"].items())
        except (FileNotFoundError, ValueError, KeyError, TypeError):  # cut off or damaged: a miss
            return None
        except Exception as exc:  # denied or gone mid-run: not a miss (the rebuild could not publish either)
            raise StoreUnreachable(f"store {self.root}: {type(exc).__name__}: {first_line(exc)}") from None
        return manifest if ok else None

    def publish(self, manifest: dict, scratch: Path, local: Path) -> tuple[dict, bool]:
        """Upload ``scratch`` under a subprefix of this writer's own, then create the manifest unless another
        writer did first. The winner's scratch becomes this host's copy; so does a loser's if identical."""
        stage, key = manifest["stage"], manifest["key"]
        where, parts = self._at(stage, key), f"{PARTS}{uuid.uuid4().hex}"
        try:
            rels = list(manifest["files"])
            if rels:  # one batched transfer: fsspec sends an object store's requests side by side
                self.fs.put([str(scratch / rel) for rel in rels], [f"{where}/{parts}/{rel}" for rel in rels])
            listed = self.fs.find(f"{where}/{parts}", detail=True)
            manifest = {**manifest, "parts": parts,
                        "stamps": {rel: _stamp(listed[f"{where}/{parts}/{rel}"]) for rel in manifest["files"]}}
            manifest = json.loads(json.dumps(manifest))  # as every reader will see it
            body = json.dumps(manifest, indent=2, sort_keys=True).encode()
            won = _create(self.fs, f"{where}/{MANIFEST}", body)
            if not won and self._winner(stage, key) is None:  # the manifest there stays damaged: replace it
                self._drop_damaged(where)
                won = _create(self.fs, f"{where}/{MANIFEST}", body)
        except Exception as exc:  # denied, full, unreachable: nothing was published (a manifest comes last)
            self._rm(f"{where}/{parts}")
            raise OutputWriteError(f"cannot publish {self.root}/{stage}/{key}: {type(exc).__name__}: "
                                   f"{first_line(exc)}; nothing was published") from None
        if not won:
            self._rm(f"{where}/{parts}")  # the loser's copy: no manifest names it
            winner = self._winner(stage, key)
            if winner is None:
                raise FileNotFoundError(f"{self.root}/{stage}/{key}: another writer published this key first, "
                                        "but its entry is damaged; run again to replace it")
            if winner["digest"] != manifest["digest"]:
                return winner, False
            manifest = winner
        write_json(scratch / MANIFEST, manifest)
        install(scratch, local)  # this host's copy: no download later
        return manifest, won

    def _winner(self, stage: str, key: str) -> dict | None:
        """The manifest that won the conditional create, verified. An object store shows a manifest whole or
        not at all; on a mount it may still be being written, so it is read again for up to 2 s."""
        for _ in range(20 if self.root.startswith("file://") else 1):
            found = self.lookup(stage, key)
            if found is not None:
                return found
            time.sleep(0.1)
        return None

    def _drop_damaged(self, where: str) -> None:
        """Delete a damaged entry's manifest (it would win every conditional create) and the parts it names,
        unless what is there verifies now. Another writer replacing the same damaged entry at the same
        moment may thus lose its manifest to this one: both entries are complete, so either is valid."""
        try:
            raw = self.fs.cat_file(f"{where}/{MANIFEST}")
        except FileNotFoundError:
            return
        if self._verified(where, raw) is not None:
            return
        try:
            parts = str(json.loads(raw).get("parts", ""))
        except (ValueError, AttributeError):
            parts = ""
        self.fs.rm_file(f"{where}/{MANIFEST}")
        if parts.startswith(PARTS) and "/" not in parts:
            self._rm(f"{where}/{parts}")

    def _rm(self, path: str) -> None:
        with contextlib.suppress(Exception):  # best effort: parts no manifest names are garbage, never a hit
            self.fs.rm(path, recursive=True)

    def download(self, manifest: dict, scratch: Path) -> None:
        """Every file of the entry into ``scratch`` (streamed to disk, never held in memory), each checked against
        its sha256."""
        parts = f"{self._at(manifest['stage'], manifest['key'])}/{manifest['parts']}"
        rels = list(manifest["files"])
        for rel in rels:
            (scratch / rel).parent.mkdir(parents=True, exist_ok=True)
        if rels:  # batched, side by side: an entry of thousands of small files costs no round trip each
            self.fs.get([f"{parts}/{rel}" for rel in rels], [str(scratch / rel) for rel in rels])
        for rel, (_, sha) in manifest["files"].items():
            if sha256_file(scratch / rel) != sha:
                raise FileNotFoundError(f"{self.root}/{manifest['stage']}/{manifest['key']}/{manifest['parts']}/"
                                        f"{rel}: content differs from its manifest (damaged in the store)")

    def entries(self) -> list[Entry]:
        try:
            listed = self.fs.find(self.base, detail=True)  # one listing, no manifest read
        except FileNotFoundError:
            return []
        sizes: dict[tuple[str, str], int] = {}
        created: dict[tuple[str, str], float] = {}
        for name, info in listed.items():
            stage, key, *rest = [*name[len(self.base) + 1:].split("/"), "", ""]
            if stage.startswith((".", "_")) or not rest[0] or info["type"] != "file":
                continue
            sizes[stage, key] = sizes.get((stage, key), 0) + info["size"]
            if rest[:2] == [MANIFEST, ""]:
                when = info.get("LastModified")
                created[stage, key] = when.timestamp() if when else float(info.get("mtime", 0.0))
        return [Entry(stage, key, sizes[stage, key], created[stage, key]) for stage, key in sorted(created)]

    def remove(self, stage: str, key: str) -> bool:
        where = self._at(stage, key)
        had = self.fs.exists(f"{where}/{MANIFEST}")
        if had:
            self.fs.rm_file(f"{where}/{MANIFEST}")
        self._rm(where)
        return had

    def check(self) -> None:
        if self.root.startswith("file://"):
            if not self.fs.isdir(self.base):
                raise StoreUnreachable(f"store {self.root}: {self.base} is not a folder (is the shared mount "
                                       "mounted?); create it or fix orchestration.store")
            return
        fs, _ = _filesystem(self.root, quick=True)
        bucket, _, prefix = self.base.partition("/")
        try:
            fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)
        except Exception as exc:
            endpoint = getattr(getattr(getattr(fs, "s3", None), "meta", None), "endpoint_url", "AWS's default")
            fix = ("create the bucket or fix orchestration.store" if isinstance(exc, FileNotFoundError) else
                   "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or fsspec's s3 config)"
                   if isinstance(exc, PermissionError) else
                   "check that the server runs and AWS_ENDPOINT_URL (or fsspec's s3 config) names it")
            raise StoreUnreachable(f"store {self.root} (endpoint {endpoint}): {type(exc).__name__}: "
                                   f"{first_line(exc).rstrip('.')}; {fix}") from None


def _stamp(info: dict) -> Any:
    """What the store says about an object's version: its ETag (changes with every upload), or its mtime."""
    return info.get("ETag") or info.get("mtime")


def _create(fs: Any, path: str, data: bytes) -> bool:
    """Create ``path`` unless it exists (If-None-Match: * on S3, O_EXCL on a file system): did this call?"""
    try:
        with fs.open(path, "xb") as fh:
            fh.write(data)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        cause: BaseException | None = exc  # s3fs says FileExistsError only if the 412 names its condition
        while cause is not None:
            error = (getattr(cause, "response", None) or {}).get("Error", {})
            if error.get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            cause = cause.__cause__
        raise


_FILESYSTEMS: dict[tuple, tuple[Any, str]] = {}


def _filesystem(root: str, quick: bool = False) -> tuple[Any, str]:
    """fsspec's file system for a URL store and the root's path in it: one per process (a client does not
    survive a fork), AWS settings and purpose (the preflight answers in seconds; a run keeps retrying)."""
    protocol = root.split("://", 1)[0]
    if protocol not in ("s3", "s3a", "file"):
        raise StoreUnreachable(f"store {root}: only s3:// (any S3-compatible server) and file:// URLs are "
                               "supported: publishing needs a conditional create")
    token = (root, quick, os.getpid(), tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))))
    if token not in _FILESYSTEMS:
        import fsspec

        options: dict[str, Any] = {"auto_mkdir": True}
        if protocol != "file":
            limits = {"connect_timeout": 3, "read_timeout": 5, "retries": {"max_attempts": 1}} if quick else {
                "connect_timeout": 10}
            configured = fsspec.config.conf.get("s3", {}).get("config_kwargs", {})
            options = {"skip_instance_cache": True, "use_listings_cache": False,  # listings go stale across hosts
                       "config_kwargs": {**configured, **limits} if quick else {**limits, **configured}}
        fs, path = fsspec.core.url_to_fs(root, **options)
        if quick:
            fs.retries = 1
        _FILESYSTEMS[token] = fs, path.rstrip("/")
    return _FILESYSTEMS[token]
