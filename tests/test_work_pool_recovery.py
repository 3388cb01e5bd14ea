"""A worker that dies mid-branch, for real (a module of its own: it kills one of its two workers, and runs beside
tests/test_work_pool.py on the other test worker). The cluster is the same as there: `prefect server start`, a
process pool, two workers in their own folders, one S3 store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import test_work_pool
import yaml
from test_work_pool import _diffprune, _logs

cluster = test_work_pool.cluster  # the same module-scoped fixture: a cluster of this module's own


def _kill_host_when_checkpointed(c, s3, prefix: str, hosts: list[Path], sweep: subprocess.Popen) -> Path:
    """Once a fine-tuning checkpoint is complete in the store, SIGKILL every process of the host running the
    branch (its worker, the flow run, the stage): the host is gone. Returns that host's folder."""
    import os
    import signal
    import time

    import s3fs
    from pool_servers import marked

    fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint, key=s3.key, secret=s3.secret, skip_instance_cache=True,
                           use_listings_cache=False)
    deadline = time.monotonic() + 300
    while not fs.glob(f"{s3.bucket}/{prefix}/_checkpoints/finetune/*/step-*/complete.json"):
        assert sweep.poll() is None and time.monotonic() < deadline, sweep.stdout.read()[-3000:] + _logs(c)
        time.sleep(0.2)
    on = {pid: Path(os.readlink(f"/proc/{pid}/cwd")) for pid in marked(c.marker)}
    busy = [h for h in hosts if any(cwd == h and "worker" not in Path(f"/proc/{pid}/cmdline").read_text()
                                    for pid, cwd in on.items())]
    assert len(busy) == 1, (busy, on)
    for pid, cwd in on.items():
        if cwd == busy[0]:
            os.kill(pid, signal.SIGKILL)
    return busy[0]


@pytest.mark.slow
@pytest.mark.integration
def test_a_branch_whose_worker_dies_completes_on_the_other_worker_from_the_shared_checkpoint(cluster, tmp_path):
    """The parent finds the branch's run silent (no heartbeat for 3 × 30 s), marks it crashed and starts it
    again; the other worker resumes the fine-tune from the checkpoint in the store, to the weights an
    uninterrupted run gets."""
    from safetensors.torch import load_file

    c, _, submitter, hosts, s3, _ = cluster
    params = yaml.safe_load((submitter / "params.yaml").read_text())
    params["sweep"] = {"criteria": ["magnitude"], "seeds": [0], "target_macs": [0.7]}
    params["finetune"].update(steps=600, checkpoint_every=100)
    params["orchestration"].update(store=f"s3://{s3.bucket}/pool-kill", retries=1)
    (submitter / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**c.env, "PREFECT_HOME": str(submitter / "prefect"), "PYTHONPATH": str(Path(__file__).parent)}
    sweep = subprocess.Popen([sys.executable, "-m", "diffprune.flows", "sweep", "--set",
                              "orchestration.branches=deployment", "--params", str(submitter / "params.yaml")],
                             cwd=submitter, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    dead = _kill_host_when_checkpointed(c, s3, "pool-kill", hosts, sweep)
    out, _ = sweep.communicate(timeout=600)
    assert sweep.returncode == 0, out[-4000:] + _logs(c)
    assert "starting it again" in out, out[-3000:]
    [alive] = [h for h in hosts if h != dead]
    [manifest] = (alive / "artifacts/store-cache/finetune").glob("*/manifest.json")
    assert json.loads(manifest.read_text())["summary"]["resumed_from"] > 0
    resumed = load_file(manifest.parent / "output/unet/diffusion_pytorch_model.safetensors")

    # the same sweep on one host, uninterrupted, on a path store
    local = tmp_path / "local"
    local.mkdir()
    params["orchestration"].update(store=str(local / "store"))
    params["tracking"].update(enabled=False)
    (local / "params.yaml").write_text(yaml.safe_dump(params))
    _diffprune(c, local, "sweep")
    [weights] = (local / "store/finetune").glob("*/output/unet/diffusion_pytorch_model.safetensors")
    for name, tensor in load_file(weights).items():
        assert tensor.equal(resumed[name]), name
