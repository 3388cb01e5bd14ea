"""Content fingerprints: what a stage's cache key is made of (its params, its inputs' content, its code).

A stage's code version covers what it runs and nothing more: its function in ``stages.py`` (and every
function, class or constant of that file it reaches), the import closure of the modules those use, the
source of its own params models, and the versions of the libraries that can change its numbers. The
params modules as a whole are not part of it — params enter a key by value — so editing the cron default
re-runs nothing. The
generated ``dvc.yaml`` lists the same files as each stage's deps. Paths never enter a key, only content.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import inspect
import json
import threading
from collections.abc import Iterable
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from diffprune.pipeline import config

PACKAGE = Path(__file__).resolve().parents[1]
PROJECT = PACKAGE.parent
# Params enter a key by value and each stage hashes its own params models' source (below).
NOT_CODE = frozenset({"diffprune.pipeline.config", "diffprune.pipeline.stage_params"})
# Libraries whose version can change a stage's numbers.
LIBRARIES = ("torch", "diffusers", "torch-pruning", "clean-fid", "accelerate", "numpy")


@cache
def module_file(module: str) -> Path | None:
    """The source file of a ``diffprune`` module, found by path without importing anything (``None``: not a
    module). Importing to ask would load a module's dependencies — torch, transformers — into a process that
    only checks cache keys. ``diffprune.tasks`` and ``diffprune.flows`` live in the project's top-level
    folders in a source checkout (pyproject's package-dir) and inside the package once installed."""
    parts = module.split(".")
    if parts[0] != PACKAGE.name or not all(p.isidentifier() for p in parts):
        return None
    base, rest = PACKAGE, parts[1:]
    if rest and not (PACKAGE / rest[0]).exists() and (PROJECT / rest[0] / "__init__.py").is_file():
        base, rest = PROJECT / rest[0], rest[1:]
    path = base.joinpath(*rest)
    for candidate in ((path / "__init__.py"), path.with_name(path.name + ".py")) if rest else [path / "__init__.py"]:
        if candidate.is_file():
            return candidate.resolve()
    return None


def _imports(module: str) -> set[str]:
    """The project modules that ``module`` imports (``from pkg import name`` of a non-module: ``pkg``)."""
    tree = ast.parse(module_file(module).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "diffprune":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if module_file(sub) else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "diffprune")
    return {m for m in found if m not in NOT_CODE and module_file(m)}


def module_closure(modules: Iterable[str]) -> tuple[str, ...]:
    """The project files of ``modules`` and everything they import from the project, relative to it."""
    todo, seen = [m for m in modules if m not in NOT_CODE], set()
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(_imports(module) - seen)
    return tuple(sorted(_relative(module_file(m)) for m in seen))


def _relative(file: Path) -> str:
    try:
        return file.relative_to(PROJECT).as_posix()
    except ValueError:  # installed outside the project (a wheel): the file's path is still unique
        return file.as_posix()


@cache
def _entry(stage: str) -> tuple[frozenset[str], str]:
    """What a stage function reaches in ``stages.py``: the project modules it uses and the source it runs.

    Every name the function uses is followed: a module-level import (of the project: its module enters the
    closure), a function, class or constant defined in ``stages.py`` (its source enters the key and its own
    names are followed in turn, public or private), an import inside a function, a local, a builtin. A name
    that is none of these raises :class:`UnseenName`, so code the key could not see never runs under it.
    """
    source = (PACKAGE / "pipeline" / "stages.py").read_text()
    tree = ast.parse(source)
    imported: dict[str, str | None] = {}  # local name → project module (None: a library)
    defined: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            imported.update(_import_names(node))
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            defined[node.name] = node
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    defined[target.id] = node
    if not isinstance(defined.get(stage), ast.FunctionDef):
        raise KeyError(f"stages.py has no function {stage!r}")
    todo, seen, modules = [stage], set(), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        node = defined[name]
        local = _bound_inside(node)
        for inner in ast.walk(node):
            if isinstance(inner, ast.Import | ast.ImportFrom):
                modules.update(m for m in _import_names(inner).values() if m)
            if not (isinstance(inner, ast.Name) and isinstance(inner.ctx, ast.Load)) or inner.id in local:
                continue
            if inner.id in imported:
                modules.update({imported[inner.id]} - {None})
            elif inner.id in defined:
                todo.append(inner.id)
            elif not hasattr(builtins, inner.id):
                raise UnseenName(f"stages.py: {name} uses {inner.id!r}, which its cache key cannot see "
                                 "(import it at module level or define it in stages.py)")
    body = "\n".join(ast.get_source_segment(source, defined[n]) or "" for n in sorted(seen))
    return frozenset(modules), body


class UnseenName(Exception):
    """A stage function uses a name that its cache key would not cover."""


def _import_names(node: ast.Import | ast.ImportFrom) -> dict[str, str | None]:
    """Local names an import statement binds → the project module behind each (None: not the project's)."""
    out: dict[str, str | None] = {}
    for alias in node.names:
        if isinstance(node, ast.Import):
            local = alias.asname or alias.name.split(".")[0]
            out[local] = alias.name if alias.name.split(".")[0] == PACKAGE.name and module_file(alias.name) else None
            continue
        module = node.module or ""
        if module.split(".")[0] != PACKAGE.name:
            out[alias.asname or alias.name] = None
            continue
        sub = f"{module}.{alias.name}"
        out[alias.asname or alias.name] = sub if module_file(sub) else module
    return out


def _bound_inside(node: ast.AST) -> set[str]:
    """Names a function or class binds itself: arguments, assignment and loop targets, inner imports."""
    bound = set()
    for inner in ast.walk(node):
        if isinstance(inner, ast.arg):
            bound.add(inner.arg)
        elif isinstance(inner, ast.Name) and isinstance(inner.ctx, ast.Store | ast.Del):
            bound.add(inner.id)
        elif isinstance(inner, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and inner is not node:
            bound.add(inner.name)
        elif isinstance(inner, ast.Import | ast.ImportFrom):
            bound.update(_import_names(inner))
        elif isinstance(inner, ast.ExceptHandler) and inner.name:
            bound.add(inner.name)
    return bound


@cache
def code_files(stage: str) -> tuple[str, ...]:
    """The project files whose code a library stage runs: the import closure of its function's modules."""
    return module_closure(_entry(stage)[0])


def params_source(model: type[BaseModel]) -> str:
    """The source of a params model, its bases and the models of its fields: what shapes its values."""
    seen: dict[str, str] = {}

    def visit(cls) -> None:
        for klass in cls.__mro__:
            if issubclass(klass, BaseModel) and klass.__module__ in NOT_CODE and klass.__name__ not in seen:
                seen[klass.__name__] = inspect.getsource(klass)
                for field in klass.model_fields.values():
                    if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                        visit(field.annotation)

    visit(model)
    return "\n".join(seen[k] for k in sorted(seen))


@cache
def code_version(stage: str, modules: tuple[str, ...] | None = None) -> str:
    """Hash of what ``stage`` runs: a library stage's function and closure, or (a stage of the
    orchestration layer) the closure of ``modules``; plus its params models' source and library versions."""
    # A sweep computes keys on many threads at once; CPython 3.11's ast.parse is not safe to run
    # concurrently ("AST constructor recursion depth mismatch"), and the caches below fill only once anyway.
    with _PARSING:
        return _code_version(stage, modules)


_PARSING = threading.RLock()


def _code_version(stage: str, modules: tuple[str, ...] | None) -> str:
    h = hashlib.sha256(_entry(stage)[1].encode() if modules is None else b"")
    for rel in code_files(stage) if modules is None else module_closure(modules):
        file = PROJECT / rel
        h.update(rel.encode() + b"\0" + (file.read_bytes() if file.is_file() else b"missing"))
    h.update(params_source(config.group_model(stage)).encode())
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
