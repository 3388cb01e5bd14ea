"""Cache keys: content not paths; each stage's code version covers what it runs and nothing more."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from diffprune.common.digests import dir_digest
from diffprune.pipeline.fingerprint import code_files, code_version, stage_key
from diffprune.pipeline.table import LIBRARY, NAMES

ROOT = Path(__file__).resolve().parents[1]
LIBRARY_STAGES = [s.name for s in LIBRARY]


def test_digest_follows_content_not_location(tmp_path):
    a = tmp_path / "a"
    (a / "sub").mkdir(parents=True)
    (a / "sub" / "w.bin").write_bytes(b"123")
    shutil.copytree(a, tmp_path / "elsewhere")
    assert dir_digest(a) == dir_digest(tmp_path / "elsewhere")
    (a / "sub" / "w.bin").write_bytes(b"124")
    assert dir_digest(a) != dir_digest(tmp_path / "elsewhere")
    (a / "manifest.json").write_text("{}")
    assert dir_digest(a, exclude=("manifest.json",)) == dir_digest(a.rename(tmp_path / "b"), exclude=("manifest.json",))


def test_keys_change_with_params_inputs_and_code_only():
    base = stage_key("prune", {"ratio": 0.3}, {"teacher": "d1"}, "c1")
    assert base == stage_key("prune", {"ratio": 0.3}, {"teacher": "d1"}, "c1")
    assert len({base, stage_key("prune", {"ratio": 0.4}, {"teacher": "d1"}, "c1"),
                stage_key("prune", {"ratio": 0.3}, {"teacher": "d2"}, "c1"),
                stage_key("prune", {"ratio": 0.3}, {"teacher": "d1"}, "c2")}) == 4


def test_each_stage_keys_on_its_own_code():
    training, pruning = "diffprune/training/loop.py", "diffprune/pruning/structural.py"
    assert training in code_files("finetune") and pruning not in code_files("finetune")
    assert pruning in code_files("prune") and training not in code_files("prepare")
    fid = {"diffprune/evaluation/features.py", "diffprune/evaluation/metrics.py"}
    for stage in ("score", "prune"):  # the FID code is evaluate's alone
        assert not fid & set(code_files(stage)), stage
    params_modules = {"diffprune/pipeline/config.py", "diffprune/pipeline/stage_params.py"}
    assert all(not params_modules & set(code_files(s)) for s in LIBRARY_STAGES), "params enter keys by value"
    from diffprune.tasks.stages import stage_code

    assert len({stage_code(s) for s in NAMES}) == len(NAMES)


def _in_copy(package_root: Path, expression: str):
    """``expression`` evaluated (as JSON) against the package at ``package_root``, in a fresh process."""
    script = (f"import json; from diffprune.pipeline.fingerprint import code_files, code_version; "
              f"print(json.dumps({expression}))")
    out = subprocess.run([sys.executable, "-c", script], cwd=package_root, capture_output=True, text=True,
                         env={"PYTHONPATH": str(package_root), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def _versions(package_root: Path) -> dict[str, str]:
    """Every library stage's code version as computed from the package at ``package_root``."""
    return _in_copy(package_root, f"{{s: code_version(s) for s in {LIBRARY_STAGES!r}}}")


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory):
    root = tmp_path_factory.mktemp("code")
    shutil.copytree(ROOT / "diffprune", root / "diffprune", ignore=shutil.ignore_patterns("__pycache__", "assets"))
    return root


def _edited(package_copy: Path, rel: str, old: str, new: str) -> dict[str, str]:
    file = package_copy / rel
    original = file.read_text()
    assert old in original, f"{rel} no longer holds {old!r}"
    file.write_text(original.replace(old, new, 1))
    try:
        return _versions(package_copy)
    finally:
        file.write_text(original)


def test_editing_code_moves_exactly_the_keys_of_the_stages_that_run_it(package_copy):
    base = _versions(package_copy)
    assert base == {s: code_version(s) for s in LIBRARY_STAGES}, "the copy hashes like the checkout"

    def moved(versions: dict) -> set[str]:
        return {s for s in LIBRARY_STAGES if versions[s] != base[s]}

    # the FID extractor: evaluate only, never score or prune
    assert moved(_edited(package_copy, "diffprune/evaluation/features.py", '"""', '"""Edited.\n', )) == {"evaluate"}
    # a stage's own function in stages.py: that stage only
    assert moved(_edited(package_copy, "diffprune/pipeline/stages.py", "macs, n_params = macs_and_params(unet, inputs)",
                         "macs, n_params = macs_and_params(unet, inputs)  # edited")) == {"prune"}
    # the cron default of the schedule: no stage
    assert moved(_edited(package_copy, "diffprune/pipeline/config.py", '"0 3 * * *"', '"0 4 * * *"')) == set()
    # a stage's own params model: that stage only
    assert moved(_edited(package_copy, "diffprune/pipeline/stage_params.py", "class PruneParams(_Strict):",
                         "class PruneParams(_Strict):  # edited")) == {"prune"}


