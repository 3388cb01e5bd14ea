"""MLflow tracking of a pipeline run: one parent run, one nested run per stage.

Runs are created and closed through an explicit ``MlflowClient`` with run ids, never the fluent
"active run", because MLflow's active run is per thread and Prefect tasks run on other threads.
Both front ends use this: the Prefect flow (stage outputs in the store) and ``diffprune register``
after ``dvc repro`` (stage outputs at the fixed paths).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from diffprune.common.atomic import file_lock
from diffprune.pipeline.config import TrackingParams
from diffprune.pipeline.table import STAGES, Curve
from diffprune.tracking import lineage


def resolve_uri(params: TrackingParams) -> str:
    """``MLFLOW_TRACKING_URI`` wins; a relative ``sqlite:///`` path is made absolute (runs start anywhere)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def artifact_location(root: str, tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts. A URL (``s3://…``, ``file://…``, ``mlflow-artifacts:/…``)
    is kept as given; a plain path is made absolute, except with an http(s) tracking server, where a path
    on this host would be unreadable from any other: there the server's own default (``--artifacts-destination``,
    served through the server) is used."""
    if "://" in root or root.startswith("mlflow-artifacts:"):
        return root
    if tracking_uri.startswith(("http://", "https://")):
        return None
    return Path(root).resolve().as_uri()


def ui_url(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The run's page in the MLflow UI: the server itself for an http(s) URI, else where ``mlflow ui`` listens.

    ``workflowType=machine_learning`` opens the model-training view; MLflow 3.17's UI otherwise starts an
    experiment on its GenAI overview, whatever the experiment's kind.
    """
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs{f'/{run_id}' if run_id else ''}?workflowType=machine_learning"


def code_tags(root: str | Path = ".") -> dict[str, str]:
    """The git commit (with a dirty flag) and the ``dvc.lock`` digest the run was made from."""
    tags = {}
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        if sha.returncode == 0:
            tags["mlflow.source.git.commit"] = sha.stdout.strip()
            tags["diffprune.git_dirty"] = str(bool(dirty.stdout.strip())).lower()
    except (OSError, subprocess.TimeoutExpired):
        pass
    lock = Path(root) / "dvc.lock"
    if lock.is_file():
        tags["diffprune.dvc_lock"] = hashlib.sha256(lock.read_bytes()).hexdigest()[:16]
    return tags


def _flatten(obj, prefix: str = "") -> dict:
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = obj
    return out


