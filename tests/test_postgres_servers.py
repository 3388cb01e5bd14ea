"""Servers a team shares, on PostgreSQL (real servers on loopback, no mocks): an MLflow tracking server whose runs and
model registry live in PostgreSQL, and a Prefect server whose flow runs do; the tiny pipeline run against both, its
rows read back from PostgreSQL itself. SQLite stays the local default; this is the integration setup a team runs."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from pg_servers import mlflow_on_postgres, pg_bindir, postgres, prefect_on_postgres
from servers import group_alive

from diffprune.pipeline.table import NAMES
from tiny import flow_params

pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.skipif(pg_bindir() is None, reason="PostgreSQL's initdb/pg_ctl not found: install Debian's "
                                                    "postgresql (.ci/run does)"),
]
MODEL = "diffprune-digits"  # register.model_name's default, which flow_params keeps


@pytest.fixture(scope="module")
def cluster():
    with postgres(("mlflow", "prefect")) as running:
        yield running
    with socket.socket() as s:  # the cluster is gone: nothing answers on its port any more
        assert s.connect_ex((running.host, running.port)) != 0, "PostgreSQL still listening after the tests"


@pytest.fixture(scope="module")
def mlflow_server(cluster, tmp_path_factory):
    with mlflow_on_postgres(cluster, tmp_path_factory.mktemp("mlflow-pg")) as running:
        yield running
    assert not group_alive(running.pgid), "the MLflow server left processes behind"


@pytest.fixture(scope="module")
def prefect_server(cluster, tmp_path_factory):
    with prefect_on_postgres(cluster, tmp_path_factory.mktemp("prefect-pg")) as running:
        yield running
    assert not group_alive(running.pgid), "the Prefect server left processes behind"


def test_mlflow_server_keeps_runs_and_the_registry_in_postgres(mlflow_server, cluster, tmp_path):
    # An explicit client, not mlflow's process-wide URI: nothing leaks into the other tests of this worker.
    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    experiment = client.create_experiment("pg-client")
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "fid", 12.5, step=3)
    client.log_text(run.info.run_id, "hello from postgres", "notes/hello.txt")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("pg-model")
    version = client.create_model_version("pg-model", f"{run.info.artifact_uri}/notes", run_id=run.info.run_id)
    client.set_registered_model_alias("pg-model", "champion", version.version)

    # Read back through the server...
    again = client.get_run(run.info.run_id)
    assert again.data.metrics == {"fid": 12.5} and again.info.status == "FINISHED"
    copy = Path(client.download_artifacts(run.info.run_id, "notes/hello.txt", str(tmp_path)))
    assert copy.read_text() == "hello from postgres"
    assert client.get_model_version_by_alias("pg-model", "champion").version == version.version
    # ...and from PostgreSQL itself: the rows are there, not in a SQLite file somewhere.
    run_id = run.info.run_id
    assert cluster.sql("mlflow", f"SELECT key, value, step FROM metrics WHERE run_uuid = '{run_id}'") == \
        [["fid", "12.5", "3"]]
    assert cluster.sql("mlflow", "SELECT alias, version FROM registered_model_aliases WHERE name = 'pg-model'") == \
        [["champion", str(version.version)]]
    # The artifact went through the server into its --artifacts-destination (the client wrote no files of its own).
    [stored] = (mlflow_server.log.parent / "artifacts").rglob("hello.txt")
    assert stored.read_text() == "hello from postgres"


def _diffprune_run(home: Path, env: dict) -> str:
    done = subprocess.run([str(Path(sys.executable).with_name("diffprune")), "run", "--params",
                           str(home / "params.yaml")], cwd=home, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:]
    return done.stdout


def test_the_pipeline_runs_against_both_servers_on_postgres(mlflow_server, prefect_server, cluster, tmp_path):
    home = tmp_path / "project"
    home.mkdir()
    (home / "params.yaml").write_text(yaml.safe_dump(flow_params(home)))
    # A client "host": its own PREFECT_HOME; the servers only by URL (MLFLOW_TRACKING_URI beats tracking.uri).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "MLFLOW_"))}
    env.update(PREFECT_API_URL=prefect_server.url, MLFLOW_TRACKING_URI=mlflow_server.url,
               PREFECT_HOME=str(tmp_path / "client-prefect"), MLFLOW_DISABLE_TELEMETRY="true",
               OMP_NUM_THREADS="1")

    first = _diffprune_run(home, env)
    assert f"cache hits: 0/{len(NAMES)}" in first, first[-3000:]
    assert f"registered: models:/{MODEL}/1 aliases candidate, champion" in first, first[-3000:]
    second = _diffprune_run(home, env)
    assert f"cache hits: {len(NAMES)}/{len(NAMES)}" in second, second[-3000:]

    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    [version] = client.search_model_versions(f"name = '{MODEL}'")  # the cached run registered no duplicate
    assert client.get_model_version_by_alias(MODEL, "champion").version == version.version
    # Both servers' rows, read from PostgreSQL: two completed pipeline flow runs, the model and its alias.
    flow_runs = cluster.sql("prefect", "SELECT r.state_type FROM flow_run r JOIN flow f ON f.id = r.flow_id "
                                       "WHERE f.name = 'diffprune-pipeline'")
    assert flow_runs == [["COMPLETED"], ["COMPLETED"]], flow_runs
    assert cluster.sql("mlflow", f"SELECT count(*) FROM model_versions WHERE name = '{MODEL}'") == [["1"]]
    assert ["champion"] in cluster.sql("mlflow", f"SELECT alias FROM registered_model_aliases WHERE name = '{MODEL}'")
    assert not (home / "mlflow.db").exists() and not (home / "mlartifacts").exists(), "all tracking went to the server"
    assert (mlflow_server.log.parent / "artifacts").is_dir()  # the server's proxied artifact destination
