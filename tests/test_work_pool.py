"""Work pools, for real (the slow tests): a `prefect server start` on loopback, a process pool with two
`prefect worker start --limit 1` processes in their own working folders and Prefect homes (two "hosts"), one S3
store (SeaweedFS) and one `mlflow server` (artifacts proxied to S3) shared by all. `diffprune deploy` +
`prefect deployment run` completes the pipeline on a worker; a sweep with `orchestration.branches: deployment`
spreads its branches over both workers, computes every stage once, registers every branch's model, and a second
run of it is all cache hits."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pool_servers import prefect_cluster
from servers import mlflow_server

from diffprune.pipeline.table import LIBRARY
from tiny import flow_params

POOL = "diffprune-test-pool"
DEPLOYMENT = "diffprune-pipeline/tiny-nightly"
STAGES = {s.name for s in LIBRARY}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    tmp = tmp_path_factory.mktemp("pool")
    (tmp / "procs").mkdir()
    with mlflow_server(tmp / "mlflow", s3_server, prefix="pool-mlflow") as tracking, \
            prefect_cluster(tmp / "procs") as c:
        # heartbeats every 30 s (Prefect's minimum): a run whose worker died is found silent after 90 s
        c.env.update({**s3_server.env, "OMP_NUM_THREADS": "1",
                      "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
                      "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"})
        hosts = [tmp / "host1", tmp / "host2"]
        submitter = tmp / "submitter"
        submitter.mkdir()
        params = flow_params(submitter, schedule={"name": "tiny-nightly", "cron": "0 3 * * *",
                                                  "timezone": "Europe/Paris", "work_pool": POOL},
                             sweep={"criteria": ["magnitude", "random"], "seeds": [0, 1], "target_macs": [0.7]})
        # One store for all; each host's store cache is relative: under its own working folder.
        params["orchestration"].update(store=f"s3://{s3_server.bucket}/pool", store_cache="artifacts/store-cache")
        params["tracking"].update(uri=tracking.url)  # artifacts: the server's (proxied to S3)
        (submitter / "params.yaml").write_text(yaml.safe_dump(params))
        deployed = _diffprune(c, submitter, "deploy")  # creates the pool: deploy first, as a team would
        for i, home in enumerate(hosts):
            c.worker(f"w{i + 1}", POOL, home, {})
        for i in range(len(hosts)):
            c.wait_worker(f"w{i + 1}")
        yield c, tracking.url, submitter, hosts, s3_server, deployed


def _diffprune(c, submitter: Path, *args: str, timeout: float = 600) -> str:
    env = {**c.env, "PREFECT_HOME": str(submitter / "prefect"), "PYTHONPATH": str(Path(__file__).parent)}
    done = subprocess.run([sys.executable, "-m", "diffprune.flows", *args, "--params", str(submitter / "params.yaml")],
                          cwd=submitter, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:] + "\n" + _logs(c)
    return done.stdout


def _logs(c) -> str:
    return "\n".join(f"--- {name}\n{c.log(name, 3000)}" for name in c.procs if name.startswith("w"))


@contextlib.contextmanager
def _api(c):
    """A Prefect client of the cluster's server (this process's own settings restored after)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: c.api}), get_client(sync_client=True) as client:
        yield client


def _stage_runs(c) -> dict[str, list[str]]:
    """Every stage task run on the server, by stage: its state names (Completed: computed; Cached: a hit)."""
    out: dict[str, list[str]] = {}
    with _api(c) as client:
        for tr in client.read_task_runs(limit=200):
            stage = tr.name.split("-")[0]  # "<task name>-<3 characters>"
            if stage in STAGES and tr.state is not None:
                out.setdefault(stage, []).append(tr.state.name)
    return out


def _store_keys(s3, stage: str) -> set[str]:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint, key=s3.key, secret=s3.secret, skip_instance_cache=True,
                           use_listings_cache=False)
    return {Path(p).parent.name for p in fs.glob(f"{s3.bucket}/pool/{stage}/*/manifest.json")}


