"""Cache keys: content not paths; each stage's code closure; dvc.yaml lists the same code as deps."""

import shutil
from pathlib import Path

import yaml

from diffprune.fingerprint import code_files, code_version, dir_digest, stage_key

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "teacher", "score", "prune", "finetune", "evaluate", "register")


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
    assert "diffprune/training.py" in code_files("finetune") and "diffprune/pruning.py" not in code_files("finetune")
    assert "diffprune/pruning.py" in code_files("prune") and "diffprune/training.py" not in code_files("prepare")
    assert "tasks/registry.py" in code_files("register")
    assert len({code_version(s) for s in STAGES}) == len(STAGES)


def test_dvc_yaml_deps_cover_each_stage_code():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STAGES)
    for stage in STAGES:
        missing = set(code_files(stage)) - set(stages[stage]["deps"])
        assert not missing, f"dvc.yaml stage {stage} lacks deps {sorted(missing)}"
        for dep in stages[stage]["deps"]:
            assert (ROOT / dep).exists() or not dep.startswith(("diffprune/", "tasks/")), dep
