"""The store at a URL, against a real S3 server (SeaweedFS on loopback) and a file:// "mount": publish once
across hosts, read through a verified local cache, never a hit from a cut-off or damaged upload."""

import json
import logging
import multiprocessing
import os
import socket
import time
import uuid

import pytest

from diffprune.common.digests import dir_digest, sha256_file
from diffprune.pipeline.config import load_params
from diffprune.tasks import store
from diffprune.tasks.object_store import _filesystem
from diffprune.tasks.store import MANIFEST, Store, StoreUnreachable

REF = store.reference("prune", "k1")


def _build(text: str, calls: list | None = None, wall_times: bool = False):
    def build(scratch):
        (calls if calls is not None else []).append(text)
        (scratch / "output" / "sub").mkdir(parents=True)
        (scratch / "output" / "weights.bin").write_text(text)
        (scratch / "output" / "sub" / "config.json").write_text("{}")
        (scratch / "metrics").mkdir()
        metrics = {"pid": os.getpid(), "time": time.time()} if wall_times else {"seconds": 1}
        (scratch / "metrics" / "x.json").write_text(json.dumps(metrics))
        return {"n": len(text)}
    return build


def _tree(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _downloads(caplog) -> int:
    return sum(r.getMessage().startswith("downloading") for r in caplog.records)


@pytest.fixture
def s3(s3_server, monkeypatch) -> str:
    """A fresh prefix in the session's S3 server, its endpoint and credentials in the AWS variables."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return f"s3://{s3_server.bucket}/{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["s3", "file"])
def root(request, tmp_path) -> str:
    """A URL store: on the S3 server, or on a shared mount (``file://``)."""
    if request.param == "s3":
        return request.getfixturevalue("s3")
    (tmp_path / "mount").mkdir()
    return (tmp_path / "mount").as_uri()


def _objects(root: str) -> list[str]:
    """Every object of the store, relative to its root."""
    fs, base = _filesystem(root)  # s3fs lists an emptied prefix that SeaweedFS keeps as a folder: not an object
    return sorted(name[len(base) + 1:] for name, info in fs.find(base, detail=True).items() if info["type"] == "file")


def _spawn(target, *argsets):
    """Run ``target(*args, out)`` in fresh processes (spawned: real separate hosts' worth of state); their results."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, out)) for args in argsets]
    try:
        for p in procs:
            p.start()
        results = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(30)
        return results
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()


def test_publish_then_lookup_round_trip(root, tmp_path, caplog):
    host, calls = Store(root, str(tmp_path / "cache")), []
    manifest, built = host.publish("prune", "k1", _build("abc", calls), {"params": {"lr": 1}})
    assert built and manifest["summary"] == {"n": 3} and host.lookup("prune", "k1") == manifest
    assert set(manifest["files"]) == {"output/weights.bin", "output/sub/config.json", "metrics/x.json"}
    assert manifest["parts"].startswith(".parts-") and set(manifest["stamps"]) == set(manifest["files"])
    again, built = host.publish("prune", "k1", _build("abc", calls), {"params": {"lr": 1}})
    assert not built and again == manifest and calls == ["abc"]
    assert store.manifest_of(host, REF) == manifest and store.manifest_of(root, REF) == manifest  # a URL is enough
    with caplog.at_level(logging.INFO, logger="diffprune.tasks.store"):
        local = store.folder(host, REF)
    assert local == tmp_path / "cache" / "prune" / "k1" and (local / "output" / "weights.bin").read_text() == "abc"
    assert _downloads(caplog) == 0  # the publisher's build became its copy
    assert dir_digest(local, exclude=(MANIFEST,)) == manifest["digest"]
    assert dir_digest(local / "output") == manifest["output_digest"]
    [listed] = host.entries()
    assert (listed.stage, listed.key) == ("prune", "k1")
    assert listed.size >= sum(size for size, _ in manifest["files"].values())
    assert abs(listed.created - time.time()) < 600


def test_another_host_fetches_each_entry_once_byte_identical(root, tmp_path, caplog):
    first, second = Store(root, str(tmp_path / "host1")), Store(root, str(tmp_path / "host2"))
    first.publish("prune", "k1", _build("abc" * 100_000), {})
    with caplog.at_level(logging.INFO, logger="diffprune.tasks.store"):
        there = second.folder(REF)
        assert second.folder(REF) == there
    assert _downloads(caplog) == 1
    assert _tree(there) == _tree(first.folder(REF))  # byte-identical, manifest included


def _fetch(root, cache, barrier, out):
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("diffprune.tasks.store")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    barrier.wait(60)
    folder = Store(root, cache).folder(REF)
    weights = (folder / "output" / "weights.bin").stat()
    out.put((str(folder), weights.st_ino, weights.st_mtime_ns, sum(m.startswith("downloading") for m in seen)))


def test_processes_of_one_host_download_once(s3, tmp_path):
    Store(s3, str(tmp_path / "host1")).publish("prune", "k1", _build("abc" * 100_000), {})
    barrier = multiprocessing.get_context("spawn").Barrier(3)
    results = _spawn(_fetch, *[(s3, str(tmp_path / "host2"), barrier)] * 3)
    assert len({r[:3] for r in results}) == 1  # one folder, never replaced
    assert sum(r[3] for r in results) == 1


def _publish(root, cache, barrier, out):
    def build(scratch):
        _build("abc", wall_times=True)(scratch)  # the two writers' metrics differ
        barrier.wait(60)  # both have built: they upload and create the manifest at the same time
        return {"n": 3}

    out.put(Store(root, cache).publish("prune", "k1", build, {}))


def test_two_hosts_publishing_one_key_at_once_make_one_entry(root, tmp_path):
    barrier = multiprocessing.get_context("spawn").Barrier(2)
    (m1, built1), (m2, built2) = _spawn(_publish, (root, str(tmp_path / "host1"), barrier),
                                        (root, str(tmp_path / "host2"), barrier))
    assert sorted([built1, built2]) == [False, True]
    assert m1 == m2 == Store(root).lookup("prune", "k1")
    assert {name.split("/")[2] for name in _objects(root)} == {MANIFEST, m1["parts"]}  # the loser's parts are gone
    assert len(Store(root).entries()) == 1
    for host in ("host1", "host2"):  # each host reads the winner's content
        assert dir_digest(Store(root, str(tmp_path / host)).folder(REF), exclude=(MANIFEST,)) == m1["digest"]


def _cut_off(root, cache, out):
    """Publish, but the host dies after the first file is uploaded."""
    import s3fs
    from fsspec.implementations.local import LocalFileSystem

    original, original_local = s3fs.S3FileSystem._put_file, LocalFileSystem.put_file

    async def dies(self, *args, **kwargs):
        await original(self, *args, **kwargs)
        os._exit(17)

    def dies_local(self, *args, **kwargs):
        original_local(self, *args, **kwargs)
        os._exit(17)

    s3fs.S3FileSystem._put_file, LocalFileSystem.put_file = dies, dies_local
    Store(root, cache).publish("prune", "k1", _build("abc"), {})
    out.put("survived")


def test_an_upload_cut_off_before_its_manifest_is_never_a_hit(root, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()  # held here: the child unpickles it after start() returns
    proc = ctx.Process(target=_cut_off, args=(root, str(tmp_path / "host1"), out))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 17
    left = _objects(root)
    assert left and MANIFEST not in {name.split("/")[-1] for name in left}  # parts, no manifest
    host = Store(root, str(tmp_path / "host2"))
    assert host.lookup("prune", "k1") is None and host.entries() == []
    with pytest.raises(FileNotFoundError):
        host.folder(REF)
    manifest, built = host.publish("prune", "k1", _build("abc"), {})
    assert built and host.lookup("prune", "k1") == manifest
    assert host.remove("prune", "k1") and _objects(root) == [] and host.lookup("prune", "k1") is None


@pytest.mark.parametrize("damage", ["rewrite", "truncate", "delete", "manifest"])
def test_a_damaged_remote_entry_is_a_miss_and_the_next_publish_replaces_it(root, tmp_path, damage):
    host, calls = Store(root, str(tmp_path / "cache")), []
    manifest, _ = host.publish("prune", "k1", _build("abc", calls), {})
    fs, base = _filesystem(root)
    entry = f"{base}/prune/k1"
    part = f"{entry}/{manifest['parts']}/output/weights.bin"
    {"rewrite": lambda: fs.pipe_file(part, b"xyz"), "truncate": lambda: fs.pipe_file(part, b"ab"),
     "delete": lambda: fs.rm_file(part), "manifest": lambda: fs.pipe_file(f"{entry}/{MANIFEST}", b"{")}[damage]()
    assert host.lookup("prune", "k1") is None
    with pytest.raises(FileNotFoundError):
        host.manifest_of(REF)
    again, built = host.publish("prune", "k1", _build("abc", calls), {})
    assert built and calls == ["abc", "abc"] and host.lookup("prune", "k1") == again
    assert again["parts"] != manifest["parts"]
    if damage != "manifest":  # the damaged entry's parts went with its manifest
        assert not [name for name in _objects(root) if manifest["parts"] in name]
    assert (host.folder(REF) / "output" / "weights.bin").read_text() == "abc"


@pytest.mark.parametrize("damage", ["rewrite", "stray", "delete"])
def test_a_damaged_local_copy_is_fetched_again(root, tmp_path, caplog, damage):
    host = Store(root, str(tmp_path / "cache"))
    host.publish("prune", "k1", _build("abc"), {})
    weights = host.folder(REF) / "output" / "weights.bin"
    {"rewrite": lambda: weights.write_text("xyz"), "stray": lambda: weights.with_name("stray").write_text("x"),
     "delete": weights.unlink}[damage]()
    with caplog.at_level(logging.INFO, logger="diffprune.tasks.store"):
        folder = host.folder(REF)
    assert _downloads(caplog) == 1 and weights.read_text() == "abc" and not (folder / "output" / "stray").exists()
    assert dir_digest(folder, exclude=(MANIFEST,)) == host.lookup("prune", "k1")["digest"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fault", ["dead endpoint", "missing bucket", "wrong secret"])
def test_an_unusable_store_fails_the_check_in_one_line_within_seconds(s3, monkeypatch, fault):
    store.check(s3)  # the good one answers
    url = s3
    if fault == "dead endpoint":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    elif fault == "missing bucket":
        url = "s3://no-such-bucket/prefix"
    else:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    start = time.monotonic()
    with pytest.raises(StoreUnreachable) as err:
        from diffprune.flows import preflight  # the run's preflight calls the same check

        preflight.store(load_params(None, [f"orchestration.store={url}"]))
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"store {url} (endpoint http://127.0.0.1:"), message
    assert {"dead endpoint": "AWS_ENDPOINT_URL", "missing bucket": "create the bucket",
            "wrong secret": "AWS_SECRET_ACCESS_KEY"}[fault] in message
    assert err.value.exit_code == 2


def test_the_check_of_other_stores(tmp_path):
    store.check(tmp_path / "store")  # a path store: created when first written
    store.check(tmp_path.as_uri())
    with pytest.raises(StoreUnreachable, match="is not a folder"):
        store.check((tmp_path / "unmounted").as_uri())
    with pytest.raises(StoreUnreachable, match="only s3://"):
        store.check("gs://bucket/prefix")


def test_the_path_store_keeps_its_layout_and_manifest_plus_a_files_map(tmp_path):
    def build(scratch):  # names whose order differs between plain strings and path parts ("a-b" < "a/")
        for rel in ("output/a/x.bin", "output/a-b/x.bin", "output/a.bin", "metrics/m.json"):
            (scratch / rel).parent.mkdir(parents=True, exist_ok=True)
            (scratch / rel).write_text(rel)
        return {}

    manifest, built = store.publish(tmp_path, "prune", "k1", build, {"params": {"lr": 1}})
    folder = tmp_path / "prune" / "k1"
    assert built and store.folder(tmp_path, REF) == folder and store.entry(tmp_path, "prune", "k1") == folder
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "prune/.locks/k1.lock", "prune/k1/manifest.json", "prune/k1/metrics/m.json", "prune/k1/output/a-b/x.bin",
        "prune/k1/output/a.bin", "prune/k1/output/a/x.bin"]
    on_disk = json.loads((folder / MANIFEST).read_text())
    assert on_disk == manifest and set(on_disk) == {"params", "stage", "key", "summary", "seconds", "created",
                                                    "digest", "output_digest", "files"}
    assert on_disk["digest"] == dir_digest(folder, exclude=(MANIFEST,))
    assert on_disk["output_digest"] == dir_digest(folder / "output")
    assert on_disk["files"] == {p.relative_to(folder).as_posix(): [p.stat().st_size, sha256_file(p)]
                                for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert [(e.stage, e.key) for e in store.entries(tmp_path)] == [("prune", "k1")]
    assert store.remove(tmp_path, "prune", "k1") and not folder.exists() and store.entries(tmp_path) == []
