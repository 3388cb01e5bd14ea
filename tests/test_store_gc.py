"""``diffprune store ls | gc`` on a path store and on a real S3 server (SeaweedFS), references read from a real
SQLite MLflow tracking store: gc removes exactly the orphans and old leftovers, keeps what a registered version,
the latest runs of each params file, an unfinished run or an upstream link references, and what is fresh."""

import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from diffprune.common.atomic import file_lock
from diffprune.flows.cli import main
from diffprune.flows.store_cmd import params_file_tag
from diffprune.tasks.object_store import _filesystem
from diffprune.tasks.store import Store

PIPELINE = "prefect flow diffprune-pipeline"


@pytest.fixture(autouse=True)
def _environment():
    """The command sets environment defaults (Prefect, MLflow) for the process: keep them out of other tests."""
    saved = dict(os.environ)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def tracking(tmp_path_factory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # creates the schema once for the module
    return uri


@pytest.fixture(params=["path", "s3"])
def store(request, tmp_path) -> Store:
    if request.param == "path":
        return Store(str(tmp_path / "store"))
    server = request.getfixturevalue("s3_server")
    os.environ.update(server.env)  # restored by _environment
    return Store(f"s3://{server.bucket}/{uuid.uuid4().hex[:12]}", str(tmp_path / "cache"))


def _params(tmp_path: Path, store: Store, tracking: str) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"orchestration": {"store": store.root,
                                                      "store_cache": store.cache or str(tmp_path / "cache")},
                                    "tracking": {"uri": tracking}}))
    return str(path)


def _publish(store: Store, stage: str, inputs: dict | None = None, summary: dict | None = None) -> str:
    key = f"{stage}-{uuid.uuid4().hex[:8]}"

    def build(scratch: Path) -> dict:
        (scratch / "output").mkdir()
        (scratch / "output" / "blob.bin").write_bytes(os.urandom(2048))
        return summary or {}

    store.publish(stage, key, build, {"params": {}, "inputs": inputs or {}, "code": "test"})
    return key


def _run(client: MlflowClient, exp: str, start: int, status: str | None, keys: dict, params_file: str = "params.yaml",
         parent: str | None = None) -> str:
    tags = {"mlflow.source.name": PIPELINE, "diffprune.params_file": params_file,
            **{f"diffprune.key.{label}": key for label, key in keys.items()}}
    if parent:
        tags = {"mlflow.source.name": PIPELINE, "mlflow.parentRunId": parent, "diffprune.cache_key": keys["stage"]}
    run_id = client.create_run(exp, start_time=1_700_000_000_000 + start * 1000, tags=tags).info.run_id
    if status:
        client.set_terminated(run_id, status=status)
    return run_id


def _gc(capsys, params: str, *extra: str) -> tuple[int, list[str], str]:
    rc = main(["store", "gc", "--params", params, *extra])
    out, err = capsys.readouterr()
    removed = sorted(line.split()[1] for line in out.splitlines() if line.startswith("remove "))
    return rc, removed, out + err


def _objects(store: Store) -> set[str]:
    fs, base = _filesystem(store.root)
    return {n[len(base) + 1:] for n, i in fs.find(base, detail=True).items() if i["type"] == "file"}


