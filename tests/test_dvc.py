"""`dvc repro` in a temporary git + DVC repository: runs, skips what is up to date, re-runs only downstream
stages, runs experiments that `dvc exp show` / `metrics diff` / `plots diff` compare, and pushes to and pulls
from a local-directory remote."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from diffprune.fingerprint import dir_digest
from diffprune.stage_table import NAMES
from tiny import TINY_PARAMS

ROOT = Path(__file__).resolve().parents[1]
ALL = set(NAMES)


def _cmd(project: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(list(args), cwd=project, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _dvc(project: Path, *args: str) -> str:
    return _cmd(project, sys.executable, "-m", "dvc", *args)


def _values(obj, key: str) -> list:
    """Every value stored under ``key`` anywhere in a JSON tree."""
    if isinstance(obj, dict):
        return [v for k, v in obj.items() if k == key] + [x for v in obj.values() for x in _values(v, key)]
    if isinstance(obj, list):
        return [x for v in obj for x in _values(v, key)]
    return []


def _ran(log: str) -> set[str]:
    return {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")}


@pytest.mark.slow
def test_dvc_repro_experiments_and_a_remote(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "dvc.yaml", project)
    for package in ("diffprune", "tasks"):
        shutil.copytree(ROOT / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    params = {**TINY_PARAMS, "register": {"max_fid_ratio": 100.0, "max_macs_ratio": 1.0},
              "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_root": str(tmp_path / "mlartifacts")}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    _cmd(project, "git", "init", "-q")
    _cmd(project, "git", "config", "user.email", "ci@example.com")
    _cmd(project, "git", "config", "user.name", "ci")
    _dvc(project, "init", "-q")
    _cmd(project, "git", "add", "-A")
    _cmd(project, "git", "commit", "-qm", "pipeline")

    assert _ran(_dvc(project, "repro")) == ALL
    assert _ran(_dvc(project, "repro")) == set()
    register = json.loads((project / "metrics/register.json").read_text())
    assert register["registered"]["version"] == "1" and "champion" in register["registered"]["aliases"]
    _cmd(project, "git", "add", "-A")
    _cmd(project, "git", "commit", "-qm", "baseline run")

    params["finetune"] = {**params["finetune"], "steps": 6}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert _ran(_dvc(project, "repro")) == {"finetune", "evaluate", "register"}
    assert "metrics/evaluate.json" in _dvc(project, "metrics", "diff")
    _cmd(project, "git", "checkout", "--", "params.yaml")
    _dvc(project, "checkout", "-q")

    exp = _dvc(project, "exp", "run", "-S", "prune.pruning_ratio=0.5")
    assert _ran(exp) == {"prune", "finetune", "evaluate", "register"}
    shown = json.loads(_dvc(project, "exp", "show", "--json"))
    ratios = _values(shown, "pruning_ratio")
    assert 0.5 in ratios and 0.3 in ratios, "the experiment and the baseline both show up"
    plots = json.loads(_dvc(project, "plots", "diff", "--json", "HEAD"))["data"]
    assert {"fine-tuning loss", "FID vs MACs", "importance per layer"} <= set(plots)

    remote = tmp_path / "remote"
    _dvc(project, "remote", "add", "-d", "local", str(remote))
    weights = dir_digest(project / "models/finetuned")
    _dvc(project, "push")
    shutil.rmtree(project / ".dvc/cache")
    shutil.rmtree(project / "models")
    shutil.rmtree(project / "data/prepared")
    _dvc(project, "pull")
    assert dir_digest(project / "models/finetuned") == weights
    assert _ran(_dvc(project, "repro")) == set()
