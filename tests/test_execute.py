"""Stages run in a child process: time limits are enforced, bad input is not retried, crashes are reported."""

import sys
import time

import pytest

from tasks.execute import StageCrashed, StageInputError, StageTimeout, _run_child, run_cli


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
    with pytest.raises(StageCrashed, match="exit status 3: boom"):
        _run_child([sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"], 30, "score")


def test_only_crashes_are_retried():
    from prefect.states import Failed

    from tasks.stages import _transient

    assert _transient(None, None, Failed(data=StageCrashed("killed")))
    assert not _transient(None, None, Failed(data=StageInputError("bad key")))
    assert not _transient(None, None, Failed(data=StageTimeout("too long")))
