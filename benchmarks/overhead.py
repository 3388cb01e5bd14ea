"""Pipeline overhead: cold vs fully cached runs of the main flow and of `dvc repro`, and where the time goes.

    python benchmarks/overhead.py            # the default params: ~35 minutes on 2 CPU cores
    python benchmarks/overhead.py --quick    # 100 fine-tuning steps, one 128-image evaluation seed: ~8 minutes
    python benchmarks/overhead.py --cached-only .   # a finished project: cached run vs a bare Prefect flow

Prefect state (PREFECT_HOME: its database, the bare flow's results) always goes to a temporary directory
that is deleted at the end, never into the project or this working tree.

Each front end runs in its own scratch project (a copy of the code, params.yaml and dvc.yaml; fresh
PREFECT_HOME, MLflow store and caches, so neither reuses the other's FID extractor or features). For the
flow, the wall time splits into the stages' own work (their summaries), the stage processes around it
(start-up, imports, loading and saving) and the rest: orchestration, tracking, hashing. For `dvc repro`,
into the stages' own work (metrics/<stage>.json) and the rest (stage processes, DVC's hashing and lock).
Writes benchmarks/results/overhead[-quick].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from benchmarks.common import RESULTS, save

ROOT = Path(__file__).resolve().parents[1]
WORK_KEYS = {"teacher": "seconds", "score": "seconds", "prune": "seconds", "finetune": "train_seconds",
             "evaluate": "seconds"}


def quick_parser(doc: str) -> argparse.ArgumentParser:
    """The command line the overhead benchmarks share: ``--params`` and ``--quick`` (see :func:`read_params`)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--quick", action="store_true")
    return ap


