"""Two "hosts" (working folders with their own store caches and Prefect homes) sharing one S3 store on a real
SeaweedFS server: the second host's run is all cache hits served from S3, its registered model loads with
artifacts from S3, and a fine-tune killed on one host resumes on the other to the same weights."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from diffprune.pipeline.table import NAMES
from tiny import flow_params

pytestmark = [pytest.mark.slow, pytest.mark.integration]
# long enough to be cut off between checkpoints; the same on both hosts, so their keys are the same
FINETUNE = {"steps": 400, "checkpoint_every": 40}


def _host(tmp: Path, name: str, s3, prefix: str, db: Path) -> tuple[Path, dict]:
    """A working folder whose params point at the shared store and tracking database, and its environment."""
    home = tmp / name
    home.mkdir()
    params = flow_params(home, finetune=FINETUNE)
    params["orchestration"].update(store=f"s3://{s3.bucket}/{prefix}", store_cache=str(home / "cache"))
    params["tracking"].update(uri=f"sqlite:///{db}", artifact_root=f"s3://{s3.bucket}/{prefix}-mlflow")
    (home / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, **s3.env, "MLFLOW_S3_ENDPOINT_URL": s3.endpoint, "PREFECT_HOME": str(home / "prefect"),
           "PYTHONPATH": str(Path(__file__).parent)}
    return home, env


def _diffprune(home: Path, env: dict, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "diffprune.flows", *args, "--params", str(home / "params.yaml")],
                            cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _finished(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def _finetuned(home: Path) -> dict:
    [weights] = (home / "cache" / "finetune").glob("*/output/unet/diffusion_pytorch_model.safetensors")
    return load_file(weights)


@pytest.fixture(scope="module")
def shared(tmp_path_factory, s3_server, prefect_api):
    tmp = tmp_path_factory.mktemp("hosts")
    db = tmp / "mlflow.db"
    first, env1 = _host(tmp, "first", s3_server, "store", db)
    out = _finished(_diffprune(first, env1, "run"))
    assert "cache hits: 0/7" in out
    return tmp, db, first, s3_server


def test_a_second_host_is_served_from_the_shared_store(shared):
    tmp, db, first, s3 = shared
    second, env2 = _host(tmp, "second", s3, "store", db)
    out = _finished(_diffprune(second, env2, "run"))
    assert f"cache hits: {len(NAMES)}/{len(NAMES)}" in out, out[-3000:]
    for a, b in zip(_finetuned(first).values(), _finetuned(second).values(), strict=True):
        assert a.equal(b)  # downloaded from S3 into the second host's empty cache
    code = ("import mlflow, numpy as np; m = mlflow.pyfunc.load_model('models:/diffprune-digits@champion'); "
            "out = m.predict({'num_images': [2], 'seed': [0]}); print('loaded', np.asarray(out).shape)")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=second, capture_output=True, text=True, timeout=300,
                            env={**env2, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"})
    assert loaded.returncode == 0 and "loaded" in loaded.stdout, loaded.stderr[-2000:]
    assert not (first / "mlartifacts").exists() and not (second / "mlartifacts").exists(), "artifacts in S3 only"


def _kill_when_checkpointed(proc: subprocess.Popen, s3, prefix: str, timeout: float = 600) -> None:
    """SIGKILL the run (its whole process group) once a fine-tuning checkpoint is complete in the store."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint, key=s3.env["AWS_ACCESS_KEY_ID"],
                           secret=s3.env["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True, use_listings_cache=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fs.glob(f"{s3.bucket}/{prefix}/_checkpoints/finetune/*/step-*/complete.json"):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    raise AssertionError("no checkpoint reached the store")


def test_a_fine_tune_killed_on_one_host_resumes_on_another_to_the_same_weights(shared):
    tmp, db, first, s3 = shared
    killed, env1 = _host(tmp, "killed", s3, "resume", db)
    _kill_when_checkpointed(_diffprune(killed, env1, "run", start_new_session=True), s3, "resume")
    assert not list((killed / "cache").glob("finetune/*/manifest.json")), "killed before finishing"
    other, env2 = _host(tmp, "other", s3, "resume", db)
    out = _finished(_diffprune(other, env2, "run"))
    assert "resuming from the shared checkpoint" in out, out[-3000:]
    [manifest] = (other / "cache" / "finetune").glob("*/manifest.json")
    assert json.loads(manifest.read_text())["summary"]["resumed_from"] > 0
    uninterrupted = _finetuned(first)
    for name, tensor in _finetuned(other).items():
        assert tensor.equal(uninterrupted[name]), name
