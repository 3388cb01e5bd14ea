"""The Prefect flows end to end on tiny models: caching across runs, partial re-runs, damaged outputs,
MLflow runs and the registry, concurrent runs, and the sweep on a local Dask cluster."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from diffprune.pipeline.table import NAMES
from tiny import flow_params

STAGES = list(NAMES)


@pytest.fixture
def project(tmp_path, monkeypatch, prefect_api):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield tmp_path
    mlflow.set_tracking_uri(None)


def _write(project: Path, **groups) -> str:
    (project / "params.yaml").write_text(yaml.safe_dump(flow_params(project, **groups)))
    return str(project / "params.yaml")


def _run(params_file: str, overrides=()) -> dict:
    from diffprune.flows.pipeline import pipeline

    return pipeline(params_file=params_file, overrides=list(overrides))


def test_pipeline_runs_end_to_end_then_every_stage_is_a_cache_hit(project):
    params_file = _write(project)
    first = _run(params_file)
    assert first["cache_hits"] == dict.fromkeys(STAGES, False)
    assert Path(first["report"]).is_file() and "| pruned |" in Path(first["report"]).read_text()
    assert first["registered"]["version"] == "1" and {"candidate", "champion"} <= set(first["registered"]["aliases"])

    second = _run(params_file)
    assert second["cache_hits"] == dict.fromkeys(STAGES, True)
    assert second["keys"] == first["keys"] and second["summary"] == first["summary"]

    client = MlflowClient(first["tracking_uri"])
    versions = client.search_model_versions("name='diffprune-digits'")
    assert len(versions) == 1, "a fully cached run must not register a duplicate version"
    parent = client.get_run(second["mlflow_run_id"])
    assert parent.data.tags["diffprune.cache_hits"] == "7/7"
    assert parent.data.tags["prefect.flow_run_id"]
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.data.tags["diffprune.stage"] for c in children} == set(STAGES)
    hits = {c.data.tags["diffprune.stage"]: c for c in children}
    computed = {c.data.tags["diffprune.stage"]: c for c in client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{first['mlflow_run_id']}'")}
    for stage, run in hits.items():  # a hit records params and results, and links the run that computed it
        assert run.data.tags["diffprune.cache"] == "hit"
        if stage != "register":
            assert run.data.tags["diffprune.computed_in_run"] == computed[stage].info.run_id, stage
            assert run.data.params == computed[stage].data.params, stage
    assert not client.list_artifacts(hits["finetune"].info.run_id), "a hit does not upload its files again"
    assert {"pruned.fid", "pruned.ssim", "macs_ratio", "speedup"} <= set(hits["evaluate"].data.metrics)
    finetune, evaluate, score = computed["finetune"], computed["evaluate"], computed["score"]
    assert len(client.get_metric_history(finetune.info.run_id, "loss")) == 4  # per-step training loss
    assert "samples/grid_pairs.png" in {a.path for a in client.list_artifacts(evaluate.info.run_id, "samples")}
    assert {"plots/importance.png", "plots/loss_over_t.png"} <= {
        a.path for a in client.list_artifacts(score.info.run_id, "plots")}
    assert "report.md" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    _assert_lineage(client, first, second, computed)


def _assert_lineage(client: MlflowClient, first: dict, second: dict, computed: dict) -> None:
    """What MLflow's runs table and model pages show: Dataset and Models columns, source run, description."""
    experiment = client.get_experiment(client.get_run(first["mlflow_run_id"]).info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    manifest = Path(_store(first)) / "prepare" / first["keys"]["prepare"] / "output" / "manifest.json"
    for run_id in (first["mlflow_run_id"], second["mlflow_run_id"]):
        run = client.get_run(run_id)
        (data,) = run.inputs.dataset_inputs
        assert data.dataset.name == "digits-8px" and data.dataset.digest == _sha(manifest)[:16]
        assert {t.key: t.value for t in data.tags}["mlflow.data.context"] == "training"
        assert json.loads(data.dataset.profile)["n_train"] > 0 and "mlflow_tensorspec" in data.dataset.schema
        assert first["registered"]["model_id"] in {o.model_id for o in run.outputs.model_outputs}, run_id
        assert run.data.tags["mlflow.source.name"].startswith("prefect flow")
    used = {t.value for t in computed["finetune"].inputs.dataset_inputs[0].tags}
    assert used == {"finetune"} and not computed["prune"].inputs.dataset_inputs  # prune reads no data
    model = client.get_logged_model(first["registered"]["model_id"])
    assert model.source_run_id == first["mlflow_run_id"] and {m.key for m in model.metrics} >= {"fid", "macs_ratio"}
    version = client.get_model_version("diffprune-digits", "1")
    assert version.run_id == first["mlflow_run_id"] and version.source == f"models:/{model.model_id}"
    assert "| pruned |" in version.description and "samples/grid_pairs.png" in version.description
    artifacts = {a.path for a in client.list_artifacts(first["mlflow_run_id"], "samples")}
    assert artifacts == {"samples/grid_pairs.png"}


def _store(result: dict) -> str:
    return str(Path(result["report"]).parents[1] / "store")


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_changing_one_stage_reruns_it_and_downstream_only(project):
    params_file = _write(project)
    _run(params_file)
    changed = _run(params_file, ["finetune.steps=5"])
    assert changed["cache_hits"] == {"prepare": True, "teacher": True, "score": True, "prune": True,
                                     "finetune": False, "evaluate": False, "register": False}
    assert changed["summary"]["finetune_steps"] == 5


def test_a_cache_hit_with_damaged_or_missing_outputs_is_recomputed(project):
    params_file = _write(project, register={"enabled": False})
    first = _run(params_file)
    pruned = project / "artifacts/store/prune" / first["keys"]["prune"]
    weights = next(pruned.rglob("*.safetensors"))
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated
    teacher_dir = project / "artifacts/store/teacher" / first["keys"]["teacher"]
    (teacher_dir / "metrics" / "teacher.json").unlink()

    again = _run(params_file)
    assert again["cache_hits"]["teacher"] is False and again["cache_hits"]["prune"] is False
    assert again["keys"] == first["keys"], "recomputed outputs are identical, so downstream keys do not move"
    assert again["cache_hits"]["finetune"] is True
    assert weights.stat().st_size == size


def test_concurrent_runs_keep_their_own_results(project):
    """Two runs with different params and two with the same params, at once, each in its own process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    files = []
    for name, seed in (("a", 0), ("b", 1), ("c", 0)):
        params = flow_params(project, finetune={"seed": seed}, register={"enabled": False})
        (project / f"{name}.yaml").write_text(yaml.safe_dump(params))
        files.append(project / f"{name}.yaml")
    procs = [subprocess.Popen([sys.executable, "-m", "diffprune.flows", "run", "--params", str(f)], cwd=project,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for f in files]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    finetuned = sorted((project / "artifacts/store/finetune").glob("[0-9a-f]*"))
    assert len(finetuned) == 2, "seed 0 twice shares one entry; seed 1 has its own"
    from diffprune.tasks.store import lookup

    for entry in finetuned:
        assert lookup(project / "artifacts/store", "finetune", entry.name) is not None
    reports = [next(line for line in o.splitlines() if line.startswith("report: ")) for o in outs]
    assert len(set(reports)) == 3


@pytest.mark.slow
def test_sweep_fans_out_on_a_local_dask_cluster_and_shares_scores(project):
    from diffprune.flows.sweep import sweep

    params_file = _write(project, orchestration={"task_runner": "dask", "max_workers": 2},
                         sweep={"criteria": ["diff-pruning", "magnitude"], "target_macs": [0.7, 0.5], "seeds": [0]})
    result = sweep(params_file)
    assert len(result["rows"]) == 4 and all("error" not in r for r in result["rows"])
    # Every branch registered, worst FID ratio first: the champion ends on the best branch the gate passes.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    name = result["rows"][0]["registered"].split("/")[1]
    versions = {v.tags["branch"]: v for v in client.search_model_versions(f"name = '{name}'")}
    assert set(versions) == {r["label"] for r in result["rows"]}
    best = min(result["rows"], key=lambda r: r["fid_ratio"])
    assert client.get_model_version_by_alias(name, "champion").version == versions[best["label"]].version
    for label, version in versions.items():  # each branch's own sample grid, none overwritten by another's
        assert f"samples/{label}/grid_pairs.png" in version.description
    logged = {a.path for a in client.list_artifacts(versions[best["label"]].run_id, "samples")}
    assert logged == {f"samples/{label}" for label in versions}
    assert "## Registered" in result["table"]
    assert {r["criterion"] for r in result["rows"]} == {"diff-pruning", "magnitude"}
    assert all(r["macs_ratio"] <= r["target_macs"] + 1e-9 for r in result["rows"])
    assert len(list((project / "artifacts/store/score").glob("[0-9a-f]*"))) == 2, "one score per criterion"
    table = Path(result["table_file"]).read_text()
    assert "| teacher |" in table and "magnitude" in table
    rows = json.loads(Path(result["table_file"]).with_suffix(".json").read_text())
    assert len(rows) == 4


def test_sweep_branches_pair_by_seed_and_vary_the_score_only_where_it_has_a_gradient_pass():
    from diffprune.flows.sweep import branch_changes, branches
    from diffprune.pipeline.config import Params

    params = Params(sweep={"criteria": ["diff-pruning", "taylor", "magnitude"], "thresholds": [0.05],
                           "seeds": [0, 1], "variants": ["diffusers", "paper"], "score_batches": [1, 4]})
    found = branches(params)
    assert len(found) == 2 * (4 + 4 + 1) and len({b["label"] for b in found}) == len(found)
    assert {b["method"] for b in found if b["criterion"] == "diff-pruning"} == {
        "diff-pruning-thr0.05", "diff-pruning-paper-thr0.05", "diff-pruning-thr0.05-x4",
        "diff-pruning-paper-thr0.05-x4"}
    assert {b["method"] for b in found if b["criterion"] == "magnitude"} == {"magnitude"}
    for b in found:  # one seed: the same scoring batch and noise, pruning and fine-tuning seed for every method
        changes = branch_changes(b)
        assert changes["score"]["seed"] == changes["prune"]["seed"] == changes["finetune"]["seed"] == b["seed"]


def test_a_tracking_outage_after_finetune_keeps_the_stages_and_the_next_run_records_them(project, monkeypatch):
    from diffprune.flows.context import TrackingLost
    from diffprune.tracking.runs import Tracker

    params_file = _write(project)
    log_stage = Tracker.log_stage

    def dies_after_finetune(self, stage, *args, **kwargs):
        if stage in ("evaluate", "register"):
            raise ConnectionError("HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded")
        return log_stage(self, stage, *args, **kwargs)

    monkeypatch.setattr(Tracker, "log_stage", dies_after_finetune)
    with pytest.raises(TrackingLost) as lost:
        _run(params_file)
    message = str(lost.value)
    assert "MLflow tracking failed during the run (evaluate: ConnectionError" in message
    assert "every stage will be a cache hit" in message and lost.value.exit_code == 4
    store = project / "artifacts" / "store"
    assert all(list((store / stage).glob("*/manifest.json")) for stage in STAGES if stage != "register")

    monkeypatch.setattr(Tracker, "log_stage", log_stage)  # the server is back
    again = _run(params_file)
    assert again["cache_hits"] == {**dict.fromkeys(STAGES, True), "register": False}
    assert again["registered"]["version"] == "1"


def test_a_full_disk_in_a_stage_of_the_flow_is_one_line_exit_3(project, monkeypatch, capfd):
    import errno

    import diffprune.pipeline.stages
    from diffprune.common.atomic import atomic_dir
    from diffprune.flows.cli import main

    params_file = _write(project)

    def disk_full(params, out, **kwargs):
        with atomic_dir(out) as tmp:
            (tmp / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "diffusion_pytorch_model.safetensors"))

    monkeypatch.setattr(diffprune.pipeline.stages, "prune", disk_full)
    assert main(["run", "--params", params_file]) == 3
    err = capfd.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("diffprune run: error: diffprune prune: cannot write ")
    assert "No space left on device (ENOSPC); free disk space" in err
    store = project / "artifacts" / "store"
    assert list((store / "score").glob("*/manifest.json")) and not list((store / "prune").glob("*/manifest.json"))
    assert not [p for p in (store / "prune").iterdir() if ".tmp-" in p.name]
