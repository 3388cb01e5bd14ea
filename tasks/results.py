"""Prefect's result records beside a URL store, so that a task cached on one host is a cache hit on any other.

A task's cache record (the small store reference it returned) is what makes Prefect report a hit. With a
path store the records sit in ``<store>/_prefect_results`` (``PREFECT_RESULTS_LOCAL_STORAGE_PATH``); with a
URL store they go to ``<store>/_prefect_results`` through the same backend. Prefect only accepts result
storage that is saved as a block on its API, so each run saves (idempotently) a block named after the URL.
"""

from __future__ import annotations

import hashlib

from diffprune.tasks.store import is_url


def result_storage(root: str):
    """The saved Prefect storage block for a URL store's result records; None for a path store."""
    if not is_url(root):
        return None
    from prefect.filesystems import LocalFileSystem, RemoteFileSystem

    path = f"{root.rstrip('/')}/_prefect_results"
    if path.startswith("file://"):
        block = LocalFileSystem(basepath=path.removeprefix("file://"))
    else:
        block = RemoteFileSystem(basepath=path)
    block.save(f"diffprune-results-{hashlib.sha256(path.encode()).hexdigest()[:12]}", overwrite=True)
    return block
