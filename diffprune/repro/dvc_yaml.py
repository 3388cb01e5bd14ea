"""``dvc.yaml``, generated from the stage table: one ``bin/diffprune <stage>`` per stage, its code as deps
(the same files its Prefect cache key hashes), its params group, its outputs, metrics and plots.

``python -m diffprune.repro.dvc_yaml`` writes it; ``--check`` fails when the file differs (a test
runs the check, so the table and ``dvc.yaml`` cannot drift apart).
"""

from __future__ import annotations

import yaml

from diffprune.pipeline.fingerprint import code_files, module_closure
from diffprune.pipeline.generated import generator_main
from diffprune.pipeline.table import METRICS, STAGES, TABLE, Stage

HEADER = """\
# Generated from diffprune/pipeline/table.py by `python -m diffprune.repro.dvc_yaml`: edit the table, not
# this file (a test checks that they agree). One stage per `diffprune` subcommand; each depends on its own
# code (the files its Prefect cache key hashes), its own params group and the upstream outputs.
# Commands go through bin/diffprune, which finds the project's .venv when the shell has not activated it.
# `dvc repro` reproduces the default run; `dvc exp run -S prune.pruning_ratio=0.5` tries another target;
# `dvc exp show`, `dvc metrics diff`, `dvc plots diff` compare.
"""
# What `diffprune <stage>` runs under DVC for a stage of the orchestration layer, besides its own code.
DVC_FRONT_END = {"register": "diffprune.repro.workspace"}
TEMPLATES = {"line": "linear", "bars": "bar_horizontal", "scatter": "scatter"}


def _stage(stage: Stage) -> dict:
    # DVC sees files, not functions: a library stage also depends on stages.py, where its function lives.
    code = ("diffprune/pipeline/stages.py", *code_files(stage.name)) if stage.library else \
        module_closure((*stage.code, DVC_FRONT_END[stage.name]))
    deps = [*code, *stage.extra_deps]
    for _, upstream in stage.inputs:
        up = STAGES[upstream]
        deps.append(up.out)
        if not stage.library:  # the orchestration stage reads the upstream summaries too
            deps.append(f"{METRICS}/{up.metrics_file}")
    outs: list = [stage.out] if stage.out else []
    if stage.checkpoints:
        outs.append({stage.checkpoints: {"persist": True}})  # kept, so an interrupted `dvc repro` resumes
    outs += [{c.path(stage.out, METRICS).as_posix(): {"cache": False}}
             for c in stage.curves if c.dvc and c.folder == "metrics"]
    outs += [{f"{METRICS}/{name}": {"cache": False}} for name in stage.extra_metrics]
    entry = {"cmd": f"bin/diffprune {stage.name}", "deps": deps, "params": [stage.params_key, *stage.extra_params]}
    if outs:
        entry["outs"] = outs
    entry["metrics"] = [{f"{METRICS}/{stage.metrics_file}": {"cache": False}}]
    return entry


def _plots() -> list:
    plots: list = []
    for stage in TABLE:
        for c in stage.curves:
            if c.dvc:
                plots.append({c.title: {"template": TEMPLATES[c.kind], "x": c.x,
                                        "y": {c.path(stage.out, METRICS).as_posix(): c.y}}})
        plots += [f"{stage.out}/{image}" for image in stage.images]
    return plots


def render() -> str:
    """The whole ``dvc.yaml``."""
    body = {"stages": {s.name: _stage(s) for s in TABLE}, "plots": _plots()}
    return HEADER + yaml.safe_dump(body, sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    return generator_main("diffprune.repro.dvc_yaml", __doc__, "dvc.yaml", "diffprune/pipeline/table.py", render, argv)


if __name__ == "__main__":
    raise SystemExit(main())
