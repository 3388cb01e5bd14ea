import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffprune.checkpoint import list_checkpoints
from diffprune.errors import DiffpruneError
from diffprune.models import make_scheduler
from diffprune.training import train
from tiny import tiny_train


class _Crash(Exception):
    pass


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_loss_falls(tiny_unet, digits, tmp_path):
    result = train(tiny_unet, make_scheduler(), digits.train, tiny_train(steps=60, checkpoint_every=60), tmp_path)
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert len(result.losses) == 60 and last < 0.6 * first


def test_kill_and_resume_matches_uninterrupted_run(tiny_unet, digits, tmp_path):
    params = tiny_train(steps=6, checkpoint_every=2)
    start = copy.deepcopy(tiny_unet)
    reference = train(copy.deepcopy(start), make_scheduler(), digits.train, params, tmp_path / "a")

    def crash(step):
        if step == 4:
            raise _Crash

    with pytest.raises(_Crash):
        train(copy.deepcopy(start), make_scheduler(), digits.train, params, tmp_path / "b", on_checkpoint=crash)
    resumed = train(copy.deepcopy(start), make_scheduler(), digits.train, params, tmp_path / "b")
    assert resumed.resumed_from == 4
    assert _same(reference.model, resumed.model)
    assert reference.losses == resumed.losses


def test_changed_recipe_does_not_resume_from_stale_checkpoint(tiny_unet, digits, tmp_path):
    start = copy.deepcopy(tiny_unet)
    train(copy.deepcopy(start), make_scheduler(), digits.train, tiny_train(steps=3), tmp_path)
    other = train(copy.deepcopy(start), make_scheduler(), digits.train, tiny_train(steps=3, lr=5e-4), tmp_path)
    assert other.resumed_from is None
    longer = train(copy.deepcopy(start), make_scheduler(), digits.train, tiny_train(steps=6), tmp_path)
    assert longer.resumed_from == 3
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


def test_checkpoints_rotate_and_hold_no_pickle(tiny_unet, digits, tmp_path):
    params = tiny_train(steps=6, checkpoint_every=1, keep_checkpoints=2)
    train(tiny_unet, make_scheduler(), digits.train, params, tmp_path)
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    kept = list_checkpoints(run)
    assert [p.name for p in kept] == ["step-0000005", "step-0000006"]
    assert {f.name for f in kept[-1].iterdir()} == {
        "model.safetensors", "ema.safetensors", "optimizer.safetensors", "optimizer.json", "state.json"}


def test_corrupt_checkpoint_is_refused_in_one_line(tiny_unet, digits, tmp_path):
    start = copy.deepcopy(tiny_unet)
    train(copy.deepcopy(start), make_scheduler(), digits.train, tiny_train(steps=3), tmp_path)
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    (list_checkpoints(run)[-1] / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(DiffpruneError) as info:
        train(copy.deepcopy(start), make_scheduler(), digits.train, tiny_train(steps=6), tmp_path)
    assert "model.safetensors" in str(info.value) and "\n" not in str(info.value)


def test_distillation_target_is_the_weighted_mix_of_teacher_and_noise(tiny_unet, digits, tmp_path):
    """With a teacher identical to the student, the first step's target w·ε_teacher + (1−w)·ε differs from
    the prediction by (1−w)·(ε − ε_pred), so its loss is (1−w)² times the plain loss (same draws)."""
    teacher = copy.deepcopy(tiny_unet)
    plain = train(copy.deepcopy(tiny_unet), make_scheduler(), digits.train, tiny_train(steps=1), tmp_path / "a")
    kd = train(copy.deepcopy(tiny_unet), make_scheduler(), digits.train, tiny_train(steps=1), tmp_path / "b",
               teacher=teacher, distill_weight=0.7)
    assert kd.losses[0] == pytest.approx(0.3**2 * plain.losses[0], rel=1e-4)
    only_teacher = train(copy.deepcopy(tiny_unet), make_scheduler(), digits.train, tiny_train(steps=1),
                         tmp_path / "c", teacher=teacher, distill_weight=1.0)
    assert only_teacher.losses[0] == pytest.approx(0.0, abs=1e-10)


def test_fp16_on_cpu_is_refused(tiny_unet, digits, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(DiffpruneError, match="CUDA"):
        train(tiny_unet, make_scheduler(), digits.train, tiny_train(mixed_precision="fp16"), tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_data_parallel_two_cpu_processes_agree(digits_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # no ACCELERATE_USE_CPU: it makes launch start ONE process
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
           str(Path(__file__).parent / "ddp_worker.py"), str(digits_dir), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    assert (tmp_path / "world_size").read_text() == "2"
    assert ranks[0].keys() == ranks[1].keys()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    init = load_file(tmp_path / "init.safetensors")
    assert any(not torch.equal(init[k], ranks[0][k]) for k in init)
