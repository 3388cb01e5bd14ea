"""Every stage function keeps the stage table's contract, and each does its job on tiny inputs."""

import inspect
import json

import pytest
from safetensors.torch import load_file

from diffprune import stages
from diffprune.config import DataParams, FinetuneParams, PruneParams, ScoreParams, TeacherParams
from diffprune.models import load_model, make_scheduler, save_model
from diffprune.stage_table import LIBRARY, METRICS, STAGES
from tiny import TINY_ARCH, tiny_eval, tiny_train


@pytest.mark.parametrize("stage", LIBRARY, ids=lambda s: s.name)
def test_each_function_takes_exactly_the_table_s_inputs(stage):
    signature = inspect.signature(getattr(stages, stage.name))
    keyword = {n for n, p in signature.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    expected = {"out", "metrics", *(name for name, _ in stage.inputs)} | ({"checkpoints"} if stage.trains else set())
    assert keyword == expected
    assert all(p.default is inspect.Parameter.empty for n, p in signature.parameters.items() if n in keyword)


def _summary(metrics, stage: str, returned: dict) -> dict:
    """The stage's ``<metrics>/<stage>.json``, checked to be what the function returned."""
    written = json.loads((metrics / STAGES[stage].metrics_file).read_text())
    returned = json.loads(json.dumps(returned, default=str))
    assert {k: v for k, v in written.items() if k in returned} == returned
    return written


def test_builtin_teacher_creates_the_declared_checkpoint_folder(tmp_path):
    stages.prepare(DataParams(max_images=40), out=tmp_path / "data", metrics=tmp_path / METRICS)
    info = stages.teacher(TeacherParams(), data=tmp_path / "data", out=tmp_path / "teacher",
                          checkpoints=tmp_path / "ck", metrics=tmp_path / METRICS)
    assert info["pretrained"] == "builtin:teacher-digits16"
    assert (tmp_path / "ck").is_dir(), "dvc.yaml declares checkpoints/teacher as an output"
    assert (tmp_path / "teacher" / "unet" / "architecture.json").is_file()
    _summary(tmp_path / METRICS, "teacher", info)


def test_prepare_writes_the_data_and_its_manifest_as_summary(tmp_path):
    info = stages.prepare(DataParams(resolution=8, max_images=50), out=tmp_path / "data", metrics=tmp_path / "m")
    assert info["n_train"] + info["n_test"] == 50 and "files" not in info
    assert set(json.loads((tmp_path / "data" / "manifest.json").read_text())["files"]) >= {"train.npy"}
    _summary(tmp_path / "m", "prepare", info)


@pytest.fixture(scope="module")
def chain(tmp_path_factory, digits_dir):
    """A tiny teacher trained by the teacher stage on a 100-step schedule, then scored and pruned."""
    root = tmp_path_factory.mktemp("chain")
    teacher = TeacherParams(source="scratch", architecture=TINY_ARCH, num_train_timesteps=100,
                            train=tiny_train(steps=4, checkpoint_every=2))
    info = stages.teacher(teacher, data=digits_dir, out=root / "teacher", checkpoints=root / "ck", metrics=root / "m")
    return root, info


def test_teacher_from_scratch_trains_and_saves(chain):
    root, info = chain
    assert info["source"] == "scratch" and info["steps"] == 4
    assert (root / "m" / "teacher_loss.csv").read_text().count("\n") == 5
    assert load_model(root / "teacher")[1].config.num_train_timesteps == 100
    _summary(root / "m", "teacher", info)


@pytest.mark.parametrize(("criterion", "gradients"), [("diff-pruning", True), ("magnitude", False)])
def test_score_writes_gradients_only_for_gradient_criteria(chain, digits_dir, criterion, gradients):
    root, _ = chain
    out = root / f"scores-{criterion}"
    info = stages.score(ScoreParams(criterion=criterion, batch_size=8, thr=0.3), data=digits_dir,
                        teacher=root / "teacher", out=out, metrics=root / f"m-{criterion}")
    assert (out / "gradients.safetensors").is_file() == gradients
    if gradients:
        assert 1 <= info["timesteps_visited"] <= 100 and info["thr"] == 0.3
        assert (out / "loss_over_t.csv").read_text().count("\n") == info["timesteps_visited"] + 1
        assert load_file(out / "gradients.safetensors")
    else:
        assert info["timesteps_visited"] == 0 and info["thr"] is None
    _summary(root / f"m-{criterion}", "score", info)


@pytest.mark.parametrize("how", [{"pruning_ratio": 0.3}, {"pruning_ratio": None, "target_macs": 0.6}])
def test_prune_shrinks_the_teacher_as_asked(chain, digits_dir, how):
    root, _ = chain
    scores = root / "scores-magnitude"
    if not scores.is_dir():
        stages.score(ScoreParams(criterion="magnitude"), data=digits_dir, teacher=root / "teacher", out=scores,
                     metrics=root / "m-magnitude")
    out = root / f"pruned-{how['pruning_ratio']}"
    info = stages.prune(PruneParams(**how), teacher=root / "teacher", scores=scores, out=out, metrics=root / "mp")
    assert info["pruned"]["params"] < info["teacher"]["params"] and info["macs_ratio"] < 1
    if how.get("target_macs"):
        assert info["macs_ratio"] <= 0.6
    assert load_model(out)[0].config.in_channels == 1
    written = _summary(root / "mp", "prune", info)
    assert written["widths"], "the per-layer widths are in the metrics file"


def test_finetune_then_evaluate(tmp_path, digits_dir, tiny_model_dir):
    student = tmp_path / "student"
    unet, _ = load_model(tiny_model_dir)
    save_model(unet, make_scheduler(), student)
    params = FinetuneParams(**tiny_train(steps=3).model_dump())
    info = stages.finetune(params, data=digits_dir, student=student, teacher=tiny_model_dir, out=tmp_path / "tuned",
                           checkpoints=tmp_path / "ck", metrics=tmp_path / "m")
    assert info["steps"] == 3 and info["distill"] is True
    assert (tmp_path / "m" / "finetune_loss.csv").read_text().count("\n") == 4
    _summary(tmp_path / "m", "finetune", info)
    result = stages.evaluate(tiny_eval(tmp_path / "fid"), data=digits_dir, teacher=tiny_model_dir,
                             student=tmp_path / "tuned", out=tmp_path / "samples", metrics=tmp_path / "m")
    assert {"fid", "fid_std", "macs", "params"} <= set(result["teacher"]) and "ssim" in result["pruned"]
    assert (tmp_path / "samples" / "grid_pairs.png").is_file()
    assert (tmp_path / "m" / "evaluate_fid_vs_macs.csv").read_text().startswith("model,macs_m,fid")
    _summary(tmp_path / "m", "evaluate", result)

