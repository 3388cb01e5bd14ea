"""``diffprune <stage>``: one subcommand per library stage of the stage table (what ``dvc.yaml`` runs).

Every subcommand is derived from :mod:`diffprune.pipeline.table`: ``--params``, ``--set``, one option per
input (defaulting to the upstream stage's output folder), ``--out``, ``--metrics`` and, for training
stages, ``--checkpoints``. Each stage reads its own group of the params file; ``--set key=value``
overrides a key of that group (``--set lr=1e-4`` or ``--set finetune.lr=1e-4``). Bad input exits with
status 2 and one line. The orchestration commands (``run``, ``sweep``, ``serve``, ``register``) are
added on top of these by ``diffprune.flows.cli``; this module knows nothing of them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from diffprune.common.errors import DiffpruneError
from diffprune.pipeline.config import Params, load_params
from diffprune.pipeline.table import LIBRARY, METRICS, STAGES, Stage

GROUPS = tuple(field.alias or name for name, field in Params.model_fields.items())


def add_common(sub: argparse.ArgumentParser, group: str | None) -> None:
    """``--params`` and ``--set``: a stage overrides keys of its own group, orchestration any key."""
    sub.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    example = f"override a key of the '{group}' group, e.g. --set seed=1" if group else \
        "override any key, e.g. --set prune.pruning_ratio=0.3"
    sub.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY=VALUE" if group else "GROUP.KEY=VALUE", help=f"{example} (repeatable)")


def add_stage_parser(subs, stage: Stage) -> None:
    p = subs.add_parser(stage.name, help=stage.help)
    add_common(p, stage.params_key)
    for name, upstream in stage.inputs:
        p.add_argument(f"--{name}", default=STAGES[upstream].out,
                       help=f"output of `{upstream}` to read (default: %(default)s)")
    p.add_argument("--out", *stage.out_aliases, dest="out", default=stage.out,
                   help=f"{stage.name} output folder (default: %(default)s)")
    p.add_argument("--metrics", default=METRICS, help="folder for the stage's summary (default: %(default)s)")
    if stage.trains:
        p.add_argument("--checkpoints", default=stage.checkpoints,
                       help="training checkpoints, kept so that a re-run resumes (default: %(default)s)")
    p.set_defaults(stage_entry=stage)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffprune", description="Diff-Pruning pipeline stages (one per subcommand).")
    subs = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage in LIBRARY:
        add_stage_parser(subs, stage)
    return parser


def stage_params(args: argparse.Namespace):
    """The stage's params group from ``--params`` and ``--set`` (a key of another group is refused)."""
    stage: Stage = args.stage_entry
    overrides = []
    for item in args.overrides:
        head = item.split("=", 1)[0].split(".", 1)[0]
        if head in GROUPS and head != stage.params_key:
            raise DiffpruneError(f"--set {item!r}: the {stage.name} stage reads only the '{stage.params_key}' group")
        overrides.append(item if head == stage.params_key else f"{stage.params_key}.{item}")
    return getattr(load_params(args.params, overrides), stage.group)


def run_stage(args: argparse.Namespace) -> dict:
    """Call the stage's function with the paths named on the command line (its uniform contract)."""
    stage: Stage = args.stage_entry
    params = stage_params(args)  # validated before the heavy imports below
    from diffprune.pipeline import stages

    paths = {name: Path(getattr(args, name)) for name, _ in stage.inputs}
    if stage.trains:
        paths["checkpoints"] = Path(args.checkpoints)
    return getattr(stages, stage.name)(params, out=Path(args.out), metrics=Path(args.metrics), **paths)


def run(argv: list[str]) -> dict:
    """Run one stage from command-line arguments; bad input raises :class:`DiffpruneError`."""
    return run_stage(build_parser().parse_args(argv))


def debugging() -> bool:
    """``DIFFPRUNE_DEBUG=1`` (or ``--debug``): show tracebacks behind the one-line errors."""
    return os.environ.get("DIFFPRUNE_DEBUG", "").strip().lower() in ("1", "true", "yes")


def guarded(command: str, action: Callable[[], dict]) -> int:
    """Run a command the way users see it: its summary as JSON, or one line and a non-zero status."""
    try:
        summary = action()
    except DiffpruneError as exc:
        if debugging():
            traceback.print_exc()
        print(f"diffprune {command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"diffprune {command}: interrupted; completed outputs are intact", file=sys.stderr)
        return 130
    if summary:
        print(json.dumps(summary, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return guarded(args.stage, lambda: run_stage(args))


if __name__ == "__main__":
    raise SystemExit(main())
