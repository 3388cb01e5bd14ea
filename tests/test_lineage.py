"""The prepared dataset as an MLflow input, including when a concurrent run created its row first."""

import json

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from diffprune.tracking.lineage import dataset, log_dataset


def _prepared(tmp_path):
    folder = tmp_path / "prepared"
    folder.mkdir()
    np.save(folder / "train.npy", np.zeros((4, 8, 8, 1), np.uint8))
    (folder / "manifest.json").write_text(json.dumps({
        "dataset": "digits", "source": "sklearn", "resolution": 8, "channels": 1, "n_train": 4, "n_test": 2,
        "classes": ["0", "1"], "seed": 0, "files": {"train.npy": "abc"}}))
    return folder


def test_dataset_entity_and_a_lost_race_for_its_row(tmp_path, monkeypatch):
    data = dataset(_prepared(tmp_path))
    assert data.name == "digits-8px" and len(data.digest) == 16
    assert json.loads(data.profile)["classes"] == 2 and "mlflow_tensorspec" in data.schema
    assert dataset(tmp_path) is None  # a folder without a manifest is not a prepared dataset

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("lineage", artifact_location=(tmp_path / "a").as_uri())
    run = client.create_run(experiment).info.run_id
    real, calls = client.log_inputs, []

    def loses_the_race_once(run_id, datasets=None, models=None):
        calls.append(run_id)
        if len(calls) == 1:  # what the losing process of two concurrent runs gets from sqlite
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                                  "datasets.name, datasets.digest")
        return real(run_id, datasets=datasets, models=models)

    monkeypatch.setattr(client, "log_inputs", loses_the_race_once)
    log_dataset(client, run, data, "training")
    (logged,) = client.get_run(run).inputs.dataset_inputs
    assert len(calls) == 2 and logged.dataset.digest == data.digest
    assert {t.key: t.value for t in logged.tags}["mlflow.data.context"] == "training"
