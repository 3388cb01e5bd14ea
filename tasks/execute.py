"""Run one stage the way the CLI does, in a child process whose time limit is really enforced.

Prefect's ``timeout_seconds`` cannot interrupt blocking torch work in a worker thread, so a stage
runs as ``python -m diffprune <stage> ...``: on time-out its whole process group is terminated.
``inline`` runs the same CLI code in this process (no start-up cost; no enforced limit).
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading

from diffprune.common import progress
from diffprune.common.errors import DiffpruneError, OutputWriteError
from diffprune.pipeline import cli


class StageInputError(DiffpruneError):
    """The stage refused its input (exit status 2): retrying cannot help."""


class StageRefusedWrite(StageInputError):
    """The machine refused the stage's output (disk full, file-size limit, permissions; exit status 3)."""

    exit_code = 3


class StageTimeout(DiffpruneError):
    """The stage ran past its limit and was stopped."""

    exit_code = 1


class StageCrashed(DiffpruneError):
    """The stage died another way (killed, out of memory, a bug): possibly transient."""

    exit_code = 1


_slots: dict[int, threading.BoundedSemaphore] = {}
_slots_lock = threading.Lock()


def _slot(limit: int | None) -> contextlib.AbstractContextManager:
    """A process-wide cap on stages running at once. Prefect's thread pool resolves a task's upstream
    futures inside the worker thread, so waiting tasks hold pool threads: the pool cannot be the cap."""
    if not limit:
        return contextlib.nullcontext()
    with _slots_lock:
        return _slots.setdefault(limit, threading.BoundedSemaphore(limit))


def run_cli(argv: list[str], executor: str, timeout_s: float | None, processes: int = 1,
            max_running: int | None = None) -> None:
    """Run ``diffprune <argv>``; raise one of the errors above on failure.

    ``processes`` > 1 runs it data-parallel under ``accelerate launch --multi_gpu`` (one process per GPU).
    ``max_running`` caps how many stages this process runs at once (inline stages: always one).
    """
    with _slot(1 if executor == "inline" else max_running):
        _run(argv, executor, timeout_s, processes)


def accelerate_launch(processes: int) -> list[str]:
    """``accelerate launch`` for one host's ``processes`` GPUs, on a port free now: two multi-GPU stages on one
    host (a sweep's branches) would otherwise both bind accelerate's default port and one would fail."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--main_process_port", str(port)]


def _run(argv: list[str], executor: str, timeout_s: float | None, processes: int) -> None:
    if processes > 1:
        _run_child([*accelerate_launch(processes), "-m", "diffprune", *argv], timeout_s, argv[0])
        return
    if executor == "inline":
        try:
            cli.run(argv)
        except OutputWriteError as exc:
            raise StageRefusedWrite(f"diffprune {argv[0]}: {exc}") from None
        except DiffpruneError as exc:
            raise StageInputError(f"diffprune {argv[0]}: {exc}") from None
        return
    _run_child([sys.executable, "-m", "diffprune", *argv], timeout_s, argv[0])


def _run_child(cmd: list[str], timeout_s: float | None, stage: str) -> None:
    # stderr carries the progress bars: pass it through live and keep its tail for the error message.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, **progress.child_env()})
    tail: collections.deque[str] = collections.deque(maxlen=20)
    pump = threading.Thread(target=_pump, args=(proc.stderr, tail), daemon=True)
    pump.start()
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _stop(proc)
        raise StageTimeout(f"diffprune {stage}: stopped after the {timeout_s:.0f} s limit "
                           f"(orchestration.timeouts_min.{stage})") from None
    except BaseException:
        _stop(proc)
        raise
    finally:
        pump.join(timeout=5)
    if rc == 0:
        return
    last = next((line for line in reversed(tail) if line.strip()), "(no output)")
    if rc == 2:
        raise StageInputError(last.strip())
    if rc == OutputWriteError.exit_code:
        raise StageRefusedWrite(last.strip())
    raise StageCrashed(f"diffprune {stage}: exit status {rc}: {last.strip()}")


def _pump(stream, tail: collections.deque[str]) -> None:
    # Chunks, not lines: progress bars redraw with "\r" and would otherwise show only when they finish.
    pending = ""
    while chunk := os.read(stream.fileno(), 4096):
        text = chunk.decode(errors="replace")
        sys.stderr.write(text)
        sys.stderr.flush()
        pending += text
        *done, pending = pending.split("\n")
        tail.extend(line.split("\r")[-1] for line in done)
    if pending:
        tail.append(pending.split("\r")[-1])
    stream.close()


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the stage's process group (its data-loader or accelerate children too), then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
