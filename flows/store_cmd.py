"""``diffprune store ls | gc``: what the content-addressed store holds, and removing what nothing references.

``gc`` keeps an entry (:mod:`diffprune.tasks.store`) when
- a registered model version's run (its ``run_id``: the flow's parent run) tags its key (``diffprune.key.*``,
  every stage the run recorded, register included), or a ``register`` entry names a version that still exists;
- a flow's parent run tags it that matters for a re-run: per experiment, flow and params file, the latest
  finished run, the latest failed one after it (a re-run resumes from its stages) and every run still marked
  running (its nested stage runs name each stage's key as soon as it is done: ``diffprune.cache_key``);
- it is an input of a kept entry (its manifest's ``inputs``), although those runs tag every stage anyway;
- it was created within ``--min-age-hours``: a concurrent run has not tagged it yet.
Everything else with a manifest goes, and so do leftovers older than the minimum age (:mod:`diffprune.tasks.gc`).
A tracking store that cannot be read, or that records nothing, ends the command before anything is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diffprune.common.errors import DiffpruneError, first_line
from diffprune.flows import preflight
from diffprune.pipeline import cli
from diffprune.pipeline.config import Params
from diffprune.tasks.gc import Inventory, delete, inventory, plan, tree_size, when
from diffprune.tasks.store import Store, is_url

FLOW_SOURCE = "prefect flow"  # mlflow.source.name of the flows' runs (flows/context.py, prefect_tags)
PARAMS_FILE = "diffprune.params_file"  # a parent run's params file (params_file_tag)
KEY_TAG = "diffprune.key."  # + label → cache key, set on the parent run when it finishes
STAGE_KEY = "diffprune.cache_key"  # on each nested stage run, set as the stage is recorded


class ReferencesUnknown(DiffpruneError):
    """The tracking store could not be read: what is referenced is unknown, so nothing may be removed."""


def params_file_tag(params_file: str | None) -> dict[str, str]:
    """The parent run's tag naming its params file, as ``gc`` groups runs: the path inside the git work tree
    that holds it (``params.yaml``, ``presets/sd15.yaml``), so one file of the project is one params file on
    every host and clone, whatever its edits; outside a work tree, ``host:absolute path``."""
    path = Path(params_file or "params.yaml").resolve()
    with contextlib.suppress(OSError, subprocess.TimeoutExpired, ValueError):
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=path.parent, capture_output=True,
                             text=True, timeout=10)
        if top.returncode == 0 and top.stdout.strip():
            return {PARAMS_FILE: path.relative_to(Path(top.stdout.strip()).resolve()).as_posix()}
    return {PARAMS_FILE: f"{socket.gethostname()}:{path}"}


def add_parser(subs: Any) -> None:
    """``diffprune store ls`` and ``diffprune store gc``, with the params options of every orchestration command."""
    actions = subs.add_parser("store", help="list the store, or remove what nothing references").add_subparsers(
        dest="store_action", required=True, metavar="ACTION", help="ls: what is stored; gc: remove orphans")
    ls = actions.add_parser("ls", help="every entry by stage (key, size, created) and what else takes space")
    gc = actions.add_parser("gc", help="remove entries no registered model or latest run references (dry run "
                                       "unless --yes)")
    gc.add_argument("--yes", action="store_true", help="delete (default: print what would go and the space freed)")
    gc.add_argument("--min-age-hours", type=_hours, default=24.0, metavar="H",
                    help="keep anything younger: a concurrent run tags its keys when it finishes (default: 24)")
    for name, sub in (("ls", ls), ("gc", gc)):
        cli.add_common(sub, None)
        sub.add_argument("--debug", action="store_true", help="show tracebacks behind one-line errors")
        sub.set_defaults(orchestrate=f"store {name}")


def _hours(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text}: expected hours ≥ 0")
    return value


def command(params: Params, args: argparse.Namespace) -> dict:
    store = Store(params.orchestration.store, params.orchestration.store_cache)
    preflight.store(params)  # a URL store that does not answer: one line, exit 2
    if args.store_action == "ls":
        print("\n".join(listing(store, inventory(store))))
        return {}
    now = time.time()  # before the references are read: an entry published meanwhile counts as fresh
    refs, models, summary = references(params)
    found = inventory(store)
    keep, gone, old = plan(store, found, refs, models, now - args.min_age_hours * 3600)
    print(summary)
    for e in sorted(found.entries):
        print(f"keep    {e.stage}/{e.key}  {human(e.size)}  {keep[e.key]}" if e.key in keep else
              f"remove  {e.stage}/{e.key}  {human(e.size)}  orphan, created {when(e.created)}")
    for left in old:
        print(f"remove  {left.where}  {human(left.size)}  {left.what}, last written {when(left.newest)}")
    freed = human(sum(e.size for e in gone) + sum(left.size for left in old))
    if not args.yes:
        print(f"would free {freed}: {len(gone)} entries, {len(old)} leftovers (dry run; --yes deletes them)")
        return {}
    removed = delete(store, gone, old)
    print(f"freed {freed}: {removed} entries, {len(old)} leftovers removed")
    return {}


def references(params: Params) -> tuple[dict[str, str], set[tuple[str, str]], str]:
    """Kept keys (with why), every registered (model, version), and a line saying where they came from."""
    from diffprune.tracking.runs import resolve_uri

    uri = resolve_uri(params.tracking)
    origin = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "tracking.uri"
    local = uri.removeprefix("sqlite:///").removeprefix("file://") if "://" not in uri or uri.startswith(
        ("sqlite:///", "file://")) else None
    why = (f"{local} does not exist" if local is not None and not Path(local).exists() else
           preflight._answers(uri.rstrip("/") + "/health") if uri.startswith(("http://", "https://")) else None)
    if why is None:
        try:
            refs, models, runs = _read(uri)
        except Exception as exc:  # MLflow and its HTTP client raise many types for one cause
            why = f"{type(exc).__name__}: {first_line(exc)}"
        else:
            why = None if runs or models else "it records no registered model and no diffprune flow run"
    if why is not None:
        raise ReferencesUnknown(f"cannot read the references of the store from the tracking store {uri} (from "
                                f"{origin}): {why}; nothing was removed (point tracking.uri or MLFLOW_TRACKING_URI "
                                "at the store the runs were recorded in)")
    return refs, models, f"references from {uri}: {len(models)} registered versions, {runs} flow runs"


def _read(uri: str) -> tuple[dict[str, str], set[tuple[str, str]], int]:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    refs: dict[str, str] = {}
    models: set[tuple[str, str]] = set()

    def keep(run: Any, why: str, children: list | None = None) -> None:
        keys = [v for k, v in run.data.tags.items() if k.startswith(KEY_TAG)]
        for key in keys + [c.data.tags[STAGE_KEY] for c in children or () if STAGE_KEY in c.data.tags]:
            refs.setdefault(key, why)

    for version in _pages(lambda token: client.search_model_versions(page_token=token)):
        models.add((version.name, str(version.version)))
        try:
            run = client.get_run(version.run_id) if version.run_id else None
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            run = None  # the run was purged: only a register entry can still name this version
        if run is not None:
            keep(run, f"model {version.name} v{version.version}")
    seen = 0
    for exp in _pages(lambda token: client.search_experiments(page_token=token)):
        runs = list(_pages(lambda token, e=exp.experiment_id: client.search_runs(
            [e], f"tags.`mlflow.source.name` LIKE '{FLOW_SOURCE}%'", order_by=["attributes.start_time DESC"],
            page_token=token)))
        children: dict[str, list] = {}
        groups: dict[tuple[str, str], list] = {}
        for run in runs:  # newest first
            parent = run.data.tags.get("mlflow.parentRunId")
            if parent:
                children.setdefault(parent, []).append(run)
            else:  # runs from before the params-file tag form one group per flow
                groups.setdefault((run.data.tags.get(PARAMS_FILE, ""), run.data.tags["mlflow.source.name"]),
                                  []).append(run)
        for (params_file, _), group in groups.items():
            seen += len(group)
            finished = failed = False
            for run in group:
                status, name = run.info.status, f"{run.info.run_name} ({params_file or 'params file unrecorded'})"
                if status in ("RUNNING", "SCHEDULED"):
                    keep(run, f"unfinished run {name}", children.get(run.info.run_id))
                elif status == "FINISHED" and not finished:
                    keep(run, f"latest run {name}", children.get(run.info.run_id))
                    finished = True
                elif not (finished or failed):  # failed after the latest finished run: a re-run resumes from it
                    keep(run, f"latest failed run {name}", children.get(run.info.run_id))
                    failed = True
    return refs, models, seen


def _pages(search: Any) -> Iterator[Any]:
    token = None
    while True:
        page = search(token)
        yield from page
        token = page.token
        if not token:
            return


def listing(store: Store, found: Inventory) -> list[str]:
    width = max((len(e.stage) + len(e.key) + 1 for e in found.entries), default=10)
    lines = [f"store {store.root}", f"{'ENTRY':<{width}}  {'SIZE':>9}  CREATED"]
    for stage in sorted({e.stage for e in found.entries}):
        mine = [e for e in found.entries if e.stage == stage]
        lines += [f"{e.stage + '/' + e.key:<{width}}  {human(e.size):>9}  {when(e.created)}" for e in mine]
        lines.append(f"  {stage}: {len(mine)} entries, {human(sum(e.size for e in mine))}")
    total = sum(e.size for e in found.entries)
    lines.append(f"entries: {len(found.entries)}, {human(total)}")
    kinds: dict[str, list[int]] = {}
    for left in found.leftovers:
        kinds.setdefault(left.what, [0, 0])[0] += 1
        kinds[left.what][1] += left.size
    lines += ["not entries:"] + [f"  {what}: {n}, {human(size)}" for what, (n, size) in sorted(kinds.items())]
    lines += [f"  {name}: {human(size)}" for name, size in sorted(found.other.items())]
    if is_url(store.root) and store.cache:
        lines.append(f"  this host's cache ({store.cache}, not in the total): {human(tree_size(Path(store.cache))[0])}")
    lines.append(f"total: {human(total + sum(k[1] for k in kinds.values()) + sum(found.other.values()))}")
    return lines


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
