"""Where stages compute: the device rule every stage shares, and accelerate on a free port."""

import socket

import pytest
import torch

from diffprune.common.errors import DiffpruneError
from diffprune.common.runtime import resolve_device
from diffprune.pipeline.config import load_params
from diffprune.tasks.execute import accelerate_launch

NO_CUDA = not torch.cuda.is_available()


def test_cpu_and_auto_without_a_gpu_compute_on_the_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    if NO_CUDA:
        assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.skipif(not NO_CUDA, reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("choice", ["cuda", "cuda:1"])
def test_a_gpu_that_is_not_there_is_refused_in_one_line(choice):
    with pytest.raises(DiffpruneError, match=f"device '{choice}': no CUDA device"):
        resolve_device(choice)


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
def test_auto_under_accelerate_is_this_rank_s_gpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_device("auto") == torch.device("cuda:0")
    with pytest.raises(DiffpruneError, match="CUDA device\\(s\\) are visible"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_every_stage_device_takes_cuda_n_and_names_a_bad_value(tmp_path):
    sets = [f"{group}.device=cuda:3" for group in ("score", "prune", "finetune", "evaluate")]
    params = load_params(None, [*sets, "teacher.train.device=cuda:0"])
    assert {params.score.device, params.prune.device, params.finetune.device, params.evaluate.device} == {"cuda:3"}
    with pytest.raises(DiffpruneError, match=r"prune\.device"):
        load_params(None, ["prune.device=gpu"])


def test_accelerate_gets_a_free_port_each_launch():
    argv = accelerate_launch(2)
    assert argv[argv.index("--num_processes") + 1] == "2"
    port = int(argv[argv.index("--main_process_port") + 1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free when it was handed out
