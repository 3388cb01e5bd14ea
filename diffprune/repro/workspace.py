"""``diffprune register``: the last ``dvc repro`` stage — track the workspace's run in MLflow, register the model.

One parent run per ``dvc repro`` that reached this stage, one nested run per stage with its params,
metrics, curves and files, tagged with the git commit and the stage's output hashes from ``dvc.lock``.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from diffprune.common.atomic import atomic_file, write_json
from diffprune.common.errors import DiffpruneError
from diffprune.evaluation.report import headline, render
from diffprune.pipeline.config import Params
from diffprune.pipeline.table import LIBRARY, METRICS, STAGES
from diffprune.tracking.runs import code_tags, start_tracking, ui_url

REGISTER = STAGES["register"]


def _summary(stage: str) -> dict:
    source = Path(METRICS) / STAGES[stage].metrics_file
    try:
        return json.loads(source.read_text())
    except (OSError, ValueError):
        raise DiffpruneError(f"{source}: missing or unreadable; run `dvc repro` (or the stage) first") from None


def dvc_hashes(lock: Path = Path("dvc.lock")) -> dict[str, str]:
    """``stage -> "path:md5 …"`` of each stage's outputs as ``dvc.lock`` recorded them."""
    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {name: " ".join(f"{o['path']}:{o.get('md5', '?')}" for o in entry.get("outs", []))
            for name, entry in stages.items()}


def register_workspace(params: Params) -> dict:
    """Mirror the workspace's stage outputs into MLflow; register and gate ``models/finetuned``."""
    from diffprune.tracking.register import register, registered_now, registry_link

    summaries = {s.name: _summary(s.name) for s in LIBRARY}
    hashes = dvc_hashes()
    source = {"diffprune.front_end": "dvc", "mlflow.source.type": "JOB", "mlflow.source.name": "dvc repro"}
    tracker = start_tracking(params.tracking, "dvc-repro", {**code_tags(), **source})
    ok = False
    try:
        for s in LIBRARY:
            tracker.log_stage(s.name, getattr(params, s.group).model_dump(mode="json"), summaries[s.name],
                              Path(METRICS), Path(s.out), {"diffprune.dvc_outs": hashes.get(s.name, "")[:5000]})
        summary = headline(summaries)
        outcome = None
        if params.registration.enabled:
            model_dir = STAGES[REGISTER.input_stage("model")].out
            grid = Path(STAGES["evaluate"].out) / STAGES["evaluate"].images[0]
            outcome = register(tracker, registered_now(model_dir, summary, params.registration, grid))
        report = render(summary, title="diffprune dvc repro", links={
            "MLflow run": ui_url(tracker.uri, tracker.experiment_id, tracker.run_id),
            **({"Registry": registry_link(outcome)} if outcome else {})})
        tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, int | float)})
        tracker.log_text(report, "report.md")
        with atomic_file(Path(METRICS) / "report.md") as fh:
            fh.write(report)
        result = {"mlflow_run_id": tracker.run_id, "registered": outcome}
        write_json(Path(METRICS) / REGISTER.metrics_file, result)
        ok = True
        return result
    finally:
        tracker.finish(ok)
