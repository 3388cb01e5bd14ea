"""Services that are down: one line naming the service, its address and where it came from; exit 2; seconds."""

import socket
import time

import pytest
import yaml

from diffprune.flows.cli import main
from tiny import flow_params


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


@pytest.fixture
def params_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(flow_params(tmp_path)))
    return str(tmp_path / "params.yaml")


def _one_line(capsys, command: str, argv: list[str]) -> str:
    start = time.monotonic()
    assert main([command, *argv]) == 2
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"diffprune {command}: error:"), err
    return err


@pytest.mark.parametrize("command", ["run", "sweep", "register"])
def test_a_dead_tracking_server_from_the_environment(params_file, capsys, monkeypatch, command):
    url = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    err = _one_line(capsys, command, ["--params", params_file])
    assert f"MLflow tracking server {url} (from MLFLOW_TRACKING_URI) is unreachable" in err
    assert "unset MLFLOW_TRACKING_URI" in err


def test_a_dead_tracking_server_from_params(params_file, capsys):
    url = f"http://127.0.0.1:{_closed_port()}"
    err = _one_line(capsys, "run", ["--params", params_file, "--set", f"tracking.uri={url}"])
    assert "(from params.yaml tracking.uri)" in err and "tracking.enabled=false" in err


def test_tracking_off_skips_the_check(params_file, monkeypatch):
    from diffprune.flows import preflight
    from diffprune.pipeline.config import load_params

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_closed_port()}")
    preflight.tracking(load_params(params_file, ["tracking.enabled=false"]))


def test_a_dead_prefect_api(params_file, capsys, monkeypatch):
    url = f"http://127.0.0.1:{_closed_port()}/api"
    monkeypatch.setenv("PREFECT_API_URL", url)
    err = _one_line(capsys, "run", ["--params", params_file])
    assert f"Prefect API {url} (from PREFECT_API_URL) is unreachable" in err and "prefect server start" in err


def test_a_prefect_profile_names_its_file(params_file, capsys, monkeypatch, tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/api"
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_PROFILE", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    (tmp_path / "prefect-home").mkdir()
    (tmp_path / "prefect-home/profiles.toml").write_text(
        f'active = "remote"\n[profiles.remote]\nPREFECT_API_URL = "{url}"\n')
    err = _one_line(capsys, "run", ["--params", params_file])
    assert "Prefect profile 'remote'" in err and "profiles.toml" in err
