"""Register a saved diffprune model in the MLflow Model Registry and promote it through the gate.

Every registered version gets the alias ``candidate``; it also gets ``champion`` when
:func:`diffprune.tracking.promotion.gate` passes against the current champion. The tracking/registry URI is
the caller's (``mlflow.set_tracking_uri``); nothing here chooses a store.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from urllib.parse import quote

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec

import diffprune
from diffprune.evaluation.report import render
from diffprune.pipeline.stage_params import RegisterParams
from diffprune.tracking import lineage
from diffprune.tracking.promotion import gate, version_tags
from diffprune.tracking.runs import Tracker

MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
CANDIDATE, CHAMPION = "candidate", "champion"
MODEL_METRICS = ("fid", "fid_ratio", "macs_ratio", "params_ratio", "ssim", "speedup", "teacher_fid")
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
    """Explicit, since without an input example MLflow would infer none (or one from predict's hints); the
    columns are the request table that the model's code parses, so the two cannot drift apart."""
    from diffprune.tracking.mlflow_model import COLUMNS  # it loads torch: only when a model is logged

    return ModelSignature(
        inputs=Schema([ColSpec(column.type, column.name, required=column.required) for column in COLUMNS]),
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


def _logged_model(client: MlflowClient, run_id: str | None, summary: dict) -> str:
    """A new LoggedModel whose source is ``run_id`` (the run that produced the model, if any); its metrics
    are the headline numbers, so the model page shows them."""
    experiment = client.get_run(run_id).info.experiment_id if run_id else None
    model = mlflow.initialize_logged_model(name="model", source_run_id=run_id, experiment_id=experiment,
                                           tags=version_tags(summary), model_type="diffusion")
    if run_id:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0, model_id=model.model_id)
                                          for k, v in summary.items() if k in MODEL_METRICS and v is not None])
    return model.model_id


def _champion(client: MlflowClient, name: str) -> tuple[str | None, dict | None]:
    aliases = client.get_registered_model(name).aliases or {}
    if CHAMPION not in aliases:
        return None, None
    champion = str(aliases[CHAMPION])
    return champion, dict(client.get_model_version(name, champion).tags)


def _description(summary: dict, name: str, version: str, run_id: str | None, grid: str | None) -> str:
    """The report's headline numbers (markdown) and, when the grid was logged (``grid``: its artifact path in
    ``run_id``), the sample grid inline."""
    try:
        text = render(summary, title=f"{name} version {version}")
    except (KeyError, TypeError):  # a caller's partial summary (not a pipeline headline): what it has
        tags = version_tags(summary)
        text = f"diffprune model pruned with {summary.get('criterion') or 'an unrecorded criterion'}: " + ", ".join(
            f"{k} {tags[k]}" for k in ("fid_ratio", "macs_ratio", "fid", "teacher_fid") if k in tags) + "\n"
    if run_id and grid:
        # Relative URLs: the UI serves artifacts under the page's own origin and prefix.
        url = f"get-artifact?path={quote(grid)}&run_uuid={run_id}"
        text += f"\n![rows alternate: teacher above pruned, same noise]({url})\n\nSamples: run `{run_id}`, `{grid}`.\n"
    return text


def register_version(model_dir: str | Path, summary: dict, params: RegisterParams, run_id: str | None = None,
             grid: Path | None = None) -> dict:
    """Log ``model_dir`` as a pyfunc model, register a new version and run the promotion gate.

    ``run_id``: the run that produced the model (default: the active run, if any). The logged model names it
    as its source, so the registry version and the run's Models column point at each other.
    ``grid``: the evaluation's sample grid, logged to that run and shown in the version's description.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "unet" / "config.json").is_file():
        raise ValueError(f"{model_dir}: not a model directory (expected unet/config.json)")
    name = params.model_name
    client = MlflowClient()
    if run_id is None and (active := mlflow.active_run()) is not None:
        run_id = active.info.run_id

    model_id = _logged_model(client, run_id, summary)
    with _package_copy() as code, warnings.catch_warnings():
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
            model_id=model_id,
        )
        if run_id:
            lineage.link_model(client, [run_id], model_id)
        logged_grid = None
        if run_id and grid is not None and Path(grid).is_file():
            # A sweep registers several branches from one run: each grid under its branch, none overwritten.
            where = f"samples/{summary['branch']}" if summary.get("branch") else "samples"
            client.log_artifact(run_id, str(grid), where)
            logged_grid = f"{where}/{Path(grid).name}"
    new = mlflow.register_model(info.model_uri, name, tags=version_tags(summary))
    version = str(new.version)
    client.update_model_version(name, version, description=_description(summary, name, version, run_id, logged_grid))
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
        "model_id": model_id,  # the logged model: runs that show it in their Models column link here
        "run_id": run_id,
        "aliases": sorted(client.get_model_version(name, version).aliases),
        "gate": {"passed": result.passed, "reasons": list(result.reasons)},
        "champion_version": version if result.passed else previous,
    }


def register(tracker: Tracker, version: Callable[[str], tuple[dict, bool]], run_name: str = "register") -> dict:
    """The register stage under both front ends: a nested run (``run_name``) under the tracker's parent run,
    in which ``version(parent_run_id)`` registers the model (:func:`register_version`: pyfunc, new version,
    gate, aliases) or finds the version a cached run registered — returning ``(outcome, cached)``; the
    nested run records the outcome, and the model appears in the Models column of both runs."""
    client = tracker.client
    nested = client.create_run(tracker.experiment_id, run_name=run_name, tags={
        "mlflow.parentRunId": tracker.run_id, "diffprune.stage": "register"}).info.run_id
    try:
        outcome, cached = version(tracker.run_id)
    except BaseException:
        client.set_terminated(nested, status="FAILED")
        raise
    client.set_tag(nested, "diffprune.cache", "hit" if cached else "miss")
    client.set_tag(nested, "diffprune.registered_version", f"{outcome['name']}/{outcome['version']}")
    client.log_dict(nested, outcome, "register.json")
    client.set_terminated(nested)
    tracker.link_model(outcome, nested)
    return outcome


def registered_now(model_dir: str | Path, summary: dict, params: RegisterParams,
                   grid: Path | None) -> Callable[[str], tuple[dict, bool]]:
    """The ``version`` of :func:`register` that registers ``model_dir`` now (no cache in front of it)."""
    return lambda run_id: (register_version(model_dir, summary, params, run_id, grid), False)


def registry_link(outcome: dict) -> str:
    """How reports point at a registered version: its URI, aliases and the gate's verdict."""
    failed = "; ".join(r for r in outcome["gate"]["reasons"] if "fail" in r.lower())
    gate = "passed" if outcome["gate"]["passed"] else f"refused: {failed}" if failed else "refused"
    return f"`{outcome['model_uri']}` aliases {', '.join(outcome['aliases']) or 'none'} (gate {gate})"


def load_champion(name: str, alias: str = CHAMPION) -> mlflow.pyfunc.PyFuncModel:
    """The registered model behind ``alias`` (default the champion), ready for ``predict``."""
    return mlflow.pyfunc.load_model(f"models:/{name}@{alias}")