@pytest.mark.slow
@pytest.mark.integration
def test_deploy_and_a_pipeline_run_on_a_worker(cluster):
    c, tracking, submitter, hosts, _, out = cluster
    assert f"created work pool {POOL} (type process)" in out, out
    assert f"prefect worker start --pool {POOL} --limit 1" in out and "CUDA_VISIBLE_DEVICES=1" in out, out
    with _api(c) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        (schedule,) = deployment.schedules
        assert schedule.schedule.cron == "0 3 * * *" and schedule.schedule.timezone == "Europe/Paris"
        assert deployment.work_pool_name == POOL and deployment.entrypoint == "diffprune.flows.pipeline.pipeline"
        assert deployment.parameters["params"]["orchestration"]["store"].startswith("s3://")  # by content
        assert client.read_deployment_by_name(f"diffprune-sweep-branch/{POOL}").work_pool_name == POOL
    run = subprocess.run([str(Path(sys.executable).with_name("prefect")), "deployment", "run", DEPLOYMENT, "--watch",
                          "--watch-timeout", "420"], env={**c.env, "PREFECT_HOME": str(submitter / "prefect")},
                         capture_output=True, text=True, timeout=480)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:] + "\n" + _logs(c)
    ran = [h for h in hosts if (h / "artifacts/reports/latest.md").exists()]
    assert len(ran) == 1, "the run's report sits in the working folder of the worker that ran it"
    from mlflow import MlflowClient

    versions = MlflowClient(tracking).search_model_versions()
    assert versions, "the run registered its model"


@pytest.mark.slow
@pytest.mark.integration
def test_a_sweep_through_the_pool_spreads_branches_and_computes_each_stage_once(cluster):
    c, tracking, submitter, _, s3, _ = cluster
    _diffprune(c, submitter, "deploy")  # again: updates both deployments in place (and runs alone with -k)
    out = _diffprune(c, submitter, "sweep", "--set", "orchestration.branches=deployment")
    assert "comparison written to" in out
    [rows_file] = (submitter / "artifacts/reports").glob("sweep-*.json")
    rows = json.loads(rows_file.read_text())
    assert len(rows) == 4 and all("error" not in r and r["fid"] is not None for r in rows), rows
    assert "## Paired by seed" in rows_file.with_suffix(".md").read_text()
    for name in ("w1", "w2"):  # both workers ran branches
        assert "for flow 'diffprune-sweep-branch'" in c.log(name, 10**7), f"{name} ran no branch"
    runs = _stage_runs(c)
    for stage in STAGES:  # each entry of the store computed by exactly one task run, on whichever host
        assert runs[stage].count("Completed") == len(_store_keys(s3, stage)), (stage, runs[stage])
    assert len(_store_keys(s3, "score")) >= 4  # 2 criteria × 2 seeds (and the pipeline's, if it ran)
    registered = _branch_versions(tracking)
    assert set(registered) == {r["label"] for r in rows}, registered  # one version per branch, by the parent
    assert all(r["registered"] == f"models:/{r['registered'].split('/')[1]}/{registered[r['label']]}" for r in rows)

    _diffprune(c, submitter, "sweep", "--set", "orchestration.branches=deployment")
    again = _stage_runs(c)
    assert {s: r.count("Completed") for s, r in again.items()} == {s: r.count("Completed") for s, r in runs.items()}
    hits = sum(r.count("Cached") for r in again.values()) - sum(r.count("Cached") for r in runs.values())
    assert hits == 2 + 4 * 4, hits  # all cache hits: prepare and teacher in the parent, 4 stages in 4 branches
    assert _branch_versions(tracking) == registered, "registration was a cache hit: no second version"


def _branch_versions(tracking: str) -> dict[str, str]:
    """The registry's versions that a sweep registered: version number by branch label (its version tag)."""
    from mlflow import MlflowClient

    found = {}
    for v in MlflowClient(tracking).search_model_versions():
        if "branch" in v.tags:
            assert v.tags["branch"] not in found, f"{v.tags['branch']} registered twice"
            found[v.tags["branch"]] = str(v.version)
    return found


def test_branches_on_a_pool_need_a_shared_store(tmp_path, capsys, monkeypatch):
    from diffprune.flows.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(flow_params(tmp_path)))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    code = main(["sweep", "--set", "orchestration.branches=deployment", "--set", "tracking.enabled=false"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "needs a store every worker reaches" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "artifacts").exists(), "refused before any stage"


def test_branches_that_share_a_stage_go_to_one_flow_run():
    """A criterion is scored once per seed for every MACs target: those branches are one group (one worker),
    else two workers would compute the same score at once."""
    from diffprune.flows.branches import groups
    from diffprune.flows.sweep import branches
    from diffprune.pipeline.config import Params

    params = Params(sweep={"criteria": ["magnitude", "random"], "target_macs": [0.7, 0.5], "seeds": [0, 1]})
    shared = {s: {"stage": s, "key": f"{s}-key"} for s in ("prepare", "teacher")}
    found = groups(params, branches(params), shared)
    assert len(found) == 4 and all(len(g) == 2 for g in found)  # criteria × seeds, each with both targets
    for group in found:
        assert len({(b["criterion"], b["seed"]) for b in group}) == 1
        assert {b["target_macs"] for b in group} == {0.7, 0.5}
