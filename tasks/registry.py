"""Register a saved diffprune model in the MLflow Model Registry and promote it through the gate.

Every registered version gets the alias ``candidate``; it also gets ``champion`` when
:func:`diffprune.promotion.gate` passes against the current champion. The tracking/registry URI is
the caller's (``mlflow.set_tracking_uri``); nothing here chooses a store.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec

import diffprune
from diffprune.config import RegisterParams
from diffprune.promotion import gate, version_tags

MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
CANDIDATE, CHAMPION = "candidate", "champion"
# What the model's code (a copy of diffprune) imports. Listed explicitly because MLflow's own
# inference of requirements runs the model in a subprocess and takes seconds for every log.
REQUIREMENTS = (
    "torch", "torchvision", "diffusers", "safetensors", "numpy", "pandas", "pydantic", "pyyaml", "pillow",
    "tqdm", "scipy", "torch-pruning",
)


def pip_requirements() -> list[str]:
    """The requirements pinned to the installed versions (unpinned when a package is not installed)."""
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def signature() -> ModelSignature:
    """Explicit, since without an input example MLflow would infer none (or one from predict's hints)."""
    return ModelSignature(
        inputs=Schema([
            ColSpec("long", "num_images"),
            ColSpec("long", "seed"),
            ColSpec("long", "steps", required=False),
            ColSpec("string", "sampler", required=False),
            ColSpec("long", "label", required=False),  # class-conditional models
            ColSpec("string", "prompt", required=False),  # text-conditional models
            ColSpec("double", "guidance_scale", required=False),
        ]),
        outputs=Schema([TensorSpec(np.dtype("uint8"), (-1, -1, -1, -1))]),
    )


@contextlib.contextmanager
def _package_copy() -> Iterator[Path]:
    """diffprune's code without the shipped teacher (assets) or bytecode: the model needs only the code."""
    with tempfile.TemporaryDirectory(prefix="diffprune-code-") as tmp:
        dest = Path(tmp) / "diffprune"
        shutil.copytree(Path(diffprune.__file__).parent, dest,
                        ignore=shutil.ignore_patterns("assets", "__pycache__", "*.pyc"))
        yield dest


@contextlib.contextmanager
def _run(run_id: str | None) -> Iterator[None]:
    """Log into ``run_id`` (resumed) or the caller's active run; with neither, log no run at all.

    MLflow 3 logs models as LoggedModels of the active experiment, so a run is not needed; starting
    one only to hold the model would leave an empty run behind. A resumed run is ended on the way
    out (FINISHED, or FAILED on error), as ``mlflow.start_run``'s context always does.
    """
    active = mlflow.active_run()
    if run_id is None or (active is not None and active.info.run_id == run_id):
        yield
        return
    with mlflow.start_run(run_id=run_id, nested=active is not None):
        yield


def _champion(client: MlflowClient, name: str) -> tuple[str | None, dict | None]:
    aliases = client.get_registered_model(name).aliases or {}
    if CHAMPION not in aliases:
        return None, None
    champion = str(aliases[CHAMPION])
    return champion, dict(client.get_model_version(name, champion).tags)


def _description(summary: dict) -> str:
    parts = [f"diffprune model pruned with {summary.get('criterion') or 'an unrecorded criterion'}"]
    if summary.get("teacher"):
        parts.append(f"from teacher {summary['teacher']}")
    tags = version_tags(summary)
    numbers = ", ".join(f"{k} {tags[k]}" for k in ("fid_ratio", "macs_ratio", "fid", "teacher_fid") if k in tags)
    return " ".join(parts) + (f": {numbers}" if numbers else "")


def register(model_dir: str | Path, summary: dict, params: RegisterParams, run_id: str | None = None) -> dict:
    """Log ``model_dir`` as a pyfunc model, register a new version and run the promotion gate."""
    model_dir = Path(model_dir)
    if not (model_dir / "unet" / "config.json").is_file():
        raise ValueError(f"{model_dir}: not a model directory (expected unet/config.json)")
    name = params.model_name
    client = MlflowClient()

    with _package_copy() as code, _run(run_id), warnings.catch_warnings():
        # Deliberate: an input example would run predict (sampling) at log time; the signature is explicit.
        warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),
            artifacts={"model": str(model_dir)},
            model_config={"predict_steps": params.predict_steps, "predict_guidance": summary.get("guidance_scale"),
                          "fast_path": summary.get("fast_path_params")},
            code_paths=[str(code)],
            pip_requirements=pip_requirements(),
            signature=signature(),
        )
    new = mlflow.register_model(info.model_uri, name, tags=version_tags(summary))
    version = str(new.version)
    client.update_model_version(name, version, description=_description(summary))
    client.set_registered_model_alias(name, CANDIDATE, version)

    # The new version is not champion yet, so this reads the champion it must beat.
    previous, champion_tags = _champion(client, name)
    result = gate(summary, champion_tags, params)
    client.set_model_version_tag(name, version, "gate", "passed" if result.passed else "refused")
    client.set_model_version_tag(name, version, "gate_reasons", "; ".join(result.reasons))
    if result.passed:
        client.set_registered_model_alias(name, CHAMPION, version)

    return {
        "name": name,
        "version": version,
        "model_uri": f"models:/{name}/{version}",
        "aliases": sorted(client.get_model_version(name, version).aliases),
        "gate": {"passed": result.passed, "reasons": list(result.reasons)},
        "champion_version": version if result.passed else previous,
    }


def load_champion(name: str, alias: str = CHAMPION) -> mlflow.pyfunc.PyFuncModel:
    """The registered model behind ``alias`` (default the champion), ready for ``predict``."""
    return mlflow.pyfunc.load_model(f"models:/{name}@{alias}")
