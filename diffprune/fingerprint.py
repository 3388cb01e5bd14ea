"""Content fingerprints: what a stage's cache key is made of (its params, its inputs' content, its code).

A stage's code version covers what it runs and nothing more: its function in ``stages.py`` (and the
private helpers it calls), the import closure of the modules those use, the source of its own params
models, and the versions of the libraries that can change its numbers. ``config.py`` as a whole is
not part of it — params enter a key by value — so editing the cron default re-runs nothing. The
generated ``dvc.yaml`` lists the same files as each stage's deps. Paths never enter a key, only content.
"""

from __future__ import annotations

import ast
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

from diffprune import config
from diffprune.atomic import sha256_file

PACKAGE = Path(__file__).resolve().parent
PROJECT = PACKAGE.parent
# Params enter a key by value and each stage hashes its own params models' source (below).
NOT_CODE = frozenset({"diffprune.config"})
# Libraries whose version can change a stage's numbers.
LIBRARIES = ("torch", "diffusers", "torch-pruning", "clean-fid", "accelerate", "numpy")


def dir_digest(path: str | Path, exclude: tuple[str, ...] = ()) -> str:
    """sha256 over every file's relative path and content (a single file: its content).

    ``exclude`` names top-level entries left out (a manifest that records the digest itself). Within one
    process a folder is read once: later calls re-stat its files and reuse the digest while every file
    keeps its size, modification time and inode (a run checks the same store entry several times; each
    new process reads everything again, so a damaged entry is still caught by the next run).
    """
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise FileNotFoundError(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.relative_to(path).parts[0] not in exclude)
    signature = tuple((str(f), *_stat(f)) for f in files)
    memo_key = (str(path.resolve()), exclude)
    known = _DIGESTS.get(memo_key)
    if known is not None and known[0] == signature:
        return known[1]
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + sha256_file(f).encode() + b"\n")
    if signature == tuple((str(f), *_stat(f)) for f in files):  # unchanged while it was read
        _DIGESTS[memo_key] = (signature, h.hexdigest())
    return h.hexdigest()


_DIGESTS: dict[tuple, tuple[tuple, str]] = {}


def _stat(f: Path) -> tuple[int, int, int]:
    st = f.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


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
    """Modules whose names the stage's function in ``stages.py`` (and the private helpers it calls) uses,
    and the source of those functions (not all of ``stages.py``: editing one stage keeps the others' keys)."""
    source = (PACKAGE / "stages.py").read_text()
    tree = ast.parse(source)
    imported = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diffprune"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                imported[alias.asname or alias.name] = sub if module_file(sub) else node.module
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    if stage not in functions:
        raise KeyError(f"stages.py has no function {stage!r}")
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
    """The project files whose code a library stage runs: the import closure of its function's modules."""
    return module_closure(_entry(stage)[0])


def params_source(model: type[BaseModel]) -> str:
    """The source of a params model, its bases and the models of its fields: what shapes its values."""
    seen: dict[str, str] = {}

    def visit(cls) -> None:
        for klass in cls.__mro__:
            if issubclass(klass, BaseModel) and klass.__module__ == config.__name__ and klass.__name__ not in seen:
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
