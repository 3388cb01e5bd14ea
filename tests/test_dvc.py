"""`dvc repro` runs the stage chain from dvc.yaml, skips what is up to date, and re-runs only downstream stages."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tiny import TINY_PARAMS

ROOT = Path(__file__).resolve().parents[1]


def _dvc(project: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout + proc.stderr


def _ran(log: str) -> set[str]:
    return {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")}


@pytest.mark.slow
def test_dvc_repro_runs_skips_and_reruns_downstream_only(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "dvc.yaml", project)
    shutil.copytree(ROOT / "diffprune", project / "diffprune", ignore=shutil.ignore_patterns("__pycache__"))
    (project / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    _dvc(project, "init", "--no-scm", "-q")

    first = _dvc(project, "repro")
    assert _ran(first) == {"prepare", "teacher", "score", "prune", "finetune", "evaluate"}
    assert (project / "metrics/evaluate.json").is_file()

    assert _ran(_dvc(project, "repro")) == set()

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["finetune"]["steps"] = 6
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert _ran(_dvc(project, "repro")) == {"finetune", "evaluate"}
    assert "evaluate.json" in _dvc(project, "metrics", "show")
