"""Registry round trip on a throwaway sqlite store: register, gate, aliases, pickle-free load, predict."""

import pickle

import cloudpickle
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import fluent
from mlflow.tracking._tracking_service import utils as tracking_utils

from diffprune.pipeline.stage_params import FastPathParams, RegisterParams
from diffprune.tracking.register import load_champion, register_version

NAME = "diffprune-test"
PARAMS = RegisterParams(model_name=NAME, predict_steps=2)
GOOD = {"criterion": "diff-pruning", "thr": 0.05, "fid": 1.1, "teacher_fid": 1.0, "fid_ratio": 1.1,
        "macs_ratio": 0.5, "teacher": "builtin",
        "fast_path_params": {"precision": "fp32", "channels_last": True, "compile": False}}
WORSE = {"criterion": "magnitude", "fid_ratio": 1.2, "macs_ratio": 0.5}  # within max_fid_ratio, beyond the margin


@pytest.fixture(scope="module")
def registered(tiny_model_dir, tmp_path_factory):
    """Both versions registered once for the module: the store's first use costs seconds."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    previous = tracking_utils._tracking_uri
    # set_tracking_uri / set_experiment write module globals and env vars; all of them are put back.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setattr(fluent, "_active_experiment_id", None)
        mlflow.set_tracking_uri(uri)
        try:
            experiment = mlflow.create_experiment("registry-test", artifact_location=(root / "artifacts").as_uri())
            mp.setenv("MLFLOW_EXPERIMENT_ID", experiment)
            mlflow.set_experiment(experiment_id=experiment)
            first = register_version(tiny_model_dir, GOOD, PARAMS)
            with mlflow.start_run() as run:
                pass
            second = register_version(tiny_model_dir, WORSE, PARAMS, run_id=run.info.run_id)
            yield first, second, run.info.run_id
        finally:
            mlflow.set_tracking_uri(previous)


def test_good_candidate_becomes_champion(registered):
    first, _, _ = registered
    assert first["version"] == "1"
    assert first["model_uri"] == f"models:/{NAME}/1"
    assert first["aliases"] == ["candidate", "champion"]
    assert first["gate"]["passed"] and first["champion_version"] == "1"
    tags = mlflow.MlflowClient().get_model_version(NAME, "1").tags
    assert tags["fid_ratio"] == "1.1" and tags["criterion"] == "diff-pruning" and tags["gate"] == "passed"


def test_worse_candidate_stays_candidate(registered):
    _, second, run_id = registered
    assert second["version"] == "2"
    assert second["aliases"] == ["candidate"]
    assert not second["gate"]["passed"] and second["champion_version"] == "1"
    assert "champion's 1.1" in second["gate"]["reasons"][-1]
    client = mlflow.MlflowClient()
    aliases = client.get_registered_model(NAME).aliases  # MLflow 3.17's sqlite store gives int versions here
    assert {alias: str(v) for alias, v in aliases.items()} == {"candidate": "2", "champion": "1"}
    version = client.get_model_version(NAME, "2")
    assert version.run_id == run_id
    assert version.tags["gate"] == "refused" and "champion" in version.tags["gate_reasons"]


def test_champion_loads_without_pickle_and_samples_reproducibly(registered, monkeypatch):
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)  # recorded too, in case some caller swallows the error
        raise AssertionError("something was unpickled")

    for module, attr in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (cloudpickle, "load"),
                         (cloudpickle, "loads"), (torch, "load")]:
        monkeypatch.setattr(module, attr, refuse)
    model = load_champion(NAME)
    ask = pd.DataFrame({"num_images": [3], "seed": [0], "steps": [2]})
    images = model.predict(ask)
    assert images.dtype == np.uint8 and images.shape == (3, 8, 8, 1)
    np.testing.assert_array_equal(model.predict(ask), images)
    assert not np.array_equal(model.predict(ask.assign(seed=1)), images)
    # Two rows are concatenated; default steps come from the model config (predict_steps=2).
    both = model.predict(pd.DataFrame({"num_images": [3, 1], "seed": [0, 5]}))
    np.testing.assert_array_equal(both[:3], images)
    assert both.shape == (4, 8, 8, 1)
    assert not calls


@pytest.fixture(scope="module")
def generator(registered):
    return load_champion(NAME).unwrap_python_model()


@pytest.mark.parametrize(("ask", "message"), [
    ({"num_images": 0, "seed": 0}, "num_images must be >= 1"),
    ({"num_images": 1.5, "seed": 0}, "num_images must be an integer"),
    ({"seed": 0}, "num_images is required"),
    ({"num_images": 1, "seed": 0, "steps": 0}, "steps must be >= 1"),
    ({"num_images": 1, "seed": 0, "sampler": "euler"}, "sampler must be one of"),
    ({"num_images": 1, "seed": 0, "size": 4}, "unknown column"),
    ([], "no rows"),
    ("3 images", "input must be"),
])
def test_bad_requests_are_refused_with_clear_messages(generator, ask, message):
    with pytest.raises(ValueError, match=message):
        generator.predict(None, ask)


def test_the_registered_model_samples_on_the_evaluated_fast_path(generator):
    """predict() uses the fast path the evaluation used (settings stored in the model config, resolved for
    the serving device when loaded)."""
    assert generator.fast == FastPathParams(precision="fp32", channels_last=True)
