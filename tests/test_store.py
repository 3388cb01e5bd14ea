"""The content-addressed stage store: publish whole or not at all, detect damage, one builder per key."""

import threading

import pytest

from diffprune.tasks import store


def _build(text: str, calls: list):
    def build(scratch):
        calls.append(text)
        (scratch / "output").mkdir()
        (scratch / "output" / "weights.bin").write_text(text)
        (scratch / "metrics").mkdir()
        (scratch / "metrics" / "x.json").write_text('{"seconds": 1}')
        return {"n": len(text)}
    return build


def test_publish_then_lookup_finds_it_and_a_second_publish_reuses_it(tmp_path):
    calls = []
    manifest, built = store.publish(tmp_path, "prune", "k1", _build("abc", calls), {"params": {}})
    assert built and manifest["summary"] == {"n": 3} and store.lookup(tmp_path, "prune", "k1") == manifest
    again, built = store.publish(tmp_path, "prune", "k1", _build("abc", calls), {"params": {}})
    assert not built and again == manifest and calls == ["abc"]
    ref = store.reference("prune", "k1")
    assert store.manifest_of(tmp_path, ref) == manifest and ref == {"stage": "prune", "key": "k1"}


@pytest.mark.parametrize("damage", ["truncate", "delete", "add", "manifest"])
def test_damaged_entries_are_absent_and_get_rebuilt(tmp_path, damage):
    calls = []
    store.publish(tmp_path, "prune", "k1", _build("abc", calls), {})
    folder = store.entry(tmp_path, "prune", "k1")
    weights = folder / "output" / "weights.bin"
    {"truncate": lambda: weights.write_text("ab"), "delete": weights.unlink,
     "add": lambda: (folder / "output" / "stray.txt").write_text("x"),
     "manifest": lambda: (folder / store.MANIFEST).write_text("{")}[damage]()
    assert store.lookup(tmp_path, "prune", "k1") is None
    with pytest.raises(FileNotFoundError):
        store.manifest_of(tmp_path, store.reference("prune", "k1"))
    _, built = store.publish(tmp_path, "prune", "k1", _build("abc", calls), {})
    assert built and weights.read_text() == "abc" and store.lookup(tmp_path, "prune", "k1") is not None


def test_a_failed_build_leaves_nothing_behind_and_keeps_the_old_entry(tmp_path):
    store.publish(tmp_path, "prune", "k1", _build("abc", []), {})

    def broken(scratch):
        (scratch / "output").mkdir()
        raise RuntimeError("killed")

    store.entry(tmp_path, "prune", "k1").joinpath("output", "weights.bin").write_text("damaged")
    with pytest.raises(RuntimeError):
        store.publish(tmp_path, "prune", "k1", broken, {})
    assert store.lookup(tmp_path, "prune", "k1") is None  # still the damaged one, not a half-built one
    assert not [p for p in (tmp_path / "prune").iterdir() if ".tmp-" in p.name]
    with pytest.raises(RuntimeError):
        store.publish(tmp_path, "prune", "k2", broken, {})
    assert not store.entry(tmp_path, "prune", "k2").exists()


def test_concurrent_publishers_of_one_key_build_once(tmp_path):
    calls, results = [], []
    threads = [threading.Thread(target=lambda: results.append(
        store.publish(tmp_path, "prune", "k1", _build("abc", calls), {}))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["abc"] and sorted(built for _, built in results) == [False, False, False, True]
    assert len({m["digest"] for m, _ in results}) == 1
