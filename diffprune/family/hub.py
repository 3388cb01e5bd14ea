"""Which commit a Hugging Face hub reference names: what a hub teacher's cache key carries, and what the
teacher stage loads, so that a model that changes on the hub is a new teacher, never an old cache hit.
No torch here: cache checks call it."""

from __future__ import annotations

from functools import cache
from pathlib import Path

UNRESOLVED = "unresolved"  # neither the hub nor the local cache knows the reference (the stage then says why)


@cache
def resolve_revision(repo_id: str, revision: str | None = None) -> str:
    """The commit ``revision`` (default: ``main``) of ``repo_id`` points at: asked of the hub unless
    ``HF_HUB_OFFLINE`` is set, else read from the local cache (``refs/<branch>`` → ``snapshots/<commit>``).
    Memoised per process: one run keys and loads one commit."""
    from huggingface_hub import HfApi, constants, snapshot_download

    if not constants.HF_HUB_OFFLINE:
        try:
            return str(HfApi().model_info(repo_id, revision=revision, timeout=10).sha)
        except Exception:  # offline, unknown repo, auth: the local cache may still know it
            pass
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True)).name
    except Exception:  # not in the cache either
        return UNRESOLVED
