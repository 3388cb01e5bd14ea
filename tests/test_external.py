"""Inputs from outside the store enter cache keys by content — a hub teacher by the commit it resolves to."""

import pytest

from diffprune.family.hub import UNRESOLVED, resolve_revision
from diffprune.pipeline.external import image_folder, teacher_source

A, B = "a" * 40, "b" * 40


def _cached(root, repo: str, commit: str) -> None:
    """A model as the Hugging Face cache keeps it: refs/main names the commit whose snapshot is on disk."""
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(commit)
    (base / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    (base / "snapshots" / commit / "model_index.json").write_text("{}")


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    resolve_revision.cache_clear()
    yield tmp_path
    resolve_revision.cache_clear()


def test_a_hub_teacher_s_key_carries_the_commit_of_its_snapshot(offline_cache):
    params = {"source": "pretrained", "pretrained": "owner/model", "revision": None}
    _cached(offline_cache, "owner/model", A)
    first = teacher_source(params)
    assert first == {"pretrained": f"hub:owner/model@{A}"}
    _cached(offline_cache, "owner/model", B)  # the model changed on the hub and was downloaded again
    resolve_revision.cache_clear()  # a new run
    assert teacher_source(params) == {"pretrained": f"hub:owner/model@{B}"}
    assert teacher_source({**params, "revision": A}) == first, "a pinned commit keys as itself"
    assert teacher_source({**params, "pretrained": "owner/absent"}) == {
        "pretrained": f"hub:owner/absent@{UNRESOLVED}"}


def test_local_inputs_key_by_content(tmp_path):
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "w.bin").write_bytes(b"1")
    local = teacher_source({"source": "pretrained", "pretrained": str(tmp_path / "teacher")})
    (tmp_path / "teacher" / "w.bin").write_bytes(b"2")
    assert teacher_source({"source": "pretrained", "pretrained": str(tmp_path / "teacher")}) != local
    assert image_folder({"dataset": "digits"}) == {}
