"""Content fingerprints: what a stage's cache key is made of (its params, its inputs' content, its code).

The Prefect tasks key their cache on these; ``dvc.yaml`` lists the same code files as stage deps
(a test keeps the two in step). Paths never enter a key, only content.
"""

from __future__ import annotations

import ast
import hashlib
import json
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from diffprune.atomic import sha256_file

PACKAGE = Path(__file__).parent

# Stages without an entry function in ``stages.py``: the modules they call directly.
STAGE_MODULES = {"register": ("promotion", "report")}
# Orchestration-edge code a stage also runs (registration talks to MLflow, so it lives in tasks/).
EDGE_FILES = {"register": ("tasks/registry.py", "tasks/mlflow_model.py")}
# Libraries whose version can change a stage's numbers.
LIBRARIES = ("torch", "diffusers", "torch-pruning", "clean-fid", "accelerate", "numpy")


def dir_digest(path: str | Path, exclude: tuple[str, ...] = ()) -> str:
    """sha256 over every file's relative path and content (a single file: its content).

    ``exclude`` names top-level entries left out (a manifest that records the digest itself).
    """
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise FileNotFoundError(path)
    h = hashlib.sha256()
    files = (p for p in path.rglob("*") if p.is_file() and p.relative_to(path).parts[0] not in exclude)
    for f in sorted(files):
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()


def _imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diffprune"):
            parts = node.module.split(".")
            if len(parts) > 1:
                found.add(parts[1])
            else:  # ``from diffprune import paths``
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("diffprune."))
    return {m for m in found if (PACKAGE / f"{m}.py").is_file()}


@cache
def _entry(stage: str) -> tuple[frozenset[str], str]:
    """Modules whose names the stage's function in ``stages.py`` (and the private helpers it calls) uses,
    and the source of those functions (not all of ``stages.py``: editing one stage keeps the others' keys)."""
    source = (PACKAGE / "stages.py").read_text()
    tree = ast.parse(source)
    imported = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diffprune"):
            for alias in node.names:
                imported[alias.asname or alias.name] = node.module.split(".")[1] if "." in node.module else alias.name
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    todo, seen_fns, modules = [stage], set(), set()
    while todo:
        name = todo.pop()
        if name in seen_fns or name not in functions:
            continue
        seen_fns.add(name)
        for node in ast.walk(functions[name]):
            if isinstance(node, ast.Name):
                if node.id in imported:
                    modules.add(imported[node.id])
                elif node.id.startswith("_"):
                    todo.append(node.id)
    body = "\n".join(ast.get_source_segment(source, functions[f]) or "" for f in sorted(seen_fns))
    return frozenset(modules), body


@cache
def code_files(stage: str) -> tuple[str, ...]:
    """The package files (relative to the project) whose code the stage runs: the import closure of the
    modules its entry function uses."""
    todo, seen = list(STAGE_MODULES.get(stage) or _entry(stage)[0]), set()
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(_imports(module) - seen)
    return tuple(sorted(f"diffprune/{m}.py" for m in seen)) + EDGE_FILES.get(stage, ())


@cache
def code_version(stage: str) -> str:
    """Hash of the stage's entry function, its code files and the library versions."""
    h = hashlib.sha256(_entry(stage)[1].encode() if stage not in STAGE_MODULES else b"")
    for rel in code_files(stage):
        file = PACKAGE.parent / rel
        h.update(rel.encode() + b"\0" + (file.read_bytes() if file.is_file() else b"missing"))
    h.update(json.dumps(library_versions(), sort_keys=True).encode())
    return h.hexdigest()[:16]


@cache
def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def stage_key(stage: str, params: Any, inputs: dict[str, str], code: str) -> str:
    """The cache key of one stage run: its params (a JSON-able dict), input content digests, code version."""
    blob = json.dumps({"stage": stage, "params": params, "inputs": inputs, "code": code}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]
