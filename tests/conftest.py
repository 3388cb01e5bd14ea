"""Tiny models and data so that every test runs on a CPU in seconds."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Prefect reads its settings at import: keep the suite's server database and cache records out of ~/.prefect.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="diffprune-tests-prefect-"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

from diffprune.data.datasets import load_prepared, prepare_dataset
from diffprune.family.diffusion import Diffusion
from diffprune.family.models import build_unet, make_scheduler, save_model
from tiny import TINY_ARCH, TINY_DATA


def pytest_collection_modifyitems(config, items) -> None:
    """Files with integration tests first, then files with slow ones, then the rest (a stable sort: files keep
    their order within each rank). `make test` runs files on two workers in this order (`--dist loadfile
    --no-loadscope-reorder`): the minutes-long multi-server files start early instead of last, when one worker
    would run them while the other waits."""
    rank: dict = {}
    for item in items:
        r = 0 if item.get_closest_marker("integration") else 1 if item.get_closest_marker("slow") else 2
        rank[item.path] = min(rank.get(item.path, 2), r)
    items.sort(key=lambda item: rank[item.path])


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare_dataset(TINY_DATA, out)
    return out


@pytest.fixture(scope="session")
def digits(digits_dir):
    return load_prepared(digits_dir)


@pytest.fixture
def tiny_unet():
    torch.manual_seed(0)
    return build_unet(TINY_ARCH, 8, 1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("models") / "tiny"
    save_model(build_unet(TINY_ARCH, 8, 1), make_scheduler(), out)
    return out


@pytest.fixture(scope="session")
def trained_tiny(digits, tmp_path_factory):
    """A tiny UNet trained briefly on a 100-step schedule: its loss falls with t, as a real teacher's."""
    from diffprune.training.loop import train
    from tiny import tiny_train

    torch.manual_seed(0)
    unet = build_unet(TINY_ARCH, 8, 1)
    params = tiny_train(steps=150, batch_size=16, checkpoint_every=150, ema_decay=0.0)
    result = train(Diffusion(unet, make_scheduler(100)), digits.train, params, tmp_path_factory.mktemp("ck"))
    return result.model


@pytest.fixture(scope="session")
def prefect_api():
    """One Prefect test server for the session, exported so that child processes (the CLI, Dask workers,
    a served deployment) use it too instead of starting temporary servers of their own."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=600):
        os.environ["PREFECT_API_URL"] = PREFECT_API_URL.value()
        try:
            yield PREFECT_API_URL.value()
        finally:
            os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One real S3-compatible server (SeaweedFS, on loopback) for the session; clients get its endpoint and
    credentials from ``s3_server.env`` (the standard AWS variables)."""
    from servers import seaweed

    with seaweed(tmp_path_factory.mktemp("s3-server")) as server:
        yield server
