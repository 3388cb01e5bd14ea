"""What MLflow's lineage shows: the prepared dataset as a run input, the registered model as a run output.

The runs table fills its Dataset column from run inputs and its Models column from run outputs; the
experiment page opens on training runs (not the GenAI overview) when the experiment says what kind it is.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from mlflow.data.schema import TensorDatasetSchema
from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelOutput
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the UI's "model training" type
CONTEXT = "mlflow.data.context"  # the input tag the UI shows next to the dataset name


def dataset(prepared: Path) -> Dataset | None:
    """The prepared dataset as MLflow sees it, from its manifest (``None`` if ``prepared`` has none).

    The digest is that of the manifest, which lists the sha256 of every array: the same data gives the same
    digest in the flow's store and in DVC's ``data/prepared``, so MLflow shows one dataset for both.
    """
    file = Path(prepared) / "manifest.json"
    try:
        raw = file.read_bytes()
        manifest = json.loads(raw)
    except (OSError, ValueError):
        return None
    side, channels = manifest["resolution"], manifest["channels"]
    features = Schema([TensorSpec(np.dtype("uint8"), (-1, side, side, channels), "images")])
    targets = Schema([TensorSpec(np.dtype("int64"), (-1,), "labels")]) if manifest.get("classes") else None
    profile = {k: manifest.get(k) for k in ("n_train", "n_test", "resolution", "channels", "seed")}
    profile["classes"] = len(manifest.get("classes") or [])
    profile["captions"] = "captions.json" in manifest.get("files", {})
    return Dataset(
        name=f"{manifest['dataset']}-{side}px",
        digest=hashlib.sha256(raw).hexdigest()[:16],
        source_type="local",
        source=json.dumps({"uri": Path(prepared).resolve().as_uri(), "origin": str(manifest.get("source", ""))}),
        schema=json.dumps(TensorDatasetSchema(features, targets).to_dict()),
        profile=json.dumps(profile),
    )


def log_dataset(client: MlflowClient, run_id: str, data: Dataset, context: str) -> None:
    """``data`` as an input of ``run_id``, tagged with what the run used it for."""
    inputs = [DatasetInput(data, tags=[InputTag(CONTEXT, context)])]
    try:
        client.log_inputs(run_id, datasets=inputs)
    except MlflowException as exc:
        # Concurrent runs on one store both create the experiment's dataset row; the loser of that race
        # finds the winner's row on a second try (the store reuses a dataset with the same name and digest).
        if "UNIQUE constraint failed: datasets" not in str(exc):
            raise
        client.log_inputs(run_id, datasets=inputs)


def link_model(client: MlflowClient, run_ids: list[str], model_id: str | None) -> None:
    """Show the logged model ``model_id`` in the Models column of each run (the run that logged it has it)."""
    if not model_id:
        return
    for run_id in run_ids:
        if run_id and model_id not in {o.model_id for o in client.get_run(run_id).outputs.model_outputs}:
            client.log_outputs(run_id, [LoggedModelOutput(model_id, 0)])