@contextlib.contextmanager
def _schema_lock(uri: str) -> Iterator[None]:
    """Concurrent first runs would each create and migrate the same new SQLite database, and fail."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        yield
        return
    with file_lock(uri[len(prefix):] + ".lock"):
        yield


class Tracker:
    """One MLflow parent run and its nested stage runs."""

    def __init__(self, params: TrackingParams, run_name: str, tags: dict[str, str]):
        self.uri = resolve_uri(params)
        mlflow.set_tracking_uri(self.uri)  # the registry and pyfunc logging use the fluent API
        with _schema_lock(self.uri):
            self.client = MlflowClient(self.uri)
            exp = self.client.get_experiment_by_name(params.experiment)
            self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
                params.experiment, artifact_location=artifact_location(params.artifact_root, self.uri),
                tags=lineage.EXPERIMENT_KIND)
        if exp is not None and not lineage.EXPERIMENT_KIND.items() <= exp.tags.items():
            for k, v in lineage.EXPERIMENT_KIND.items():  # an experiment made before this tag existed
                self.client.set_experiment_tag(self.experiment_id, k, v)
        self.run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
        self.dataset = None  # the prepared dataset, once the stage that prepared it is logged

    def log_stage(self, stage: str, params: dict, summary: dict, metrics_dir: Path, output_dir: Path | None,
                  tags: dict[str, str], cached_key: str | None = None) -> str:
        """A nested run with the stage's params, scalar results, per-step curves, plots and files.

        ``cached_key``: the stage was a cache hit with this key; its curves, plots and files are already in
        the run that computed it, so this run records params and results and links there instead.
        """
        if cached_key is not None:
            tags = {**tags, **self._computed_in(cached_key)}
        run_id = self.client.create_run(self.experiment_id, run_name=stage, tags={
            "mlflow.parentRunId": self.run_id, "diffprune.stage": stage, **tags}).info.run_id
        flat = _flatten(params)
        self.client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in flat.items()])
        self._log_dataset(stage, run_id, output_dir)
        bars = STAGES[stage].bars
        self.log_metrics({k: v for k, v in _flatten(summary).items() if k not in {b.key for b in bars}}, run_id)
        if cached_key is not None:
            self.client.set_terminated(run_id)
            return run_id
        entry = STAGES[stage]
        with tempfile.TemporaryDirectory() as tmp:
            for file in sorted(Path(metrics_dir).glob(f"{stage}*")):
                self.client.log_artifact(run_id, str(file), "metrics")
            for curve in entry.curves:
                source = curve.path(output_dir, metrics_dir)
                if source is None or not source.is_file():
                    continue
                plot = self._log_curve(curve, source, run_id, Path(tmp))
                if plot:
                    self.client.log_artifact(run_id, str(plot), "plots")
            for bar in entry.bars:
                if summary.get(bar.key):
                    plot = _bars(summary[bar.key], bar.x, bar.title, Path(tmp) / f"{bar.key}.png")
                    self.client.log_artifact(run_id, str(plot), "plots")
        for image in entry.images if output_dir is not None else ():
            if (Path(output_dir) / image).is_file():
                self.client.log_artifact(run_id, str(Path(output_dir) / image), "samples")
        self.client.set_terminated(run_id)
        return run_id

    def _log_dataset(self, stage: str, run_id: str, output_dir: Path | None) -> None:
        """The stage that prepared the data makes it the parent run's training input; stages that read it
        (an input named ``data``) list it as their input, tagged with the stage's name."""
        prepared = lineage.dataset(output_dir) if output_dir is not None and not STAGES[stage].inputs else None
        if prepared is not None:
            self.dataset = prepared
            lineage.log_dataset(self.client, self.run_id, prepared, "training")
        elif self.dataset is not None and "data" in dict(STAGES[stage].inputs):
            lineage.log_dataset(self.client, run_id, self.dataset, stage)

    def link_model(self, outcome: dict, *run_ids: str) -> None:
        """The registered model in the Models column of this parent run (and of ``run_ids``)."""
        lineage.link_model(self.client, [self.run_id, *run_ids], outcome.get("model_id"))

    def _computed_in(self, key: str) -> dict[str, str]:
        """Tags naming the earlier nested run that computed the entry ``key`` (none if it is not tracked here)."""
        found = self.client.search_runs(
            [self.experiment_id], max_results=1, order_by=["attributes.start_time ASC"],
            filter_string=f"tags.`diffprune.cache_key` = '{key}' and tags.`diffprune.cache` = 'miss'")
        if not found:
            return {}
        run = found[0].info
        return {"diffprune.computed_in_run": run.run_id,
                "mlflow.note.content": f"Cache hit: curves, plots and files are in run {run.run_id}."}

    def _log_curve(self, curve: Curve, source: Path, run_id: str, folder: Path) -> Path | None:
        """A line curve becomes a metric history (x as the step) and a plot; bars become a bar chart."""
        with open(source) as fh:
            rows = list(csv.DictReader(fh))
        out = folder / f"{Path(curve.file).stem}.png"
        if curve.kind == "bars":
            return _bars({r[curve.y]: float(r[curve.x]) for r in rows}, curve.x, curve.title, out, log=True)
        if curve.kind != "line":
            return None
        points = [(int(float(r[curve.x])), float(r[curve.y])) for r in rows]
        metric = curve.metric or curve.y
        for i in range(0, len(points), 1000):
            self.client.log_batch(run_id, metrics=[Metric(metric, v, 0, s) for s, v in points[i:i + 1000]])
        return _plot(points, curve, out)

    def log_metrics(self, values: dict, run_id: str | None = None) -> None:
        metrics = [Metric(k, float(v), 0, 0) for k, v in values.items()
                   if isinstance(v, int | float) and not isinstance(v, bool)]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(run_id or self.run_id, metrics=metrics[i:i + 1000])

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def finish(self, ok: bool) -> None:
        status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
        self.client.set_terminated(self.run_id, status=status)


def start_tracking(params: TrackingParams, run_name: str, tags: dict[str, str]) -> Tracker:
    """The parent run of one pipeline run, for both front ends: the one place that picks the backend."""
    return Tracker(params, run_name, tags)


def _plot(points: list, curve: Curve, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot([p[0] for p in points], [p[1] for p in points], lw=1)
    ax.set_xlabel(curve.x)
    ax.set_ylabel(curve.y)
    ax.set_title(curve.title)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def _bars(values: dict[str, float], xlabel: str, title: str, out: Path, log: bool = False) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(values)
    fig, ax = plt.subplots(figsize=(6, 0.18 * len(names) + 1.2), dpi=120)
    ax.barh(range(len(names)), [values[n] for n in names], log=log)
    ax.set_yticks(range(len(names)), [n[-40:] for n in names], fontsize=5)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
