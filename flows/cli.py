"""The ``diffprune`` command: the library's stage subcommands plus the orchestration commands
``run | sweep | serve | deploy | register | store``. It sits on top of every layer (flows → tasks → diffprune), so the
library's own CLI (``python -m diffprune <stage>``, what stage subprocesses and ``dvc.yaml`` run) never
reaches up into Prefect or MLflow. Flows and tasks are imported only once the params have validated,
after the environment below is set (Prefect reads it at import time).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from diffprune.common import progress
from diffprune.common.errors import DiffpruneError
from diffprune.flows import preflight, store_cmd
from diffprune.pipeline import cli
from diffprune.pipeline.config import load_params
from diffprune.pipeline.table import STAGES

# What a first run on a fresh machine needs: the temporary Prefect server's database set-up takes
# ~20 s here (minutes on a busy machine), past Prefect's default 20 s start-up limit; no telemetry leaves.
ENVIRONMENT = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    # A tracking server or Prefect API that goes away mid-run: a few retries over seconds, not minutes
    # (MLflow's defaults retry 7 times with a doubling backoff; a dead server cost 272 s before failing).
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "PREFECT_CLIENT_MAX_RETRIES": "3",
}
COMMANDS = {
    "run": "run the pipeline flow (the main job) on params.yaml",
    "sweep": "run the sweep flow: criteria × MACs targets × seeds, one comparison table",
    "serve": "serve the pipeline flow on the cron schedule in params.yaml (Prefect server)",
    "deploy": "deploy the pipeline (cron from params.yaml) and sweep-branch flows on a work pool (Prefect server)",
    "register": STAGES["register"].help,  # the last stage of `dvc repro`
}


def prepare_environment(store: str, cache: str) -> None:
    """Defaults only: anything the user exported wins. Cache records live next to the store they describe
    (a URL store's go to the store itself, :mod:`diffprune.tasks.results`; this folder keeps the rest)."""
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    if not progress.interactive():  # MLflow's artifact bar would write carriage-return frames into the log
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    local = cache if "://" in store else store
    os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(Path(local, "_prefect_results").resolve()))


class _OneLineFailures(logging.Filter):
    """Prefect logs a failed task's or flow's exception with its traceback. For the failures diffprune explains
    in one line (bad input, a refused write, an unreachable service) that is noise above the line that says
    what to do; ``DIFFPRUNE_DEBUG=1`` keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], DiffpruneError) and not cli.debugging():
            record.exc_info, record.exc_text = None, None
        return True


def quiet_expected_tracebacks() -> None:
    """On every handler of Prefect's loggers (its flow- and task-run loggers have their own)."""
    names = [n for n in logging.root.manager.loggerDict if n == "prefect" or n.startswith("prefect.")]
    for handler in {h for name in names for h in logging.getLogger(name).handlers} | set(logging.root.handlers):
        if not any(isinstance(f, _OneLineFailures) for f in handler.filters):
            handler.addFilter(_OneLineFailures())


def build_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, text in COMMANDS.items():
        p = subs.add_parser(name, help=text)
        cli.add_common(p, None)
        p.add_argument("--debug", action="store_true", help="show tracebacks behind one-line errors")
        p.set_defaults(orchestrate=name)
    subs.choices["sweep"].add_argument("--task-runner", choices=("local", "dask"), default=None,
                                       help="override orchestration.task_runner")
    subs.choices["serve"].add_argument("--once", action="store_true",
                                       help="create the deployment and exit instead of serving it")
    store_cmd.add_parser(subs)  # `store ls | gc`: the store itself, no flow
    return parser


def orchestrate(args: argparse.Namespace) -> dict:
    overrides = list(args.overrides)
    if getattr(args, "task_runner", None):
        overrides.append(f"orchestration.task_runner={args.task_runner}")
    if args.debug:
        os.environ["DIFFPRUNE_DEBUG"] = "1"
    params = load_params(args.params, overrides)  # validate before any heavy import
    prepare_environment(params.orchestration.store, params.orchestration.store_cache)
    if args.orchestrate.startswith("store "):
        return store_cmd.command(params, args)
    preflight.tracking(params)  # run, sweep and register log to it; serve hands it to the runs it starts
    preflight.store(params)
    if args.orchestrate != "register":
        preflight.prefect_api()
    if args.orchestrate == "sweep":
        preflight.dask_cluster(params)  # orchestration.dask_address: the scheduler answers, every worker is ready
    if args.orchestrate == "run":
        from diffprune.flows.pipeline import pipeline

        quiet_expected_tracebacks()
        print_headline(pipeline(params_file=args.params, overrides=overrides))
        return {}
    if args.orchestrate == "sweep":
        from diffprune.flows.sweep import sweep

        if params.orchestration.branches == "deployment":
            from diffprune.flows.branches import require_cluster

            require_cluster(params)  # before any stage: a shared store, the server, the branch deployment
        quiet_expected_tracebacks()
        result = sweep(params_file=args.params, overrides=overrides)
        print(result["table"])
        print(f"comparison written to {result['table_file']}")
        return {}
    if args.orchestrate == "serve":
        from diffprune.flows.serve import serve

        return serve(args.params, overrides, once=args.once)
    if args.orchestrate == "deploy":
        from diffprune.flows.deploy import deploy

        return deploy(args.params, overrides)
    from diffprune.repro.workspace import register_workspace

    return register_workspace(params)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "orchestrate", None):
        return cli.guarded(args.orchestrate, lambda: orchestrate(args))
    return cli.guarded(args.stage, lambda: cli.run_stage(args))


def print_headline(result: dict) -> None:
    h = result["summary"]
    print()
    print(f"teacher: {h['teacher_params']:,} params, {h['teacher_macs'] / 1e6:.2f} M MACs, "
          f"FID {h['teacher_fid']:.3f} ± {h['teacher_fid_std']:.3f}")
    print(f"pruned ({h['method']}): {h['params']:,} params, {h['macs'] / 1e6:.2f} M MACs "
          f"({h['macs_ratio']:.3f}×), FID {h['fid']:.3f} ± {h['fid_std']:.3f} (ratio {h['fid_ratio']:.2f}), "
          f"SSIM to teacher {h['ssim']:.3f}, speed-up {h['speedup']:.2f}× (ideal {1 / h['macs_ratio']:.2f}×)")
    hits = result["cache_hits"]
    print(f"cache hits: {sum(hits.values())}/{len(hits)} stages "
          f"({', '.join(k for k, v in hits.items() if v) or 'none'})")
    if result.get("registered"):
        r = result["registered"]
        print(f"registered: {r['model_uri']} aliases {', '.join(r['aliases'])}; "
              f"gate {'passed' if r['gate']['passed'] else 'refused'}")
    print(f"report: {result['report']}")
    if result.get("tracking_uri"):
        print(f"MLflow: mlflow ui --backend-store-uri {result['tracking_uri']}   (then {result.get('mlflow_url')})")
    print("Prefect: prefect server start   (then http://127.0.0.1:4200; flow runs and their report artifacts)")
