import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from diffprune.flows.cli import build_parser, main
from diffprune.pipeline.table import NAMES
from tiny import TINY_PARAMS


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_stage_documents_its_options():
    parser = build_parser()
    subs = parser._subparsers._group_actions[0].choices
    assert set(subs) == set(NAMES) | {"run", "sweep", "serve", "deploy", "store"}
    for sub in subs.values():
        for action in sub._actions:
            assert action.help, f"{sub.prog} {action.option_strings} has no help"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["prepare", "--set", "dataset=mnist"], "data.dataset"),
        (["prepare", "--set", "resolution=2"], "data.resolution"),
        (["prepare", "--set", "finetune.lr=1"], "reads only the 'data' group"),
        (["prepare", "--set", "dataset=imagefolder", "--set", "path=empty"], "no PNG/JPEG/WebP"),
        (["finetune", "--set", "lr=-1"], "finetune.lr"),
        (["finetune", "--student", "nowhere"], "not a prepared dataset"),
        (["prune", "--set", "target_macs=0.5"], "set exactly one of prune.pruning_ratio and prune.target_macs"),
        (["score", "--set", "criterion=l1"], "score.criterion"),
        (["evaluate", "--params", "missing.yaml"], "missing.yaml"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(project, capsys, argv, expected):
    (project / "empty").mkdir()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1 and err.startswith(f"diffprune {argv[0]}: error:")
    assert not any((project / d).exists() for d in ("data", "models", "metrics", "samples"))


def test_unreadable_params_file(project, capsys):
    (project / "params.yaml").write_bytes(b"\xff\xfe\x00garbage: [")
    assert main(["prepare"]) == 2
    assert "params.yaml" in capsys.readouterr().err


def test_corrupt_checkpoint_via_cli_keeps_previous_model(project, capsys):
    assert main(["prepare"]) == 0
    assert main(["teacher"]) == 0
    model = (project / "models/teacher/unet/diffusion_pytorch_model.safetensors").read_bytes()
    run = next((project / "checkpoints/teacher").iterdir())
    last = sorted(run.glob("step-*"))[-1]
    (last / "optimizer.safetensors").write_bytes(b"not safetensors")
    capsys.readouterr()
    assert main(["teacher", "--set", "train.steps=12"]) == 2
    err = capsys.readouterr().err
    assert "optimizer.safetensors" in err and len(err.strip().splitlines()) == 1
    assert (project / "models/teacher/unet/diffusion_pytorch_model.safetensors").read_bytes() == model


@pytest.mark.slow
def test_stage_chain_end_to_end(project):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DIFFPRUNE_PROGRESS", None)
    log = ""
    for stage in ("prepare", "teacher", "score", "prune", "finetune", "evaluate"):
        proc = subprocess.run([sys.executable, "-m", "diffprune", stage], cwd=project, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        log += proc.stderr
    # stderr is a pipe, as in CI or `make run > log`: plain progress lines, no carriage-return frames.
    assert "\r" not in log and "train: 100% 4/4" in log and len(log) < 20_000, len(log)
    metrics = json.loads((project / "metrics/evaluate.json").read_text())
    for key in ("params", "macs", "fid", "latency_s"):
        assert key in metrics["teacher"]
    for key in ("params", "macs", "fid", "ssim", "latency_s"):
        assert key in metrics["pruned"]
    for key in ("fid_extractor", "n_samples", "sampler", "sampler_steps", "fid_real_floor"):
        assert key in metrics
    assert metrics["n_samples"] == 16 and len(metrics["pruned"]["fid_per_seed"]) == 2
    assert len(list(Path(project, "samples/pruned/seed0").glob("*.png"))) == 16
    assert (project / "samples/grid_pairs.png").is_file()
    assert metrics["macs_ratio"] < 0.8 and metrics["pruned"]["params"] < metrics["teacher"]["params"]
    score = json.loads((project / "metrics/score.json").read_text())
    assert 1 <= score["timesteps_visited"] <= 1000 and (project / "scores/gradients.safetensors").is_file()
    assert (project / "models/pruned/unet/architecture.json").is_file()
    loss = (project / "metrics/finetune_loss.csv").read_text().splitlines()
    assert loss[0] == "step,loss" and len(loss) == 5


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_uninterrupted_weights(project):
    import signal
    import time

    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "diffprune", "teacher",
           "--set", "train.steps=300", "--set", "train.checkpoint_every=10"]
    subprocess.run([sys.executable, "-m", "diffprune", "prepare"], cwd=project, env=env, check=True,
                   capture_output=True)
    subprocess.run([*cmd, "--out", "straight", "--checkpoints", "ck_straight"], cwd=project, env=env, check=True,
                   capture_output=True, timeout=600)

    proc = subprocess.Popen([*cmd, "--out", "resumed", "--checkpoints", "ck_resumed"], cwd=project, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(project.glob("ck_resumed/*/step-0000030")) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (project / "resumed").exists(), "killed too late: the run had finished"
    done = subprocess.run([*cmd, "--out", "resumed", "--checkpoints", "ck_resumed"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout[done.stdout.index("{"):])["source"] == "scratch"
    a = load_file(project / "straight/unet/diffusion_pytorch_model.safetensors")
    b = load_file(project / "resumed/unet/diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("command", ["run", "sweep", "serve", "deploy", "register"])
def test_orchestration_commands_validate_params_first(project, capsys, command):
    assert main([command, "--set", "prune.pruning_ratio=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"diffprune {command}: error:") and "prune.pruning_ratio" in err
    assert len(err.splitlines()) == 1 and not (project / "artifacts").exists()


@pytest.mark.parametrize("command", ["prepare", "evaluate", "run"])
def test_without_a_params_file_the_command_names_it(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    assert main([command]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"diffprune {command}: error: params.yaml: no such params file") and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_file_size_limit_in_the_stage_process_is_one_line_and_loses_nothing(project):
    """`ulimit -f` (RLIMIT_FSIZE binds root too) while the teacher saves: exit 3, one line, the old model kept."""
    import resource

    from diffprune.common.digests import dir_digest

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for stage in ("prepare", "teacher"):
        subprocess.run([sys.executable, "-m", "diffprune", stage], cwd=project, env=env, check=True,
                       capture_output=True, timeout=600)
    before = dir_digest(project / "models/teacher")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    proc = subprocess.run([sys.executable, "-m", "diffprune", "teacher", "--set", "train.steps=9"], cwd=project,
                          env=env, capture_output=True, text=True, timeout=600, preexec_fn=limit)
    err = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert err.startswith("diffprune teacher: error: cannot write ") and "File too large (EFBIG)" in err
    assert dir_digest(project / "models/teacher") == before
    assert not [p for p in (project / "models").iterdir() if ".tmp-" in p.name]
