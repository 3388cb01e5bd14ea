"""`diffprune deploy` against the session's Prefect server, without workers: what the deployments carry on a
process pool (the worker's folder as working directory) and on a docker-type pool (the params' job variables:
image, env), by content and from the installed package. Runs on a worker: tests/test_work_pool.py."""

from __future__ import annotations

import pytest
import yaml

from tiny import flow_params


def _deployments(pool: str) -> dict[str, object]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {name: client.read_deployment_by_name(name)
                for name in ("diffprune-pipeline/deploy-test", f"diffprune-sweep-branch/{pool}")}


def _create_docker_pool(name: str) -> None:
    """A docker-type pool as `prefect work-pool create --type docker` makes one (prefect-docker's template is not
    installed here: a minimal template with the variables a deployment may set)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    template = {"job_configuration": {"image": "{{ image }}", "env": "{{ env }}"},
                "variables": {"type": "object", "properties": {"image": {"type": "string"},
                                                               "env": {"type": "object"}}}}
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=name, type="docker", base_job_template=template))


@pytest.mark.parametrize("pool_type", ["process", "docker"])
def test_deploy_puts_both_deployments_on_the_pool_with_their_job_variables(tmp_path, prefect_api, capsys,
                                                                            pool_type):
    from diffprune.flows.deploy import deploy

    pool = f"deploy-test-{pool_type}"
    image = {"image": "registry.example.org/diffprune:1.0", "env": {"NVIDIA_VISIBLE_DEVICES": "all"}}
    if pool_type == "docker":
        _create_docker_pool(pool)
    params = flow_params(tmp_path, schedule={"name": "deploy-test", "work_pool": pool, "cron": "30 2 * * *",
                                             "job_variables": image if pool_type == "docker" else {}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    deploy(str(tmp_path / "params.yaml"))
    out = capsys.readouterr().out
    assert (f"created work pool {pool} (type process)" in out) == (pool_type == "process"), out
    expected = {"working_dir": "."} if pool_type == "process" else image
    found = _deployments(pool)
    for name, d in found.items():
        assert d.work_pool_name == pool and d.job_variables == expected, (name, d.job_variables)
    pipeline = found["diffprune-pipeline/deploy-test"]
    assert pipeline.parameters["params"]["schedule"]["work_pool"] == pool  # the params by content
    assert pipeline.entrypoint == "diffprune.flows.pipeline.pipeline"  # the installed package
    assert [s.schedule.cron for s in pipeline.schedules] == ["30 2 * * *"]


def test_a_bad_job_variables_value_names_its_key(tmp_path):
    from diffprune.common.errors import DiffpruneError
    from diffprune.pipeline.config import load_params

    params = flow_params(tmp_path, schedule={"job_variables": ["image"]})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(DiffpruneError, match=r"schedule\.job_variables"):
        load_params(str(tmp_path / "params.yaml"))
