"""A DVC S3 remote on a real S3-compatible server (SeaweedFS on loopback, no mocks): the README's commands push a
tracked folder from one git + DVC repository, and a second clone pulls it back byte for byte. Credentials live
only in each clone's git-ignored ``.dvc/config.local``; a clone without the right ones is refused."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

DVC = str(Path(sys.executable).with_name("dvc"))


def _env(home: Path) -> dict[str, str]:
    """No AWS variables (credentials come from the remote's config alone), no global DVC or git config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(HOME=str(home), DVC_NO_ANALYTICS="1", GIT_CONFIG_NOSYSTEM="1", GIT_AUTHOR_NAME="t",
               GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com")
    return env


def _run(cwd: Path, home: Path, *argv: str, ok: bool = True) -> str:
    proc = subprocess.run(argv, cwd=cwd, env=_env(home), capture_output=True, text=True, timeout=120)
    assert (proc.returncode == 0) == ok, f"{argv}: exit {proc.returncode}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc.stdout + proc.stderr


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _credentials(repo: Path, home: Path, key: str, secret: str) -> None:
    _run(repo, home, DVC, "remote", "modify", "--local", "store", "access_key_id", key)
    _run(repo, home, DVC, "remote", "modify", "--local", "store", "secret_access_key", secret)


@pytest.fixture
def pushed(s3_server, tmp_path):
    """Host 1: a git + DVC repo whose ``data/`` folder is tracked and pushed to ``s3://<bucket>/dvc-…``."""
    home, repo = tmp_path / "home", tmp_path / "host1"
    home.mkdir()
    repo.mkdir()
    remote = f"s3://{s3_server.bucket}/dvc-{uuid.uuid4().hex[:8]}"
    _run(repo, home, "git", "init", "-q")
    _run(repo, home, DVC, "init", "-q")
    _run(repo, home, DVC, "remote", "add", "-d", "store", remote)
    _run(repo, home, DVC, "remote", "modify", "store", "endpointurl", s3_server.endpoint)
    _credentials(repo, home, s3_server.key, s3_server.secret)
    data = repo / "data"
    (data / "sub").mkdir(parents=True)
    (data / "weights.bin").write_bytes(os.urandom(300_000))
    (data / "sub" / "config.json").write_text('{"width": 16}\n')
    (data / "empty.txt").write_bytes(b"")
    _run(repo, home, DVC, "add", "-q", "data")
    _run(repo, home, "git", "add", "data.dvc", ".gitignore", ".dvc/config", ".dvc/.gitignore")
    _run(repo, home, "git", "commit", "-q", "-m", "data on the S3 remote")
    _run(repo, home, DVC, "push")
    return repo, home, remote


def test_push_then_pull_in_a_second_clone_is_byte_identical(pushed, s3_server, tmp_path):
    repo, home, remote = pushed
    config = (repo / ".dvc" / "config").read_text()
    assert remote in config and s3_server.endpoint in config and s3_server.secret not in config
    tracked = _run(repo, home, "git", "ls-files").split()
    assert ".dvc/config" in tracked and ".dvc/config.local" not in tracked  # the keys stay on this host

    import s3fs

    fs = s3fs.S3FileSystem(key=s3_server.key, secret=s3_server.secret, skip_instance_cache=True,
                           client_kwargs={"endpoint_url": s3_server.endpoint, "region_name": "us-east-1"})
    objects = [p for p, info in fs.find(remote.removeprefix("s3://"), detail=True).items() if info["type"] == "file"]
    assert objects and all("/files/md5/" in p for p in objects)  # DVC 3's content-addressed layout

    clone = tmp_path / "host2"
    _run(tmp_path, home, "git", "clone", "-q", str(repo), str(clone))
    assert not (clone / "data").exists()
    _credentials(clone, home, s3_server.key, s3_server.secret)
    _run(clone, home, DVC, "pull")
    assert _tree(clone / "data") == _tree(repo / "data")
    assert "in sync" in _run(clone, home, DVC, "status", "-c")


def test_a_clone_with_a_wrong_secret_is_refused(pushed, s3_server, tmp_path):
    repo, home, _ = pushed
    clone = tmp_path / "host3"
    _run(tmp_path, home, "git", "clone", "-q", str(repo), str(clone))
    _credentials(clone, home, s3_server.key, "not-the-secret")
    refused = _run(clone, home, DVC, "pull", ok=False)
    assert "403" in refused and "Forbidden" in refused
    assert not (clone / "data" / "weights.bin").exists()
