"""Training checkpoints shared through a URL store, so that a fine-tune cut off on one host resumes on another.

Training writes ``<run fingerprint>/step-NNNNNNN/`` folders locally (renamed into place whole; see
:mod:`diffprune.training.checkpoint`). Beside a URL store they are mirrored to ``<store>/_checkpoints/<stage>/``:
before the stage starts, the newest complete checkpoint of every run fingerprint is fetched into the local
folder; while it runs, a watcher uploads each new checkpoint, then its ``complete.json`` (file sizes and
sha256) last. A checkpoint without that marker (an upload cut off with its host) is never fetched, and a
fetched file must match its recorded sha256. Uploaded checkpoints that training has since dropped locally
(``keep``) are deleted remotely once a newer one is complete. Training itself only ever sees local files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

from diffprune.common.atomic import atomic_dir
from diffprune.common.digests import sha256_file
from diffprune.tasks.object_store import _filesystem

MARKER = "complete.json"
POLL_S = 0.5  # a local folder listing: cheap; uploads themselves run as long as they take


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect task's logger (shown with the run) inside a task; this module's elsewhere."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


class Mirror:
    """One training stage's checkpoint folder and its copy under a URL store."""

    def __init__(self, root: str, stage: str, local: Path):
        self.fs, base = _filesystem(root)
        self.remote, self.local = f"{base}/_checkpoints/{stage}", Path(local)
        self.uploaded: set[str] = set()  # "<fingerprint>/step-…" known complete remotely

    def _complete(self) -> dict[str, dict]:
        """Remote checkpoints with their marker: ``"<fingerprint>/step-…"`` → marker content."""
        try:
            markers = self.fs.glob(f"{self.remote}/*/step-*/{MARKER}")
        except FileNotFoundError:
            return {}
        out = {}
        for path in markers:
            rel = path[len(self.remote) + 1:-len(MARKER) - 1]
            with contextlib.suppress(FileNotFoundError, ValueError):
                out[rel] = json.loads(self.fs.cat_file(path))
        return out

    def pull(self) -> list[Path]:
        """Fetch the newest complete remote checkpoint of each fingerprint that is newer than the local ones."""
        complete = self._complete()
        self.uploaded |= set(complete)
        newest: dict[str, str] = {}
        for rel in complete:
            run, step = rel.split("/")
            newest[run] = max(newest.get(run, ""), step)
        fetched = []
        for run, step in sorted(newest.items()):
            local_steps = sorted(p.name for p in (self.local / run).glob("step-*") if p.is_dir())
            if local_steps and local_steps[-1] >= step:
                continue
            target = self.local / run / step
            with atomic_dir(target) as tmp:
                for name, (size, digest) in complete[f"{run}/{step}"]["files"].items():
                    self.fs.get_file(f"{self.remote}/{run}/{step}/{name}", str(tmp / name))
                    if (tmp / name).stat().st_size != size or sha256_file(tmp / name) != digest:
                        raise OSError(f"{self.remote}/{run}/{step}/{name}: damaged in the store")
            _logger().info("resuming from the shared checkpoint %s/%s/%s", self.remote, run, step)
            fetched.append(target)
        return fetched

    def push(self) -> None:
        """Upload local checkpoints not yet complete remotely (marker last); drop remote ones training dropped."""
        local = {f"{p.parent.name}/{p.name}": p for p in sorted(self.local.glob("*/step-*")) if p.is_dir()}
        for rel, folder in local.items():
            if rel in self.uploaded:
                continue
            files = {f.name: [f.stat().st_size, sha256_file(f)] for f in sorted(folder.iterdir()) if f.is_file()}
            for name in files:
                self.fs.put_file(str(folder / name), f"{self.remote}/{rel}/{name}")
            self.fs.pipe_file(f"{self.remote}/{rel}/{MARKER}", json.dumps({"files": files}).encode())
            self.uploaded.add(rel)
        for rel in sorted(self.uploaded - set(local)):
            run = rel.split("/")[0]
            # only once a newer checkpoint of the same run is complete remotely
            if any(r.startswith(f"{run}/") and r > rel and r in self.uploaded for r in local):
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(f"{self.remote}/{rel}/{MARKER}")  # incomplete first, then the files
                    self.fs.rm(f"{self.remote}/{rel}", recursive=True)
                self.uploaded.discard(rel)


@contextlib.contextmanager
def shared(root: str, stage: str, local: Path) -> Iterator[None]:
    """Mirror ``local`` (a training stage's checkpoint folder) to the URL store at ``root`` while the stage runs."""
    mirror = Mirror(root, stage, local)
    mirror.pull()
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(POLL_S):
            try:
                mirror.push()
            except Exception as exc:  # a failed upload costs resumability, never the training run
                _logger().warning("checkpoint upload to %s failed: %s", mirror.remote, exc)

    watcher = threading.Thread(target=watch, name=f"checkpoints-{stage}", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        with contextlib.suppress(Exception):
            mirror.push()
