"""Refused writes (disk full, file-size limit, permissions) become one error naming the path; nothing is left."""

import errno
import os
from pathlib import Path

import pytest

from diffprune.common.atomic import atomic_dir, atomic_file, environment_error
from diffprune.common.errors import OutputWriteError


class SafetensorError(Exception):  # the name safetensors' Rust extension gives its error type
    pass


def test_which_errors_belong_to_the_machine():
    assert environment_error(OSError(errno.ENOSPC, "No space left on device")).errno == errno.ENOSPC
    assert environment_error(OSError(errno.ENOENT, "No such file")) is None  # a bug or bad input, not the disk
    err = environment_error(SafetensorError("Error while serializing: I/O error: File too large (os error 27)"))
    assert err.errno == errno.EFBIG
    assert environment_error(SafetensorError("Error while serializing: IoError(Os { code: 28, kind: x })")).errno == 28
    assert environment_error(ValueError("os error 28")) is None


def test_a_full_disk_inside_atomic_dir_keeps_the_previous_output(tmp_path):
    target = tmp_path / "models" / "pruned"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(OutputWriteError) as info, atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v2, half")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "weights"))
    message = str(info.value)
    assert message.startswith(f"cannot write {target} (weights): No space left on device (ENOSPC); free disk space")
    assert (target / "weights").read_text() == "v1" and os.listdir(target.parent) == ["pruned"]


def test_a_file_size_limit_in_atomic_file(tmp_path):
    with pytest.raises(OutputWriteError, match=r"cannot write .*metrics.json: File too large \(EFBIG\)"):
        with atomic_file(tmp_path / "metrics.json") as fh:
            fh.write("{")
            raise OSError(errno.EFBIG, "File too large")
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_folder(tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        if os.access(tmp_path / "ro", os.W_OK):
            pytest.skip("running as root: permissions do not bind")
        with pytest.raises(OutputWriteError, match="Permission denied"):
            with atomic_dir(Path(tmp_path / "ro" / "out")):
                pass
    finally:
        (tmp_path / "ro").chmod(0o700)
