"""The scheduled deployment: `diffprune serve` against a local Prefect server; one run of it completes."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tiny import flow_params

NAME = "diffprune-pipeline/tiny-nightly"


def test_serve_refuses_without_a_server(tmp_path, monkeypatch):
    from diffprune.flows.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(flow_params(tmp_path)))
    assert main(["serve", "--once"]) == 2


@pytest.mark.slow
def test_the_scheduled_deployment_is_served_and_a_run_of_it_completes(tmp_path, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    params = flow_params(tmp_path, register={"enabled": False},
                         schedule={"name": "tiny-nightly", "cron": "0 3 * * *", "timezone": "Europe/Paris"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_RUNNER_POLL_FREQUENCY": "1", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    server = subprocess.Popen([sys.executable, "-m", "diffprune.flows", "serve"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deployment = None
        with get_client(sync_client=True) as client:
            for _ in range(120):
                try:
                    deployment = client.read_deployment_by_name(NAME)
                    break
                except Exception:
                    assert server.poll() is None, server.stdout.read()[-3000:]
                    time.sleep(1)
            assert deployment is not None, "the deployment never appeared"
            (schedule,) = deployment.schedules
            assert schedule.schedule.cron == "0 3 * * *" and schedule.schedule.timezone == "Europe/Paris"
            assert deployment.parameters["params_file"] == str(tmp_path / "params.yaml")
        run = run_deployment(NAME, timeout=400)
        assert run.state.is_completed(), run.state
        assert list((tmp_path / "artifacts/store/evaluate").glob("[0-9a-f]*"))
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
