"""The sweep on an existing dask.distributed cluster given by address (``orchestration.dask_address``): real
``dask scheduler`` and ``dask worker`` processes on loopback, each worker in its own folder and Prefect home.

A dead address is one line, exit 2, in seconds; a live cluster is checked worker by worker before the sweep
(diffprune, prefect-dask, PREFECT_API_URL, the store), and the sweep's tasks run on its workers.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from diffprune.pipeline.config import load_params
from tiny import flow_params

# 2 criteria × 2 seeds × 1 target: 4 branches, paired by seed.
SWEEP = {"criteria": ["magnitude", "random"], "seeds": [0, 1], "target_macs": [0.7]}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


def _params_file(folder: Path, address: str) -> str:
    params = flow_params(folder, register={"enabled": False}, tracking={"enabled": False},
                         orchestration={"dask_address": address}, sweep=SWEEP)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    return str(folder / "params.yaml")


def test_an_address_implies_the_dask_runner_and_needs_a_shared_prefect_api(tmp_path, monkeypatch):
    from diffprune.flows.preflight import ClusterNotReady
    from diffprune.flows.sweep import task_runner

    params = load_params(_params_file(tmp_path, "tcp://127.0.0.1:8786"))
    assert params.orchestration.task_runner == "dask", "params.yaml says task_runner: local; the address wins"
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_PROFILE", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "no-profile"))
    with pytest.raises(ClusterNotReady) as refused:
        task_runner(params)  # what sweep() calls before starting the flow (and a temporary server)
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and "tcp://127.0.0.1:8786" in message
    assert "PREFECT_API_URL" in message and "every `dask worker`" in message and refused.value.exit_code == 2


def test_a_dead_address_is_one_line_exit_2_within_seconds(tmp_path):
    from diffprune.flows import preflight

    address = f"tcp://127.0.0.1:{_closed_port()}"
    params_file = _params_file(tmp_path, "tcp://127.0.0.1:8786")
    start = time.monotonic()
    with pytest.raises(preflight.ServiceUnreachable, match="is unreachable"):
        preflight.dask_cluster(load_params(params_file, [f"orchestration.dask_address={address}"]))
    assert time.monotonic() - start < 5

    # The command users run, in its own process: the whole of it (start-up included) within seconds.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = Path(sys.executable).with_name("diffprune")
    start = time.monotonic()
    proc = subprocess.run([str(command), "sweep", "--params", params_file, "--set",
                           f"orchestration.dask_address={address}"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    elapsed = time.monotonic() - start
    err = proc.stderr.strip()
    assert proc.returncode == 2, err[-3000:]
    assert len(err.splitlines()) == 1, err[-3000:]
    assert err.startswith(f"diffprune sweep: error: Dask scheduler {address} (from params.yaml "
                          "orchestration.dask_address) is unreachable: "), err
    assert elapsed < 10, f"{elapsed:.1f} s"


@pytest.fixture(scope="module")
def cluster(prefect_api, tmp_path_factory):
    """A scheduler and two workers (w0, w1) that report to the session's Prefect server."""
    from dask_servers import dask_cluster

    with dask_cluster(tmp_path_factory.mktemp("dask"), prefect_api) as running:
        yield running


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.mark.slow
@pytest.mark.integration
def test_the_sweep_runs_on_both_workers_of_an_existing_cluster_then_is_all_cache_hits(cluster, project):
    from distributed import Client, get_task_stream

    from diffprune.flows import preflight
    from diffprune.flows.sweep import sweep

    params_file = _params_file(project, cluster.address)
    preflight.dask_cluster(load_params(params_file))  # what `diffprune sweep` checks first: all ready
    assert not list(project.glob("artifacts/store/.dask-preflight-*")), "the store probe is removed"

    with Client(cluster.address, timeout=10, set_as_default=False) as client:
        workers = {info["name"]: address for address, info in client.scheduler_info(n_workers=-1)["workers"].items()}
        with get_task_stream(client=client) as stream:
            first = sweep(params_file)
    ran = Counter(task["worker"] for task in stream.data)  # the scheduler's record of where each task ran
    assert set(workers) == {"w0", "w1"} and set(ran) == set(workers.values()), (ran, cluster.logs())
    assert all(n >= 1 for n in ran.values())

    rows = first["rows"]
    assert len(rows) == 4 and not [r for r in rows if "error" in r], rows
    assert {(r["criterion"], r["seed"]) for r in rows} == {(c, s) for c in SWEEP["criteria"] for s in SWEEP["seeds"]}
    assert all(r["fid"] is not None for r in rows)
    table = Path(first["table_file"]).read_text()
    assert "| teacher |" in table and "## Paired by seed" in table

    second = sweep(params_file)
    assert second["cache_hits"] and all(second["cache_hits"].values()), second["cache_hits"]
    assert [r["fid"] for r in second["rows"]] == [r["fid"] for r in rows]


@pytest.mark.slow
@pytest.mark.integration
def test_a_worker_without_prefect_api_url_is_named_by_the_preflight(cluster, project):
    from dask_servers import start_worker, stop_worker, wait_for_workers

    from diffprune.flows import preflight

    params = load_params(_params_file(project, cluster.address))
    stray = start_worker(cluster, "no-api", api_url=None)  # as on a host where nobody exported it
    try:
        wait_for_workers(cluster.address, 3)
        with pytest.raises(preflight.ClusterNotReady) as refused:
            preflight.dask_cluster(params)
    finally:
        stop_worker(cluster, stray)
        wait_for_workers(cluster.address, 2)
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and refused.value.exit_code == 2
    assert f"Dask cluster {cluster.address} (from params.yaml orchestration.dask_address): 1 of 3 workers" in message
    assert "(no-api): PREFECT_API_URL is unset, not this run's " in message and "(w0)" not in message, message
