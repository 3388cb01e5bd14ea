import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from diffprune.common.errors import DiffpruneError
from diffprune.family.diffusion import Diffusion
from diffprune.family.models import build_unet, make_scheduler
from diffprune.training.checkpoint import list_checkpoints
from diffprune.training.loop import train
from diffprune.training.options import Conditioning, Distillation
from tiny import TINY_ARCH, tiny_train


class _Crash(Exception):
    pass


def _copy(unet: torch.nn.Module) -> Diffusion:
    return Diffusion(copy.deepcopy(unet), make_scheduler())


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_loss_falls(tiny_unet, digits, tmp_path):
    params = tiny_train(steps=60, checkpoint_every=60)
    result = train(Diffusion(tiny_unet, make_scheduler()), digits.train, params, tmp_path)
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert len(result.losses) == 60 and last < 0.6 * first


def test_kill_and_resume_matches_uninterrupted_run(tiny_unet, digits, tmp_path):
    params = tiny_train(steps=6, checkpoint_every=2)
    start = copy.deepcopy(tiny_unet)
    reference = train(_copy(start), digits.train, params, tmp_path / "a")

    def crash(step):
        if step == 4:
            raise _Crash

    with pytest.raises(_Crash):
        train(_copy(start), digits.train, params, tmp_path / "b", on_checkpoint=crash)
    resumed = train(_copy(start), digits.train, params, tmp_path / "b")
    assert resumed.resumed_from == 4
    assert _same(reference.model, resumed.model)
    assert reference.losses == resumed.losses


def test_changed_recipe_does_not_resume_from_stale_checkpoint(tiny_unet, digits, tmp_path):
    start = copy.deepcopy(tiny_unet)
    train(_copy(start), digits.train, tiny_train(steps=3), tmp_path)
    other = train(_copy(start), digits.train, tiny_train(steps=3, lr=5e-4), tmp_path)
    assert other.resumed_from is None
    longer = train(_copy(start), digits.train, tiny_train(steps=6), tmp_path)
    assert longer.resumed_from == 3
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


def test_checkpoints_rotate_and_hold_no_pickle(tiny_unet, digits, tmp_path):
    params = tiny_train(steps=6, checkpoint_every=1, keep_checkpoints=2)
    train(Diffusion(tiny_unet, make_scheduler()), digits.train, params, tmp_path)
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    kept = list_checkpoints(run)
    assert [p.name for p in kept] == ["step-0000005", "step-0000006"]
    assert {f.name for f in kept[-1].iterdir()} == {
        "model.safetensors", "ema.safetensors", "optimizer.safetensors", "optimizer.json", "state.json"}


