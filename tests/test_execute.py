"""Stages run in a child process: time limits are enforced, bad input is not retried, crashes are reported."""

import sys
import threading
import time

import pytest

from diffprune.tasks.execute import StageCrashed, StageInputError, StageRefusedWrite, StageTimeout, _run_child, run_cli


def test_a_stage_past_its_time_limit_is_killed():
    start = time.perf_counter()
    with pytest.raises(StageTimeout, match=r"orchestration\.timeouts_min\.finetune"):
        _run_child([sys.executable, "-c", "import time; time.sleep(60)"], 1.0, "finetune")
    assert time.perf_counter() - start < 15


def test_exit_status_2_is_bad_input_with_the_stage_message(tmp_path):
    with pytest.raises(StageInputError, match="no such params file"):
        run_cli(["prepare", "--params", str(tmp_path / "missing.yaml")], "subprocess", 120)
    with pytest.raises(StageInputError, match="no such params file"):
        run_cli(["prepare", "--params", str(tmp_path / "missing.yaml")], "inline", None)


def test_other_failures_are_crashes_carrying_the_last_line():
    with pytest.raises(StageCrashed, match="exit status 5: boom"):
        _run_child([sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(5)"], 30, "score")


def test_a_refused_write_is_its_own_failure_and_not_retried():
    from prefect.states import Failed

    from diffprune.tasks.stages import _transient

    line = "diffprune prune: error: cannot write models/p: File too large (EFBIG)"
    with pytest.raises(StageRefusedWrite, match="EFBIG") as info:
        _run_child([sys.executable, "-c", f"import sys; print({line!r}, file=sys.stderr); sys.exit(3)"], 30, "prune")
    assert info.value.exit_code == 3 and not _transient(None, None, Failed(data=info.value))


def test_only_crashes_are_retried():
    from prefect.states import Failed

    from diffprune.tasks.stages import _transient

    assert _transient(None, None, Failed(data=StageCrashed("killed")))
    assert not _transient(None, None, Failed(data=StageInputError("bad key")))
    assert not _transient(None, None, Failed(data=StageTimeout("too long")))


@pytest.mark.parametrize(("executor", "cap", "expected"), [("subprocess", 2, 2), ("inline", 4, 1)])
def test_stages_running_at_once_are_capped(monkeypatch, executor, cap, expected):
    import diffprune.tasks.execute as execute

    running, peak, lock = [0], [0], threading.Lock()

    def stage(*_):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1

    monkeypatch.setattr(execute, "_run", stage)
    threads = [threading.Thread(target=run_cli, args=(["prune"], executor, None, 1, cap)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == expected


@pytest.mark.slow
def test_training_stages_run_data_parallel_under_accelerate(tmp_path, digits_dir, tiny_model_dir):
    import json

    import yaml

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"finetune": {"steps": 2, "batch_size": 4, "checkpoint_every": 2,
                                                   "device": "cpu"}}))
    run_cli(["finetune", "--params", str(params), "--data", str(digits_dir), "--student", str(tiny_model_dir),
             "--teacher", str(tiny_model_dir), "--out", str(tmp_path / "out"), "--checkpoints",
             str(tmp_path / "ck"), "--metrics", str(tmp_path / "m")], "subprocess", 300, processes=2)
    assert json.loads((tmp_path / "m" / "finetune.json").read_text())["world_size"] == 2
    assert (tmp_path / "out" / "unet" / "architecture.json").is_file()
