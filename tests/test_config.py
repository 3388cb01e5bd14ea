from pathlib import Path

import pytest
import yaml

from diffprune.common.errors import DiffpruneError
from diffprune.pipeline.config import Params, load_params
from diffprune.pipeline.params_file import main as params_file_main
from diffprune.pipeline.params_file import render
from diffprune.pipeline.stage_params import ArchParams

ROOT = Path(__file__).resolve().parents[1]


def test_code_defaults_are_the_shipped_params_yaml():
    assert load_params(ROOT / "params.yaml") == Params()
    assert params_file_main(["--check", "--file", str(ROOT / "params.yaml")]) == 0, \
        "params.yaml is generated: run `python -m diffprune.pipeline.params_file`"
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(shipped) == {f.alias or n for n, f in Params.model_fields.items()}, "every group is written out"


def test_the_generated_file_round_trips_other_values_too(tmp_path):
    changed = load_params(None, ["finetune.mixed_precision=bf16", "evaluate.seeds=[3]", "schedule.cron=5 4 * * 1",
                                 "teacher.architecture.block_out_channels=[16, 32]", "prune.pruning_ratio=null",
                                 "prune.target_macs=0.5"])
    path = tmp_path / "params.yaml"
    path.write_text(render(changed))
    assert load_params(path) == changed


def test_a_partial_teacher_train_group_keeps_the_teacher_recipe():
    p = load_params(None, ["teacher.train.steps=8"])
    assert p.teacher.train.lr == Params().teacher.train.lr and p.teacher.train.optimizer == "adamw"


@pytest.mark.parametrize("preset", ["cifar10.yaml", "celeba64.yaml"])
def test_paper_presets_validate(preset):
    params = load_params(ROOT / "presets" / preset)
    assert params.prune.pruning_ratio == 0.3 and params.teacher.source == "pretrained"


def test_every_preset_validates_and_the_latent_one_is_offline():
    assert sorted(p.name for p in (ROOT / "presets").glob("*.yaml")) == ["celeba64.yaml", "cifar10.yaml",
                                                                         "latent-digits.yaml", "sd15.yaml"]
    sd = load_params(ROOT / "presets" / "sd15.yaml")  # the SD recipe: the memory knobs on, a MACs target
    assert sd.finetune.gradient_checkpointing and sd.finetune.ema_on_cpu and sd.finetune.teacher_precision == "bf16"
    assert sd.prune.target_macs == 0.5 and sd.data.captions and sd.evaluate.guidance_scale > 1
    params = load_params(ROOT / "presets" / "latent-digits.yaml")
    assert (params.teacher.source, params.teacher.builtin, params.data.dataset) == ("builtin", "latent-digits32",
                                                                                    "digits")
    assert params.prune.target_macs <= 0.6 and params.finetune.steps <= 0.2 * 4000
    assert len(params.evaluate.seeds) >= 2 and params.evaluate.guidance_scale > 1


def test_a_missing_default_params_file_is_an_error_not_other_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DiffpruneError, match=r"^params\.yaml: no such params file"):
        load_params()


def test_override_sets_nested_keys(tmp_path):
    p = load_params(None, ["finetune.lr=0.01", "teacher.architecture.block_out_channels=[16, 32]"])
    assert p.finetune.lr == 0.01
    assert p.teacher.architecture.block_out_channels == (16, 32)


def test_override_words_yaml_1_1_reads_as_booleans_stay_strings(tmp_path):
    p = load_params(None, ["finetune.mixed_precision=no", "finetune.distill=no", "finetune.flip=on"])
    assert p.finetune.mixed_precision == "no"
    assert p.finetune.distill is False and p.finetune.flip is True
    path = tmp_path / "params.yaml"
    path.write_text("finetune:\n  mixed_precision: no\n  distill: off\n  flip: yes\n")
    p = load_params(path)
    assert p.finetune.mixed_precision == "no" and p.finetune.distill is False and p.finetune.flip is True


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("finetune:\n  lr: -1\n", "finetune.lr"),
        ("finetune:\n  learning_rate: 0.1\n", "finetune.learning_rate: unknown key"),
        ("data:\n  dataset: mnist\n", "data.dataset"),
        ("evaluate:\n  steps: 0\n", "evaluate.steps"),
        ("teacher:\n  source: pretrained\n", "teacher.pretrained is required"),
        ("data: [1, 2\n", "not valid YAML"),
        ("- a\n- b\n", "mapping"),
    ],
)
def test_bad_params_name_the_key(tmp_path, yaml_text, expected):
    path = tmp_path / "params.yaml"
    path.write_text(yaml_text)
    with pytest.raises(DiffpruneError) as info:
        load_params(path)
    message = str(info.value)
    assert expected in message and str(path) in message
    assert "\n" not in message


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(DiffpruneError, match=r"key\.sub=value"):
        load_params(None, ["nonsense"])
    with pytest.raises(DiffpruneError, match="no such params file"):
        load_params(tmp_path / "missing.yaml")


def test_architecture_must_be_prunable_by_groups():
    with pytest.raises(ValueError, match="not divisible"):
        ArchParams(block_out_channels=(30, 64), norm_num_groups=8)
    with pytest.raises(ValueError, match="attention level"):
        ArchParams(block_out_channels=(32, 64), attention_levels=(2,))
