"""One sweep branch through a Prefect work pool vs the same branch on the submitting host.

    python benchmarks/pool_overhead.py            # the default params: one branch of ~6.5 minutes each way
    python benchmarks/pool_overhead.py --quick    # 100 fine-tuning steps, one 128-image evaluation seed

A `prefect server start`, an S3 store (SeaweedFS) and one process-pool worker, all on loopback (the launchers
the tests use). The sweep is one branch (magnitude, seed 0, the params' MACs target), run twice, cold, on
separate store prefixes: with `orchestration.branches: local` and with `deployment` (after `diffprune deploy`).
Both compute the shared stages (prepare, teacher) in the submitting process, so the difference is what the pool
adds to a branch: the deployment run's scheduling, the worker's poll and the flow run's start-up, and reading
the shared stages' entries into the worker's cache. Runs one after another, never side by side.
Writes benchmarks/results/pool_overhead[-quick].{json,md}.
"""

from __future__ import annotations

import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the launchers the tests use

import yaml

from benchmarks.common import save
from benchmarks.overhead import quick_parser, read_params, timed
from diffprune.pipeline.table import NAMES


def main() -> None:
    args = quick_parser(__doc__).parse_args()
    raw = read_params(args.params, args.quick)
    target = (raw.get("sweep", {}).get("target_macs") or [0.5])[0]
    raw["sweep"] = {**raw.get("sweep", {}), "criteria": ["magnitude"], "seeds": [0], "target_macs": [target]}
    from pool_servers import prefect_cluster
    from servers import seaweed

    seconds, timelines = {}, {}
    with tempfile.TemporaryDirectory(prefix="diffprune-pool-overhead-") as tmp:
        tmp = Path(tmp)
        (tmp / "procs").mkdir()
        with seaweed(tmp / "s3") as s3, prefect_cluster(tmp / "procs") as cluster:
            env = {**cluster.env, **s3.env, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "2"}
            submitter = tmp / "submitter"
            submitter.mkdir()
            run = [sys.executable, "-m", "diffprune.flows"]
            for mode in ("local", "deployment"):
                params = {**raw, "orchestration": {**raw.get("orchestration", {}), "branches": mode,
                                                   "store": f"s3://{s3.bucket}/{mode}",
                                                   # relative: the worker keeps its own cache (another host)
                                                   "store_cache": f"cache-{mode}"},
                          "tracking": {**raw.get("tracking", {}), "uri": f"sqlite:///{tmp}/mlflow.db"},
                          "schedule": {**raw.get("schedule", {}), "work_pool": "bench"}}
                (submitter / "params.yaml").write_text(yaml.safe_dump(params))
                if mode == "deployment":
                    timed([*run, "deploy"], submitter, {**env, "PREFECT_HOME": str(submitter / "prefect")})
                    cluster.worker("w1", "bench", tmp / "host1", {**s3.env, "OMP_NUM_THREADS": "2"})
                    cluster.wait_worker("w1")
                start, since = time.perf_counter(), datetime.now(timezone.utc)
                timed([*run, "sweep"], submitter, {**env, "PREFECT_HOME": str(submitter / "prefect")})
                seconds[mode] = time.perf_counter() - start
                print(f"{mode}: {seconds[mode]:.1f} s", flush=True)
                timelines[mode] = timeline(cluster.api, since)
    ratio = seconds["deployment"] / seconds["local"]
    markdown = ("| one sweep branch (cold, plus the shared stages) | wall time |\n|---|---:|\n"
                f"| on the submitting host (`branches: local`) | {seconds['local']:.0f} s |\n"
                f"| through the work pool (`branches: deployment`, one worker) | {seconds['deployment']:.0f} s |\n\n"
                f"Pool / local: {ratio:.2f}× (+{seconds['deployment'] - seconds['local']:.0f} s).\n\n"
                + breakdown(timelines))
    print(markdown)
    save("pool_overhead-quick" if args.quick else "pool_overhead", {"quick": args.quick, "seconds": seconds,
                                                                     "ratio": ratio, "timelines": timelines}, markdown)


def timeline(api: str, since: datetime) -> dict[str, list]:
    """The flow runs created since ``since`` and their task runs: (name, start, end) in seconds from the first
    flow run's start, and when each flow run was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterStartTime
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(
            start_time=FlowRunFilterStartTime(after_=since))) if r.start_time and r.end_time]
        t0 = min(r.start_time for r in runs)
        out = {}
        for r in sorted(runs, key=lambda r: r.start_time):
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id])))
            rows = [["(created)", (r.created - t0).total_seconds(), None],
                    ["(flow run)", (r.start_time - t0).total_seconds(), (r.end_time - t0).total_seconds()]]
            # run_deployment's own task run (a randomly named placeholder for the child flow run) is the wait
            rows += sorted([_step(t.name), (t.start_time - t0).total_seconds(), (t.end_time - t0).total_seconds()]
                           for t in tasks if t.start_time and t.end_time)
            out[r.name] = sorted(rows, key=lambda row: row[1])
    return out


def _step(task_run_name: str) -> str:
    name = task_run_name.rsplit("-", 1)[0]
    return name if name in NAMES else "(waiting for the branch's flow run)"


def breakdown(timelines: dict[str, dict[str, list]]) -> str:
    """Where the time went, per mode: every flow and task run's start and end, in seconds."""
    lines = ["| mode | flow run | step | start (s) | end (s) | seconds |", "|---|---|---|---:|---:|---:|"]
    for mode, runs in timelines.items():
        for run, rows in runs.items():
            for name, start, end in rows:
                took = f"{end - start:.1f}" if end is not None else ""
                lines.append(f"| {mode} | {run} | {name} | {start:.1f} | {'' if end is None else f'{end:.1f}'} | "
                             f"{took} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