def read_params(path: str, quick: bool) -> dict:
    """The params file's content; ``quick``: 100 fine-tuning steps and one 128-image evaluation seed."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if quick:
        raw["finetune"] = {**raw.get("finetune", {}), "steps": 100, "checkpoint_every": 50}
        raw["evaluate"] = {**raw.get("evaluate", {}), "seeds": [0], "n_samples": 128}
    return raw


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def flow_split(store: Path) -> dict:
    """Stage process time (manifest) and stage work time (the stage's own summary), per stage."""
    out = {}
    for manifest_file in store.glob("*/*/manifest.json"):
        m = json.loads(manifest_file.read_text())
        out[m["stage"]] = {"process_s": m["seconds"], "work_s": m["summary"].get(WORK_KEYS.get(m["stage"], ""))}
    return out


def dvc_work(metrics: Path) -> dict:
    """Stage work time from the metrics files a `dvc repro` wrote."""
    out = {}
    for stage, key in WORK_KEYS.items():
        path = metrics / f"{stage}.json"
        if path.is_file():
            out[stage] = json.loads(path.read_text()).get(key)
    return out


def scratch_project(root: Path, raw: dict) -> Path:
    root.mkdir()
    for package in ("diffprune", "tasks", "flows"):
        shutil.copytree(ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", root)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return root


def env_for(project: Path) -> dict:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PREFECT_HOME": str(project / ".prefect"), "PYTHONPATH": str(project),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "TQDM_DISABLE": "1", "DVC_NO_ANALYTICS": "1"}
    for name in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        env.pop(name, None)
    return env


def cached_vs_bare(project: Path, env: dict, repeats: int) -> dict:
    """Fully cached `diffprune run` next to a bare Prefect flow of 7 cached tasks (benchmarks/bare_flow.py)
    with the same environment and temporary server, interleaved; medians of ``repeats``."""
    from diffprune.flows.cli import ENVIRONMENT

    env = {**ENVIRONMENT, **env}
    bare = [sys.executable, str(ROOT / "benchmarks" / "bare_flow.py")]
    run = [sys.executable, "-m", "diffprune.flows", "run"]
    timed(bare, project, env)  # fills the bare flow's cache
    times = {"diffprune_run_s": [], "bare_flow_s": []}
    for _ in range(repeats):
        times["bare_flow_s"].append(timed(bare, project, env))
        times["diffprune_run_s"].append(timed(run, project, env))
    out = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {**out, "ratio": out["diffprune_run_s"] / out["bare_flow_s"], "all": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cached-only", type=Path, metavar="PROJECT",
                    help="only the cached-run comparison, in PROJECT (its last `diffprune run` must be complete)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.cached_only:
        project = args.cached_only.resolve()
        # A fresh Prefect home per benchmark run, outside the project: its database and the bare flow's
        # results never land in a working tree. The `diffprune run` cache records live next to the
        # project's store (PREFECT_RESULTS_LOCAL_STORAGE_PATH), so its stages are still cache hits.
        with tempfile.TemporaryDirectory(prefix="diffprune-overhead-prefect-") as home:
            result = cached_vs_bare(project, {**env_for(project), "PREFECT_HOME": home}, args.repeats)
        print(render_cached(result))
        save("overhead_cached", result, render_cached(result), args.out)
        return
    raw = read_params(args.params, args.quick)

    with tempfile.TemporaryDirectory(prefix="diffprune-overhead-") as tmp:
        flow_project = scratch_project(Path(tmp) / "flow", raw)
        env = env_for(flow_project)
        run = [sys.executable, "-m", "diffprune.flows", "run"]
        flow_cold = timed(run, flow_project, env)
        cached = cached_vs_bare(flow_project, env, args.repeats)
        flow_cached = cached["diffprune_run_s"]
        split = flow_split(flow_project / "artifacts" / "store")
        dvc_project = scratch_project(Path(tmp) / "dvc", raw)
        env = env_for(dvc_project)
        for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
            timed(cmd, dvc_project, env)
        repro_cold = timed([sys.executable, "-m", "dvc", "repro"], dvc_project, env)
        repro_cached = timed([sys.executable, "-m", "dvc", "repro"], dvc_project, env)
        repro_work = dvc_work(dvc_project / "metrics")
    process = sum(s["process_s"] for s in split.values())
    work = sum(s["work_s"] or 0.0 for s in split.values())
    dvc_work_s = sum(v or 0.0 for v in repro_work.values())
    payload = {"quick": args.quick, "cached_vs_bare": cached,
               "flow": {"cold_s": flow_cold, "cached_s": flow_cached, "stages": split,
                                             "stage_processes_s": process, "stage_work_s": work,
                                             "outside_stages_s": flow_cold - process,
                                             "outside_share": (flow_cold - process) / flow_cold},
               "dvc": {"cold_s": repro_cold, "cached_s": repro_cached, "stage_work": repro_work,
                       "stage_work_s": dvc_work_s, "outside_work_share": (repro_cold - dvc_work_s) / repro_cold}}
    markdown = render(payload)
    print(markdown)
    save("overhead-quick" if args.quick else "overhead", payload, markdown, args.out)


def render_cached(c: dict) -> str:
    return (f"Fully cached `diffprune run` {c['diffprune_run_s']:.1f} s vs a bare Prefect flow of 7 cached tasks "
            f"{c['bare_flow_s']:.1f} s (same temporary server set-up, interleaved medians): "
            f"{c['ratio']:.2f}×.\n")


def render(p: dict) -> str:
    f, d = p["flow"], p["dvc"]
    lines = ["| pipeline | cold | fully cached |", "|---|---:|---:|",
             f"| `diffprune run` (Prefect flow, MLflow, registry) | {f['cold_s']:.0f} s | {f['cached_s']:.1f} s |",
             f"| `dvc repro` (incl. the register stage) | {d['cold_s']:.0f} s | {d['cached_s']:.1f} s |", "",
             f"Cold flow: stage work {f['stage_work_s']:.0f} s; stage processes {f['stage_processes_s']:.0f} s "
             f"(work + start-up, imports, loading, saving); outside the stages {f['outside_stages_s']:.0f} s "
             f"({100 * f['outside_share']:.1f} % of the wall time: server start, orchestration, tracking, hashing).",
             f"Everything but the stages' own work: flow {100 * (1 - f['stage_work_s'] / f['cold_s']):.1f} %, "
             f"`dvc repro` {100 * d['outside_work_share']:.1f} % (stage work {d['stage_work_s']:.0f} s of "
             f"{d['cold_s']:.0f} s; the rest is stage-process start-up, loading, saving and DVC's hashing).",
             "", render_cached(p["cached_vs_bare"]),
             "| stage | flow: process s | flow: work s | dvc repro: work s |", "|---|---:|---:|---:|"]
    for stage, s in sorted(f["stages"].items()):
        work, dvc = s["work_s"], d["stage_work"].get(stage)
        lines.append(f"| {stage} | {s['process_s']:.1f} | {'–' if work is None else f'{work:.1f}'} | "
                     f"{'–' if dvc is None else f'{dvc:.1f}'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
