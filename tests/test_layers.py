"""Layers point one way — flows → tasks → diffprune — and only the project's own name is installed."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"diffprune": ROOT / "diffprune", "diffprune.tasks": ROOT / "tasks", "diffprune.flows": ROOT / "flows"}
# What each layer must never import (the layers above it, and the orchestration libraries for the core).
FORBIDDEN = {"diffprune": ("diffprune.tasks", "diffprune.flows", "tasks", "flows", "prefect", "prefect_dask", "mlflow"),
             "diffprune.tasks": ("diffprune.flows", "flows", "tasks")}


def _imported(file: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_never_imports_the_layers_above_it(layer):
    for file in sorted(LAYERS[layer].glob("*.py")):
        for name in _imported(file):
            bad = [f for f in FORBIDDEN[layer] if name == f or name.startswith(f + ".")]
            assert not bad, f"{file.relative_to(ROOT)} imports {name}"


def test_no_module_imports_the_generic_top_level_names():
    for folder in (*LAYERS.values(), ROOT / "tests", ROOT / "benchmarks"):
        for file in folder.glob("*.py"):
            for name in _imported(file):
                assert name.split(".")[0] not in ("tasks", "flows"), f"{file.relative_to(ROOT)} imports {name}"


def test_outside_the_checkout_only_the_project_name_is_importable(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for generic in ("tasks", "flows"):
        proc = subprocess.run([sys.executable, "-c", f"import {generic}"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and "No module named" in proc.stderr, generic
    probe = ("import sys, diffprune.pipeline.cli, diffprune.pipeline.table, diffprune.tasks.store, diffprune.flows.cli; "
             "print('prefect' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False", "the CLI and the stage table load without Prefect"
    command = Path(sys.executable).with_name("diffprune")
    proc = subprocess.run([str(command), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and {"prepare", "evaluate", "run", "sweep", "serve", "register"} <= set(
        proc.stdout.split()), proc.stdout


def test_the_stage_cli_is_the_library_s_own():
    from diffprune.pipeline.cli import build_parser
    from diffprune.pipeline.table import LIBRARY

    subs = build_parser()._subparsers._group_actions[0].choices
    assert list(subs) == [s.name for s in LIBRARY], "python -m diffprune runs library stages only"
