"""What the content-addressed store holds beside its entries, and removing what nothing references.

:func:`inventory` lists a store from its listings (nothing is read or verified): the entries (as
:meth:`Store.entries` defines them) and what is not an entry. On a URL store: parts that no manifest names
(an upload cut off before its manifest, or a loser's parts not yet deleted); on a path store: scratch
folders of builds (``.<key>.tmp-…``), damaged folders set aside or left without a manifest. Both: the
training checkpoints (``_checkpoints``), Prefect's result records (``_prefect_results``), locks.

:func:`plan` decides from the references the caller found (cache keys, registered versions), closing over
the manifests' ``inputs``: what a kept entry's manifest names as its inputs is kept too, so a model's whole
chain stays even where a run's tags are incomplete. :func:`delete` removes entries through
:meth:`Store.remove` (manifest first, under the key's lock) and old leftovers, never a scratch folder whose
key lock a build on this host holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from diffprune.common.errors import DiffpruneError, OutputWriteError, first_line
from diffprune.tasks.store import MANIFEST, Entry, Store, StoreUnreachable, is_url


@dataclass
class Leftover:
    """Stored bytes that are not an entry: a cut-off upload's parts, a build's scratch, a damaged folder."""

    where: str  # a path, or a URL store's path relative to its root
    what: str
    size: int
    newest: float  # the newest file's time: a leftover still being written is not old
    lock: Path | None = None  # a path store's key lock: held while a build runs on this host


@dataclass
class Inventory:
    entries: list[Entry]
    leftovers: list[Leftover] = field(default_factory=list)
    other: dict[str, int] = field(default_factory=dict)  # _checkpoints, _prefect_results, locks → bytes


def inventory(store: Store) -> Inventory:
    """Entries and everything else under the store's root (and its size), from listings: nothing is verified."""
    try:
        return _url_inventory(store) if is_url(store.root) else _path_inventory(Path(store.root))
    except DiffpruneError:
        raise
    except Exception as exc:
        raise StoreUnreachable(f"store {store.root}: cannot list it: {type(exc).__name__}: {first_line(exc)}") from None


def _path_inventory(root: Path) -> Inventory:
    found = Inventory(Store(str(root)).entries())  # the store's own notion of an entry
    named = {(e.stage, e.key) for e in found.entries}
    for top in sorted(root.iterdir()) if root.is_dir() else ():
        if top.name.startswith(("_", ".")) or not top.is_dir():
            found.other[top.name] = tree_size(top)[0]
            continue
        for sub in sorted(top.iterdir()):
            if (top.name, sub.name) in named:
                continue
            size, newest = tree_size(sub)
            if sub.name == ".locks" or not sub.is_dir():
                found.other["locks, stray files"] = found.other.get("locks, stray files", 0) + size
                continue
            key = sub.name.lstrip(".").split(".tmp-")[0].split(".damaged-")[0]
            what = "scratch" if ".tmp-" in sub.name else "damaged (no manifest)"
            found.leftovers.append(Leftover(str(sub), what, size, newest, top / ".locks" / f"{key}.lock"))
    return found


def _url_inventory(store: Store) -> Inventory:
    from diffprune.tasks.object_store import PARTS, ObjectStore

    remote = ObjectStore(store.root)
    try:
        listed = remote.fs.find(remote.base, detail=True)  # one listing
    except FileNotFoundError:
        listed = {}
    found = Inventory([])
    keys: dict[tuple[str, str], dict[str, list]] = {}  # (stage, key) → part ("manifest.json", ".parts-…") → [size, t]
    for name, info in listed.items():
        if info.get("type") != "file":
            continue
        rel, t = name[len(remote.base) + 1:].split("/"), _time(info)
        if rel[0].startswith(("_", ".")) or len(rel) < 3:
            label = rel[0] if len(rel) > 1 else "stray files"
            found.other[label] = found.other.get(label, 0) + info["size"]
            continue
        slot = keys.setdefault((rel[0], rel[1]), {}).setdefault(rel[2], [0, 0.0])
        slot[0], slot[1] = slot[0] + info["size"], max(slot[1], t)
    for (stage, key), parts in sorted(keys.items()):
        named: set[str] = set()
        if MANIFEST in parts:
            candidates = [p for p in parts if p.startswith(PARTS)]
            if len(candidates) > 1:  # a loser's or a cut-off upload beside the entry: the manifest says which
                named = {str((_manifest(store, stage, key) or {}).get("parts"))}
            else:
                named = set(candidates)
            size = sum(parts[p][0] for p in named | {MANIFEST} if p in parts)
            found.entries.append(Entry(stage, key, size, parts[MANIFEST][1]))
        for part, (size, newest) in parts.items():
            if part not in named | {MANIFEST}:
                what = "cut-off upload (parts no manifest names)" if part.startswith(PARTS) else "stray files"
                found.leftovers.append(Leftover(f"{stage}/{key}/{part}", what, size, newest))
    return found