def test_corrupt_checkpoint_is_refused_in_one_line(tiny_unet, digits, tmp_path):
    start = copy.deepcopy(tiny_unet)
    train(_copy(start), digits.train, tiny_train(steps=3), tmp_path)
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    (list_checkpoints(run)[-1] / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(DiffpruneError) as info:
        train(_copy(start), digits.train, tiny_train(steps=6), tmp_path)
    assert "model.safetensors" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("w", [0.7, 1.0])
def test_distillation_target_is_the_weighted_mix_of_teacher_and_noise(tiny_unet, digits, tmp_path, w):
    """One step by hand: the loss is mse(ε_pred, w·ε_teacher + (1−w)·ε) with ε_pred and ε_teacher the two
    models' outputs on the step's x_t. The images are all black (x0 = −1), so ε is recovered from x_t."""
    torch.manual_seed(1)
    teacher = build_unet(TINY_ARCH, 8, 1)  # a different network: its prediction is not the student's
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen[name] = (args[0].detach().clone(), args[1].detach().clone(), output.sample.detach().clone())
        return hook

    tiny_unet.register_forward_hook(record("student"))
    teacher.register_forward_hook(record("teacher"))
    black = np.zeros_like(digits.train[:32])
    scheduler = make_scheduler()
    kd = train(Diffusion(tiny_unet, scheduler), black, tiny_train(steps=1), tmp_path,
               distillation=Distillation(Diffusion(teacher, scheduler), w))
    xt, t, pred = seen["student"]
    xt_teacher, t_teacher, eps_teacher = seen["teacher"]
    assert torch.equal(xt, xt_teacher) and torch.equal(t, t_teacher), "the teacher sees the student's x_t and t"
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    eps = (xt - a.sqrt() * -1.0) / (1 - a).sqrt()
    assert not torch.allclose(pred, eps_teacher, atol=1e-2)
    expected = F.mse_loss(pred, w * eps_teacher + (1 - w) * eps).item()
    assert kd.losses[0] == pytest.approx(expected, rel=1e-4)
    for wrong in (F.mse_loss(pred, eps), F.mse_loss(pred, (1 - w) * eps_teacher + w * eps)):
        assert kd.losses[0] != pytest.approx(wrong.item(), rel=1e-2)


def test_fp16_on_cpu_is_refused(tiny_unet, digits, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(DiffpruneError, match="CUDA"):
        train(Diffusion(tiny_unet, make_scheduler()), digits.train, tiny_train(mixed_precision="fp16"), tmp_path)


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


def test_a_label_embedding_trains_with_the_unet_while_the_teachers_stays_put(tmp_path):
    """Class-conditional fine-tuning may train the label embedding too (cin256-v2's trainable class
    embedder); distillation then conditions the teacher on its own, untouched embedding."""
    import copy

    from families import tiny_family

    from diffprune.common.errors import DiffpruneError

    student = tiny_family("pixel-class", tmp_path)
    teacher = copy.deepcopy(student)
    before = {k: v.clone() for k, v in student.condition.module.state_dict().items()}
    images = np.random.default_rng(0).integers(0, 255, (16, 8, 8, 1), dtype=np.uint8)
    labels = np.arange(16) % 10
    params = tiny_train(steps=3, checkpoint_every=3)
    with pytest.raises(DiffpruneError, match="teacher's own conditioner"):  # the one that trains: it would drift
        train(student, images, params, tmp_path / "a", conditioning=Conditioning(labels, train_embedding=True),
              distillation=Distillation(student.with_unet(teacher.unet), 0.5))
    result = train(student, images, params, tmp_path / "b", conditioning=Conditioning(labels, 0.5, True),
                   distillation=Distillation(teacher, 0.5))
    trained = result.condition.state_dict()["embedding.weight"]
    assert not torch.equal(trained, before["embedding.weight"]) and not result.condition.embedding.weight.requires_grad
    assert torch.equal(teacher.condition.module.state_dict()["embedding.weight"], before["embedding.weight"])
    saved = result.trained(student)  # what finetune saves: the trained unet and the trained embedding
    assert saved.unet is result.model and saved.condition.module is result.condition
    assert type(saved.condition) is type(student.condition) and saved.scheduler is student.scheduler


def test_gradient_checkpointing_trains_the_same_weights_and_is_off_afterwards(tiny_unet, digits, tmp_path):
    plain = train(Diffusion(copy.deepcopy(tiny_unet), make_scheduler()), digits.train, tiny_train(steps=3),
                  tmp_path / "plain")
    student = Diffusion(copy.deepcopy(tiny_unet), make_scheduler())
    saved = train(student, digits.train, tiny_train(steps=3, gradient_checkpointing=True), tmp_path / "saved")
    assert plain.losses == saved.losses
    assert all(torch.equal(a, b) for a, b in zip(plain.model.state_dict().values(),
                                                  saved.model.state_dict().values(), strict=True))
    assert not student.unet.is_gradient_checkpointing and not saved.model.is_gradient_checkpointing


def test_a_bf16_teacher_distils_and_fp16_is_refused_on_the_cpu(tiny_unet, digits, tmp_path):
    from diffprune.pipeline.stage_params import FinetuneParams

    teacher = Diffusion(build_unet(TINY_ARCH, 8, 1), make_scheduler())
    base = dict(steps=2, batch_size=8, checkpoint_every=2, device="cpu")
    result = train(Diffusion(copy.deepcopy(tiny_unet), make_scheduler()), digits.train,
                   FinetuneParams(**base, teacher_precision="bf16"), tmp_path / "bf16",
                   distillation=Distillation(teacher, 0.7))
    assert np.isfinite(result.losses).all() and next(teacher.unet.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in result.model.parameters()), "the student stays fp32"
    with pytest.raises(DiffpruneError, match="teacher_precision 'fp16' needs a CUDA device"):
        train(Diffusion(copy.deepcopy(tiny_unet), make_scheduler()), digits.train,
              FinetuneParams(**base, teacher_precision="fp16"), tmp_path / "fp16",
              distillation=Distillation(teacher, 0.7))