def test_every_name_a_stage_reaches_enters_its_key(package_copy):
    """No unwritten rule: a public helper, a constant and an import inside a stage function are all followed;
    a name the key cannot resolve stops the key computation instead of being silently left out."""
    stages = package_copy / "diffprune" / "pipeline" / "stages.py"
    original = stages.read_text()
    call = "macs, n_params = macs_and_params(unet, inputs)"
    helper = ("\n\nSTEP = 1\n\n\ndef measured(unet, inputs):\n"
              "    from diffprune.evaluation import features  # noqa: F401\n    return macs_and_params(unet, inputs)\n")
    try:
        stages.write_text(original.replace(call, "macs, n_params = measured(unet, inputs[::STEP])") + helper)
        base = _versions(package_copy)
        assert "diffprune/evaluation/features.py" in _in_copy(package_copy, "code_files('prune')")
        for old, new in (("return macs_and_params", "return  macs_and_params"), ("STEP = 1", "STEP = 2")):
            stages.write_text(stages.read_text().replace(old, new))
            edited = _versions(package_copy)
            assert {s for s in LIBRARY_STAGES if edited[s] != base[s]} == {"prune"}, old
            base = edited
        stages.write_text(original.replace(call, "macs, n_params = not_defined_anywhere(unet, inputs)"))
        script = "from diffprune.pipeline.fingerprint import code_version; code_version('prune')"
        out = subprocess.run([sys.executable, "-c", script], cwd=package_copy, capture_output=True, text=True,
                             env={"PYTHONPATH": str(package_copy), "PATH": "/usr/bin:/bin"}, timeout=120)
        assert out.returncode != 0 and "not_defined_anywhere" in out.stderr, out.stderr[-1000:]
    finally:
        stages.write_text(original)


def test_dvc_yaml_is_generated_from_the_stage_table():
    from diffprune.repro.dvc_yaml import main, render

    assert main(["--check", "--file", str(ROOT / "dvc.yaml")]) == 0, "run `python -m diffprune.repro.dvc_yaml`"
    import yaml

    stages = yaml.safe_load(render())["stages"]
    assert list(stages) == list(NAMES)
    for stage in LIBRARY_STAGES:
        assert set(code_files(stage)) <= set(stages[stage]["deps"]), stage
        for dep in stages[stage]["deps"]:
            assert (ROOT / dep).exists() or not dep.startswith(("diffprune/", "tasks/")), dep


def test_code_versions_need_no_heavy_imports():
    """A cached run checks keys in the flow process: finding a stage's code must not import torch & co."""
    code = ("import sys\nfrom diffprune.pipeline.fingerprint import code_version\n"
            "from diffprune.pipeline.table import LIBRARY\n"
            "[code_version(s.name) for s in LIBRARY]\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_a_folder_is_read_once_per_process_but_changes_are_still_seen(tmp_path, monkeypatch):
    from diffprune.common import digests

    (tmp_path / "d").mkdir()
    f = tmp_path / "d" / "weights.bin"
    f.write_bytes(b"a" * 100)
    first = dir_digest(tmp_path / "d")
    reads = []
    original = digests.sha256_file
    monkeypatch.setattr(digests, "sha256_file", lambda p: reads.append(p) or original(p))
    assert dir_digest(tmp_path / "d") == first and reads == [], "unchanged: no file is read again"
    f.write_bytes(b"b" * 100)  # same size, new content (and modification time)
    assert dir_digest(tmp_path / "d") != first and reads
    f.unlink()
    assert dir_digest(tmp_path / "d") != first


def test_code_versions_can_be_computed_on_many_threads_at_once():
    """The sweep computes cache keys on a thread per task."""
    from concurrent.futures import ThreadPoolExecutor

    from diffprune.pipeline import fingerprint

    for f in (fingerprint.code_version, fingerprint.code_files, fingerprint._entry, fingerprint.module_file):
        f.cache_clear()
    with ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(code_version, LIBRARY_STAGES * 4))
    assert versions == [code_version(s) for s in LIBRARY_STAGES * 4]
