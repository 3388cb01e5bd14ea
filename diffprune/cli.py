"""``diffprune <stage>``: one subcommand per pipeline stage (what ``dvc.yaml`` runs).

Each stage reads its own group of ``params.yaml``; ``--set key=value`` overrides a key of that
group (``--set lr=1e-4`` or ``--set finetune.lr=1e-4``). Bad input exits with status 2 and one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from diffprune import cli_flows, paths
from diffprune.config import Params, load_params
from diffprune.errors import DiffpruneError

GROUPS = tuple(field.alias or name for name, field in Params.model_fields.items())


def _common(sub: argparse.ArgumentParser, group: str) -> None:
    sub.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    sub.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help=f"override a key of the '{group}' group, e.g. --set seed=1 (repeatable)",
    )
    sub.set_defaults(group=group)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffprune", description="Diff-Pruning pipeline stages (one per subcommand).")
    subs = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    p = subs.add_parser("prepare", help="prepare the dataset (digits, imagefolder, cifar10)")
    _common(p, "data")
    p.add_argument("--out", default=paths.DATA, help="prepared dataset folder (default: %(default)s)")

    p = subs.add_parser("teacher", help="provide the teacher: built-in, pretrained (hub/local) or trained from scratch")
    _common(p, "teacher")
    p.add_argument("--data", default=paths.DATA, help="prepared dataset (default: %(default)s)")
    p.add_argument("--out", default=paths.TEACHER, help="teacher model folder (default: %(default)s)")
    p.add_argument("--checkpoints", default=paths.TEACHER_CKPT, help="training checkpoints (default: %(default)s)")
    p.add_argument("--metrics", default=paths.METRICS, help="metrics folder (default: %(default)s)")

    p = subs.add_parser("score", help="importance scoring: the gradient pass of diff-pruning / taylor")
    _common(p, "score")
    p.add_argument("--data", default=paths.DATA, help="prepared dataset (default: %(default)s)")
    p.add_argument("--teacher", default=paths.TEACHER, help="model to score (default: %(default)s)")
    p.add_argument("--out", default=paths.SCORES, help="scores folder (default: %(default)s)")
    p.add_argument("--metrics", default=paths.METRICS, help="metrics folder (default: %(default)s)")

    p = subs.add_parser("prune", help="structural pruning at a ratio (paper semantics) or a MACs target")
    _common(p, "prune")
    p.add_argument("--teacher", default=paths.TEACHER, help="model to prune (default: %(default)s)")
    p.add_argument("--scores", default=paths.SCORES, help="scores folder from `score` (default: %(default)s)")
    p.add_argument("--out", default=paths.PRUNED, help="pruned model folder (default: %(default)s)")
    p.add_argument("--metrics", default=paths.METRICS, help="metrics folder (default: %(default)s)")

    p = subs.add_parser("finetune", help="fine-tune a student (optionally distilled from the teacher)")
    _common(p, "finetune")
    p.add_argument("--data", default=paths.DATA, help="prepared dataset (default: %(default)s)")
    p.add_argument("--student", default=paths.STUDENT, help="model to fine-tune (default: %(default)s)")
    p.add_argument("--teacher", default=paths.TEACHER, help="distillation teacher (default: %(default)s)")
    p.add_argument("--out", default=paths.FINETUNED, help="fine-tuned model folder (default: %(default)s)")
    p.add_argument("--checkpoints", default=paths.FINETUNE_CKPT, help="training checkpoints (default: %(default)s)")
    p.add_argument("--metrics", default=paths.METRICS, help="metrics folder (default: %(default)s)")

    p = subs.add_parser("evaluate", help="sample teacher and student from the same noise; FID, SSIM, MACs, latency")
    _common(p, "evaluate")
    p.add_argument("--data", default=paths.DATA, help="prepared dataset (default: %(default)s)")
    p.add_argument("--teacher", default=paths.TEACHER, help="teacher model (default: %(default)s)")
    p.add_argument("--student", default=paths.FINETUNED, help="student model (default: %(default)s)")
    p.add_argument("--samples", default=paths.SAMPLES, help="sample images and grids (default: %(default)s)")
    p.add_argument("--metrics", default=paths.METRICS, help="metrics folder (default: %(default)s)")

    cli_flows.add_parsers(subs)
    return parser


def _params_for(args: argparse.Namespace):
    overrides = []
    for item in args.overrides:
        key = item.split("=", 1)[0]
        head = key.split(".", 1)[0]
        if head in GROUPS and head != args.group:
            raise DiffpruneError(f"--set {item!r}: the {args.stage} stage reads only the '{args.group}' group")
        overrides.append(item if head == args.group else f"{args.group}.{item}")
    return getattr(load_params(args.params, overrides), args.group)


def _run(args: argparse.Namespace) -> dict:
    if getattr(args, "orchestrate", None):
        return cli_flows.run(args)
    from diffprune import (
        stages,  # heavy imports (torch, diffusers) only once arguments are valid
    )

    params = _params_for(args)
    runners: dict[str, Callable[[], dict]] = {
        "prepare": lambda: stages.prepare(params, args.out),
        "teacher": lambda: stages.teacher(params, args.data, args.out, args.checkpoints, args.metrics),
        "score": lambda: stages.score(params, args.data, args.teacher, args.out, args.metrics),
        "prune": lambda: stages.prune(params, args.teacher, args.scores, args.out, args.metrics),
        "finetune": lambda: stages.finetune(
            params, args.data, args.student, args.teacher, args.out, args.checkpoints, args.metrics
        ),
        "evaluate": lambda: stages.evaluate(
            params, args.data, args.teacher, args.student, args.samples, args.metrics
        ),
    }
    return runners[args.stage]()


def run(argv: list[str]) -> dict:
    """Run one stage from command-line arguments; bad input raises :class:`DiffpruneError`."""
    return _run(build_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = _run(args)
    except DiffpruneError as exc:
        print(f"diffprune {args.stage}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"diffprune {args.stage}: interrupted; completed outputs are intact", file=sys.stderr)
        return 130
    if summary:
        print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
