"""Rooms and the ways between them: each room of the code imports only the rooms below it, the
orchestration libraries stay in their rooms, and only the project's own name is installed.

Data flows one way — data → model family → pruning → training → evaluation — and the front ends sit on
top: MLflow tracking and the pipeline core use the library; the DVC front end (``repro``), the Prefect
tasks and the flows use them. The params schema (stage table, params models, external inputs) is read by
every room and itself reads only plain data.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("common", "data", "family", "pruning", "training", "evaluation")
# room → the rooms it may import (besides itself and the schema)
ALLOWED = {
    "common": (),
    "data": ("common",),
    "family": ("common", "data"),
    "pruning": ("common", "data", "family"),
    "training": ("common", "data", "family"),
    "evaluation": ("common", "data", "family", "pruning", "training"),
    "tracking": (*LIBRARY,),
    "pipeline": (*LIBRARY,),
    "repro": (*LIBRARY, "tracking", "pipeline"),
    "tasks": (*LIBRARY, "tracking", "pipeline"),
    "flows": (*LIBRARY, "tracking", "pipeline", "repro", "tasks"),
}
# Read by every room: the stage table, the params models, the external-input digests.
SCHEMA = ("diffprune.pipeline.table", "diffprune.pipeline.stage_params", "diffprune.pipeline.config",
          "diffprune.pipeline.external")
# What the schema itself may read: plain data and digests, nothing that computes.
SCHEMA_READS = ("diffprune.common", "diffprune.pruning.criteria", "diffprune.family.shipped", "diffprune.family.hub",
                *SCHEMA)
# Libraries of the front ends, and the only rooms that may import them.
LIBRARIES = {"prefect": ("tasks", "flows"), "prefect_dask": ("flows",), "mlflow": ("tracking", "flows")}


def _rooms() -> dict[str, Path]:
    rooms = {p.name: p for p in sorted((ROOT / "diffprune").iterdir()) if (p / "__init__.py").is_file()}
    return {**rooms, "tasks": ROOT / "tasks", "flows": ROOT / "flows"}


def _room_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "diffprune" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in ALLOWED else None


def _is_module(name: str) -> bool:
    parts = name.split(".")
    if parts[0] != "diffprune":
        return False
    if len(parts) > 1 and parts[1] in ("tasks", "flows"):
        parts = parts[1:]
    path = ROOT.joinpath(*parts)
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imported(file: Path) -> set[str]:
    """Every module an import names, at any depth of the file (``from a import b``: ``a.b`` when it is a
    module of the project, else ``a``)."""
    names = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                names.add(sub if _is_module(sub) else node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def _is(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_every_room_has_its_rules():
    assert set(_rooms()) == set(ALLOWED), "a new room needs its line in ALLOWED (and in the README's Layout)"
    assert not [p.name for p in (ROOT / "diffprune").glob("*.py") if p.name not in ("__init__.py", "__main__.py")], \
        "modules live in rooms, not at the package's top level"


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_a_room_imports_only_the_rooms_below_it(room):
    for file in sorted(_rooms()[room].glob("*.py")):
        rel = file.relative_to(ROOT)
        module = f"diffprune.{room}.{file.stem}"
        for name in _imported(file):
            if _is(module, SCHEMA) and name.startswith("diffprune."):
                assert _is(name, SCHEMA_READS), f"{rel} (the schema) imports {name}"
                continue
            other = _room_of(name)
            if other is None or other == room or _is(name, SCHEMA):
                continue
            assert other in ALLOWED[room], f"{rel} imports {name}: room {room} may not use room {other}"


@pytest.mark.parametrize("library", sorted(LIBRARIES))
def test_orchestration_libraries_stay_in_their_rooms(library):
    for room, folder in _rooms().items():
        for file in folder.glob("*.py"):
            if any(_is(name, (library,)) for name in _imported(file)):
                assert room in LIBRARIES[library], f"{file.relative_to(ROOT)} imports {library}"


def test_no_module_imports_the_generic_top_level_names():
    folders = (*_rooms().values(), ROOT / "diffprune", ROOT / "tests", ROOT / "benchmarks")
    for folder in folders:
        for file in folder.glob("*.py"):
            for name in _imported(file):
                assert name.split(".")[0] not in ("tasks", "flows"), f"{file.relative_to(ROOT)} imports {name}"


def test_outside_the_checkout_only_the_project_name_is_importable(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for generic in ("tasks", "flows"):
        proc = subprocess.run([sys.executable, "-c", f"import {generic}"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and "No module named" in proc.stderr, generic
    probe = ("import sys, diffprune.pipeline.cli, diffprune.pipeline.table, diffprune.tasks.store, "
             "diffprune.flows.cli; print('prefect' in sys.modules)")
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
    from diffprune.pipeline.table import LIBRARY as STAGES

    subs = build_parser()._subparsers._group_actions[0].choices
    assert list(subs) == [s.name for s in STAGES], "python -m diffprune runs library stages only"
