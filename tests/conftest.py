"""Tiny models and data so that every test runs on a CPU in seconds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffprune.data import load_prepared, prepare_dataset
from diffprune.models import build_unet, make_scheduler, save_model
from tiny import TINY_ARCH, TINY_DATA


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
    from diffprune.training import train
    from tiny import tiny_train

    torch.manual_seed(0)
    unet = build_unet(TINY_ARCH, 8, 1)
    result = train(unet, make_scheduler(100), digits.train, tiny_train(steps=150, batch_size=16, checkpoint_every=150,
                                                                      ema_decay=0.0), tmp_path_factory.mktemp("ck"))
    return result.model