def test_gc_removes_exactly_the_orphans(store, tracking, tmp_path, capsys):
    client, model = MlflowClient(tracking), f"gc-model-{uuid.uuid4().hex[:6]}"
    exp = client.create_experiment(f"gc-{uuid.uuid4().hex}")
    p1 = _publish(store, "prepare")
    t1 = _publish(store, "teacher", {"data": p1})
    s1 = _publish(store, "score", {"teacher": t1})  # tagged by no run: kept as an input of f1
    f1 = _publish(store, "finetune", {"scores": s1})
    r1 = _publish(store, "register", {"model": f1}, {"name": model, "version": "1"})
    f2 = _publish(store, "finetune")
    r2 = _publish(store, "register", {"model": f2}, {"name": model, "version": "2"})  # its run lost its tags
    t2, e1, k1, s9 = (_publish(store, s) for s in ("teacher", "evaluate", "prune", "score"))
    o1, o2, o4, o3 = (_publish(store, s) for s in ("prune", "evaluate", "prune", "finetune"))
    r3 = _publish(store, "register", {"model": o3}, {"name": model, "version": "9"})  # no such version
    kept = {p1, t1, s1, f1, r1, f2, r2, t2, e1, k1, s9}
    orphans = {o1, o2, o3, o4, r3}

    lost = _run(client, exp, 0, "FAILED", {})
    registered = _run(client, exp, 1, "FINISHED", {"prepare": p1, "teacher": t1, "finetune": f1, "register": r1})
    _run(client, exp, 2, "FINISHED", {"prune": o1})  # superseded by the latest run of params.yaml
    _run(client, exp, 3, "FINISHED", {"prepare": p1, "teacher": t2})  # the latest run of params.yaml
    _run(client, exp, 4, "FAILED", {"prune": o4})  # not the latest failed run
    _run(client, exp, 5, "FAILED", {"evaluate": e1})
    running = _run(client, exp, 6, None, {})
    _run(client, exp, 7, "FINISHED", {"stage": k1}, parent=running)
    _run(client, exp, 1, "FINISHED", {"score": s9}, params_file="presets/other.yaml")
    client.create_registered_model(model)
    for run_id in (registered, lost):
        client.create_model_version(model, f"runs:/{run_id}/model", run_id=run_id)

    if store.cache:  # a URL store: a cut-off upload, a loser's parts beside a kept entry, checkpoints, results
        fs, base = _filesystem(store.root)
        leftovers = ["prune/cut-off/.parts-aaaa", f"teacher/{t2}/.parts-bbbb"]
        for where in leftovers:
            fs.pipe_file(f"{base}/{where}/output/blob.bin", b"x" * 100)
        for name in ("_checkpoints/finetune/fp/step-0000001/w.bin", "_prefect_results/record"):
            fs.pipe_file(f"{base}/{name}", b"x" * 1000)
        busy = None
    else:  # a path store: an old build's scratch, a folder without manifest, a build in progress
        root = Path(store.root)
        leftovers = [str(root / "prune" / ".lk.tmp-abc"), str(root / "score" / "damaged")]
        busy = root / "prune" / ".busy.tmp-def"
        for where in (*leftovers, busy):
            (Path(where) / "output").mkdir(parents=True)
            (Path(where) / "output" / "blob.bin").write_bytes(b"x" * 100)
        for name in ("_checkpoints/finetune/fp/step-0000001/w.bin", "_prefect_results/record"):
            (root / name).parent.mkdir(parents=True)
            (root / name).write_bytes(b"x" * 1000)
    old = time.time()
    params = _params(tmp_path, store, tracking)

    assert main(["store", "ls", "--params", params]) == 0
    out = capsys.readouterr().out
    for stage, n in (("prepare", 1), ("teacher", 2), ("score", 2), ("finetune", 3), ("register", 3)):
        assert f"  {stage}: {n} entries, " in out
    assert f"prepare/{p1}" in out and "entries: 16, " in out and "_checkpoints: 1000 B" in out
    assert ("cut-off upload (parts no manifest names): 2" if store.cache else "scratch: 2") in out
    assert "_prefect_results: 1000 B" in out and "\ntotal: " in out

    with file_lock(busy.parent / ".locks" / "busy.lock") if busy else open(os.devnull):
        rc, removed, out = _gc(capsys, params, "--min-age-hours", "0")  # a dry run
        assert rc == 0, out
        assert removed == sorted([*(f"{k.split('-')[0]}/{k}" for k in orphans), *leftovers]), out
        assert "dry run" in out and {e.key for e in store.entries()} == kept | orphans
        assert f"keep    score/{s1}" in out and f"input of finetune/{f1}" in out

        rc, removed, out = _gc(capsys, params)  # the default minimum age: everything is fresh
        assert rc == 0 and removed == [], out

        time.sleep(max(0.0, old + 5 - time.time()))  # make the entries above 5 s old, the next one fresh
        fresh = _publish(store, "prune")
        rc, removed, out = _gc(capsys, params, "--yes", "--min-age-hours", "0.001")  # 3.6 s
        assert rc == 0 and f"keep    prune/{fresh}" in out and "fresh" in out, out
        assert {e.key for e in store.entries()} == kept | {fresh}, out
    assert all(store.lookup(k.split("-")[0], k) is not None for k in kept), "a kept entry was damaged"
    if store.cache:
        assert not any(o.startswith(tuple(leftovers)) for o in _objects(store))
        assert "_checkpoints/finetune/fp/step-0000001/w.bin" in _objects(store)
    else:
        assert not any(Path(w).exists() for w in leftovers) and busy.is_dir()
        assert (Path(store.root) / "_checkpoints/finetune/fp/step-0000001/w.bin").is_file()

    rc, removed, out = _gc(capsys, params, "--yes", "--min-age-hours", "0")
    assert rc == 0 and removed == sorted([f"prune/{fresh}"] + ([] if store.cache else [str(busy)])), out
    assert {e.key for e in store.entries()} == kept


@pytest.mark.parametrize("case", ["missing", "down", "empty"])
def test_an_unreadable_tracking_store_removes_nothing(case, tracking, tmp_path, capsys):
    store = Store(str(tmp_path / "store"))
    key = _publish(store, "prepare")
    if case == "missing":
        uri = f"sqlite:///{tmp_path / 'elsewhere' / 'mlflow.db'}"
    elif case == "empty":
        uri = f"sqlite:///{tmp_path / 'empty.db'}"
        MlflowClient(uri).search_experiments()
    else:
        uri = "http://127.0.0.1:9"  # discard port: nothing listens
    capsys.readouterr()  # MLflow's own log of creating the empty store
    start = time.monotonic()
    rc, removed, out = _gc(capsys, _params(tmp_path, store, uri), "--yes", "--min-age-hours", "0")
    assert rc == 2 and removed == [] and time.monotonic() - start < 30, out
    err = out.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffprune store gc: error: cannot read") and uri in err[0], out
    assert "nothing was removed" in err[0]
    assert [e.key for e in store.entries()] == [key] and not (tmp_path / "elsewhere").exists()


def test_a_params_file_is_named_by_its_place_in_the_project(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path / "proj")], check=True)
    (tmp_path / "proj" / "presets").mkdir()
    assert params_file_tag(str(tmp_path / "proj" / "presets" / "x.yaml")) == {
        "diffprune.params_file": "presets/x.yaml"}
    outside = params_file_tag(str(tmp_path / "x.yaml"))["diffprune.params_file"]
    assert outside.endswith(f":{tmp_path / 'x.yaml'}")