def plan(store: Store, found: Inventory, refs: dict[str, str], models: set[tuple[str, str]],
         cutoff: float) -> tuple[dict[str, str], list[Entry], list[Leftover]]:
    """Kept keys (why), the entries to remove and the leftovers to remove (last written before ``cutoff``)."""
    by_key: dict[str, list[Entry]] = {}
    for e in found.entries:
        by_key.setdefault(e.key, []).append(e)
    keep = {key: refs[key] for key in by_key if key in refs}
    for e in found.entries:
        summary = (_manifest(store, e.stage, e.key) or {}).get("summary") or {} if e.stage == "register" else {}
        if e.key not in keep and (str(summary.get("name")), str(summary.get("version"))) in models:
            keep[e.key] = f"registers model {summary['name']} v{summary['version']}"
    todo = list(keep)
    while todo:  # upstream entries: the runs' tags list them already; the manifests say so too
        key = todo.pop()
        for e in by_key[key]:
            for upstream in ((_manifest(store, e.stage, e.key) or {}).get("inputs") or {}).values():
                if upstream in by_key and upstream not in keep:
                    keep[upstream] = f"input of {e.stage}/{key}"
                    todo.append(upstream)
    for e in found.entries:
        if e.key not in keep and e.created >= cutoff:
            keep[e.key] = f"fresh (created {when(e.created)})"
    gone = [e for e in found.entries if e.key not in keep]
    return keep, gone, [left for left in found.leftovers if left.newest < cutoff and not _busy(left.lock)]


def delete(store: Store, gone: list[Entry], old: list[Leftover]) -> int:
    """Remove entries (each manifest first, under its key's lock) and leftovers; returns the entries removed."""
    done, where = 0, store.root
    try:
        for e in gone:
            where = f"{store.root}/{e.stage}/{e.key}"
            done += store.remove(e.stage, e.key)
        if is_url(store.root) and old:
            from diffprune.tasks.object_store import ObjectStore

            remote = ObjectStore(store.root)
        for left in old:
            where = left.where
            if is_url(store.root):
                remote.fs.rm(f"{remote.base}/{left.where}", recursive=True)
                continue
            with _claimed(left.lock) as ours:  # a build may have taken this key since it was listed
                if ours:
                    shutil.rmtree(left.where, ignore_errors=True)
    except Exception as exc:
        raise OutputWriteError(f"cannot delete {where}: {type(exc).__name__}: {first_line(exc)}; {done} of "
                               f"{len(gone)} entries were removed, the rest are intact") from None
    return done


def _manifest(store: Store, stage: str, key: str) -> dict | None:
    """An entry's manifest as stored (not verified: only its record is read); None if gone or unreadable."""
    try:
        if is_url(store.root):
            from diffprune.tasks.object_store import ObjectStore

            remote = ObjectStore(store.root)
            return json.loads(remote.fs.cat_file(f"{remote.base}/{stage}/{key}/{MANIFEST}"))
        return json.loads((Path(store.root) / stage / key / MANIFEST).read_bytes())
    except (FileNotFoundError, ValueError):
        return None
    except Exception as exc:  # denied, unreachable: what it references is unknown, so nothing may go
        raise StoreUnreachable(f"store {store.root}: cannot read {stage}/{key}/{MANIFEST}: {type(exc).__name__}: "
                               f"{first_line(exc)}; nothing was removed") from None


@contextlib.contextmanager
def _claimed(lock: Path | None) -> Iterator[bool]:
    """Hold the key's lock (:meth:`Store.locked`) unless a build on this host holds it: is it ours? A build
    that never started here has no lock file; one that did keeps its scratch folder under that lock."""
    if lock is None or not lock.is_file():
        yield True
        return
    with open(lock) as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _busy(lock: Path | None) -> bool:
    with _claimed(lock) as ours:
        return not ours


def tree_size(path: Path) -> tuple[int, float]:
    """Bytes under ``path`` and its newest modification time."""
    if not path.exists():
        return 0, 0.0
    if not path.is_dir():
        return path.lstat().st_size, path.lstat().st_mtime
    stats = [(Path(d) / f).lstat() for d, _, files in os.walk(path) for f in files]
    return sum(s.st_size for s in stats), max([path.lstat().st_mtime, *(s.st_mtime for s in stats)])


def _time(info: dict) -> float:
    """An object's time: S3's LastModified (the server's clock, so hosts' clocks do not matter), or its mtime."""
    modified = info.get("LastModified")
    return modified.timestamp() if modified else float(info.get("mtime") or 0.0)


def when(t: float) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")
