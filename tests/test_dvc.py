"""`dvc repro` in a temporary git + DVC repository, driven as a user types it: the README's DVC commands run
line by line in a shell that has not activated the virtualenv; a second repro runs nothing; a params change
re-runs only downstream stages; a failed stage is undone by `dvc checkout`; push and pull through a remote."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from diffprune.common.digests import dir_digest
from diffprune.pipeline.table import NAMES
from tiny import TINY_PARAMS

ROOT = Path(__file__).resolve().parents[1]
ALL = set(NAMES)
VENV_BIN = Path(sys.executable).parent


def readme_dvc_commands() -> list[str]:
    """The block the README marks as the DVC commands, one command a line, comments dropped."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- dvc-commands:.*?-->\n```bash\n(.*?)```", text, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def _env() -> dict[str, str]:
    """A shell as a new user has it: the virtualenv neither activated nor on PATH."""
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != VENV_BIN)
    env = {**os.environ, "PATH": path, "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    for name in ("MLFLOW_TRACKING_URI", "VIRTUAL_ENV", "CONDA_PREFIX"):
        env.pop(name, None)
    return env


def _cmd(project: Path, *args: str, ok: bool = True) -> str:
    proc = subprocess.run(list(args), cwd=project, env=_env(), capture_output=True, text=True, timeout=900)
    assert (proc.returncode == 0) == ok, f"{args}: exit {proc.returncode}\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _dvc(project: Path, *args: str, ok: bool = True) -> str:
    return _cmd(project, ".venv/bin/dvc", *args, ok=ok)


def _typed(project: Path, line: str) -> str:
    return _cmd(project, "sh", "-c", line)


def _values(obj, key: str) -> list:
    """Every value stored under ``key`` anywhere in a JSON tree."""
    if isinstance(obj, dict):
        return [v for k, v in obj.items() if k == key] + [x for v in obj.values() for x in _values(v, key)]
    if isinstance(obj, list):
        return [x for v in obj for x in _values(v, key)]
    return []


def _ran(log: str) -> set[str]:
    return {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")}


def _project(tmp_path: Path, params: dict) -> Path:
    """A clone-like project: its files, `bin/diffprune`, and `.venv` (the test's virtualenv, as `make` makes it)."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "dvc.yaml", project)
    for package in ("diffprune", "tasks", "bin"):
        shutil.copytree(ROOT / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    (project / ".venv").symlink_to(VENV_BIN.parent, target_is_directory=True)
    (project / ".gitignore").write_text(".venv\n")
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    _cmd(project, "git", "init", "-q")
    _cmd(project, "git", "config", "user.email", "ci@example.com")
    _cmd(project, "git", "config", "user.name", "ci")
    _dvc(project, "init", "-q")
    _cmd(project, "git", "add", "-A")
    _cmd(project, "git", "commit", "-qm", "pipeline")
    return project


def test_the_stage_launcher_says_what_to_do_without_an_environment(tmp_path):
    shutil.copytree(ROOT / "bin", tmp_path / "bin")
    env = {**_env(), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([str(tmp_path / "bin/diffprune"), "prepare"], env=env, capture_output=True, text=True)
    assert proc.returncode == 127 and "make venv" in proc.stderr and len(proc.stderr.splitlines()) == 1


@pytest.mark.slow
def test_readme_dvc_commands_as_typed_experiments_recovery_and_a_remote(tmp_path):
    params = {**TINY_PARAMS, "prune": {"pruning_ratio": 0.4},  # the README's experiment sets 0.3: a change
              "register": {"max_fid_ratio": 100.0, "max_macs_ratio": 1.0},
              "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_root": str(tmp_path / "mlartifacts")}}
    project = _project(tmp_path, params)
    commands = readme_dvc_commands()
    assert commands[0] == ".venv/bin/dvc repro" and "exp run" in commands[1]

    outputs = [_typed(project, line) for line in commands]
    assert _ran(outputs[0]) == ALL
    assert _ran(outputs[1]) == {"prune", "finetune", "evaluate", "register"}
    assert "0.3" in outputs[2] and "0.4" in outputs[2], "the experiment and the baseline both show up"
    plots = json.JSONDecoder().raw_decode(outputs[4])[0]["data"]  # stderr follows: HEAD has no outputs yet
    assert {"fine-tuning loss", "FID vs MACs", "importance per layer"} <= set(plots)
    assert _ran(_dvc(project, "repro")) == set()
    register = json.loads((project / "metrics/register.json").read_text())
    assert register["registered"]["version"] == "2", "the README's repro registered version 1, its experiment 2"
    _cmd(project, "git", "add", "-A")
    _cmd(project, "git", "commit", "-qm", "baseline run")

    # A failing stage: DVC removes its outputs first; the README's recovery puts them back.
    weights = dir_digest(project / "models/finetuned")
    (project / "params.yaml").write_text(yaml.safe_dump({**params, "finetune": {**params["finetune"], "lr": -1}}))
    failed = _dvc(project, "repro", ok=False)
    assert "finetune.lr" in failed and "Traceback" not in failed
    _typed(project, "git checkout params.yaml && .venv/bin/dvc checkout")
    assert dir_digest(project / "models/finetuned") == weights

    params["finetune"] = {**params["finetune"], "steps": 6}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert _ran(_dvc(project, "repro")) == {"finetune", "evaluate", "register"}
    assert "metrics/evaluate.json" in _dvc(project, "metrics", "diff")
    _cmd(project, "git", "checkout", "--", ".")  # params, dvc.lock and the git-tracked metrics of the commit
    _dvc(project, "checkout", "-q")

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
