"""MLflow artifacts a team shares, against real servers on loopback (no mocks): a tracking server that proxies
artifacts to an S3-compatible store (``mlflow server --artifacts-destination s3://…``, SeaweedFS underneath).
Where a new experiment keeps its artifacts, and a model registered on one "host" that loads by
``models:/<name>@champion`` on another, with neither the model's folder nor S3 credentials there."""

import json
import os
import subprocess
import sys
import textwrap
import uuid

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking._tracking_service import utils as tracking_utils
from test_registry import GOOD

from diffprune.common.digests import dir_digest
from diffprune.family.diffusion import Diffusion
from diffprune.family.models import build_unet, make_scheduler, save_diffusion
from diffprune.pipeline.config import TrackingParams
from diffprune.pipeline.stage_params import RegisterParams
from diffprune.tracking.register import load_champion, register, registered_now
from diffprune.tracking.runs import artifact_location, start_tracking
from tiny import TINY_ARCH

NAME = "diffprune-shared"
ASK = {"num_images": [3], "seed": [0], "steps": [2]}


@pytest.fixture(scope="module")
def server(s3_server, tmp_path_factory):
    """One tracking server for the module, its artifacts under a fresh prefix of the session's S3 server."""
    from servers import group_alive, mlflow_server

    with mlflow_server(tmp_path_factory.mktemp("mlflow-server"), s3_server, prefix=f"mlflow-{uuid.uuid4().hex[:8]}") \
            as running:
        yield running
    assert not group_alive(running.pgid), "the MLflow server left processes behind"


@pytest.fixture
def client_env(monkeypatch, tmp_path):
    """A client host: its own empty working directory, no S3 endpoint or credentials (the server proxies every
    artifact), MLflow's process-wide tracking URI put back afterwards."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    previous = tracking_utils._tracking_uri
    try:
        yield tmp_path
    finally:
        mlflow.set_tracking_uri(previous)  # also MLFLOW_TRACKING_URI, which set_tracking_uri exports to children


def _s3(s3_server):
    import s3fs

    return s3fs.S3FileSystem(key=s3_server.key, secret=s3_server.secret, skip_instance_cache=True,
                             client_kwargs={"endpoint_url": s3_server.endpoint, "region_name": "us-east-1"})


def _objects(s3_server, url: str) -> list[str]:
    """Every object under ``url`` (s3://bucket/prefix), relative to it."""
    base = url.removeprefix("s3://").rstrip("/")
    found = _s3(s3_server).find(base, detail=True)
    return sorted(name[len(base) + 1:] for name, info in found.items() if info["type"] == "file")


@pytest.mark.parametrize(("root", "uri", "expected"), [
    ("mlartifacts", "http://127.0.0.1:5000", None),  # a path under a server: the server's own default
    ("/abs/mlartifacts", "https://mlflow.example", None),
    ("s3://bucket/x", "http://127.0.0.1:5000", "s3://bucket/x"),  # URLs are kept as given, whatever the server
    ("s3://bucket/x", "sqlite:///mlflow.db", "s3://bucket/x"),
    ("file:///shared/mlartifacts", "sqlite:///mlflow.db", "file:///shared/mlartifacts"),
    ("mlflow-artifacts:/team", "http://127.0.0.1:5000", "mlflow-artifacts:/team"),
])
def test_artifact_location_keeps_urls_and_leaves_paths_to_a_server(root, uri, expected):
    assert artifact_location(root, uri) == expected


def test_artifact_location_of_a_path_with_a_local_store_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert artifact_location("mlartifacts", "sqlite:///mlflow.db") == (tmp_path / "mlartifacts").as_uri()


def test_a_path_root_under_a_server_takes_its_proxied_default(server, client_env, s3_server):
    params = TrackingParams(uri=server.url, experiment="shared-default")
    assert params.artifact_root == "mlartifacts"  # the shipped default: a plain path
    tracker = start_tracking(params, "proxied", {})
    experiment = tracker.client.get_experiment(tracker.experiment_id)
    assert experiment.artifact_location.startswith("mlflow-artifacts:/")
    tracker.log_text("hello from host 1", "note.txt")
    tracker.finish(True)
    assert not (client_env / "mlartifacts").exists()  # nothing on this host
    [note] = [o for o in _objects(s3_server, server.artifacts) if o.endswith("note.txt")]
    assert note == f"{tracker.experiment_id}/{tracker.run_id}/artifacts/note.txt"
    assert _s3(s3_server).cat(f"{server.artifacts}/{note}".removeprefix("s3://")) == b"hello from host 1"


def test_an_s3_root_is_kept_as_given_and_written_there(server, client_env, s3_server, monkeypatch):
    root = f"s3://{s3_server.bucket}/direct-{uuid.uuid4().hex[:8]}"
    tracker = start_tracking(TrackingParams(uri=server.url, experiment="shared-s3", artifact_root=root), "direct", {})
    assert tracker.client.get_experiment(tracker.experiment_id).artifact_location == root
    # A URL root outside the server's destination is written by the client itself: it needs the store's env.
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_server.endpoint)
    tracker.log_text("written directly", "note.txt")
    tracker.finish(True)
    assert _objects(s3_server, root) == [f"{tracker.run_id}/artifacts/note.txt"]


_LOAD_ELSEWHERE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import mlflow, pandas as pd
    from diffprune.common.digests import dir_digest

    uri, ask = sys.argv[1], json.loads(sys.argv[2])
    model = mlflow.pyfunc.load_model(uri)
    images = model.predict(pd.DataFrame(ask))
    copy = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path="download"))
    [index] = copy.rglob("model_index.json")
    print(json.dumps({"images": images.tolist(), "dtype": str(images.dtype), "digest": dir_digest(index.parent)}))
""")


def test_a_model_registered_through_the_server_loads_on_another_host(server, client_env, s3_server, tmp_path_factory):
    torch.manual_seed(0)
    model_dir = save_diffusion(Diffusion(build_unet(TINY_ARCH, 8, 1), make_scheduler(100)),
                               tmp_path_factory.mktemp("host1") / "finetuned")
    digest = dir_digest(model_dir)
    tracker = start_tracking(TrackingParams(uri=server.url, experiment="shared-models"), "host1", {})
    params = RegisterParams(model_name=NAME, predict_steps=2)
    outcome = register(tracker, registered_now(model_dir, GOOD, params, grid=None))
    tracker.finish(True)
    assert outcome["aliases"] == ["candidate", "champion"]
    here = load_champion(NAME).predict(pd.DataFrame(ASK))

    # The model's files went to the bucket through the server (the client has no S3 credentials).
    stored = _objects(s3_server, server.artifacts)
    model_id = outcome["model_id"]
    weights = [o for o in stored if model_id in o and o.endswith("unet/diffusion_pytorch_model.safetensors")]
    assert len(weights) == 1 and any(o.endswith(f"{model_id}/artifacts/MLmodel") for o in stored)

    # Another host: a fresh process in an empty folder, the source folder gone, only the server's URL.
    renamed = model_dir.rename(model_dir.with_name("gone"))
    other = tmp_path_factory.mktemp("host2")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "MLFLOW_S3_", "MLFLOW_EXPERIMENT")) and k != "PYTHONPATH"}
    env.update(MLFLOW_TRACKING_URI=server.url, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _LOAD_ELSEWHERE, f"models:/{NAME}@champion", json.dumps(ASK)],
                          cwd=other, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    there = json.loads(done.stdout.strip().splitlines()[-1])
    assert there["digest"] == digest  # the very files registered on host 1, byte for byte
    images = np.asarray(there["images"], dtype=there["dtype"])
    assert images.dtype == np.uint8 and images.shape == (3, 8, 8, 1) and images.std() > 0
    np.testing.assert_array_equal(images, here)  # the same samples on both hosts
    assert not model_dir.exists() and renamed.exists()
