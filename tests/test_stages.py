"""Every stage function keeps the stage table's contract, and each does its job on tiny inputs.

The contract: ``stages.<name>(params, *, out, metrics, <inputs>[, checkpoints])`` writes ``out`` and
``<metrics>/<name>.json``, whose content is the summary it returns. The stages below run once each, chained
through temporary folders: teacher (trained from scratch on a 100-step schedule) → score → prune →
finetune → evaluate.
"""

import inspect
import json

import pytest
import torch
from safetensors.torch import load_file

from diffprune.data.datasets import load_prepared
from diffprune.family.models import ASSETS, count_params, load_model
from diffprune.pipeline import stages
from diffprune.pipeline.config import Params
from diffprune.pipeline.stage_params import DataParams, FinetuneParams, PruneParams, ScoreParams, TeacherParams
from diffprune.pipeline.table import LIBRARY, METRICS, STAGES
from tiny import TINY_ARCH, tiny_eval, tiny_train


@pytest.mark.parametrize("stage", LIBRARY, ids=lambda s: s.name)
def test_each_function_takes_exactly_the_table_s_inputs(stage):
    signature = inspect.signature(getattr(stages, stage.name))
    keyword = {n for n, p in signature.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    expected = {"out", "metrics", *(name for name, _ in stage.inputs)} | ({"checkpoints"} if stage.trains else set())
    assert keyword == expected
    assert all(p.default is inspect.Parameter.empty for n, p in signature.parameters.items() if n in keyword)


@pytest.mark.parametrize("stage", LIBRARY, ids=lambda s: s.name)
def test_each_function_takes_its_params_group_first(stage):
    signature = inspect.signature(getattr(stages, stage.name), eval_str=True)
    positional = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    assert [p.name for p in positional] == ["params"]
    assert positional[0].annotation is Params.model_fields[stage.group].annotation


def _summary(metrics, stage: str, returned: dict) -> dict:
    """The stage's ``<metrics>/<stage>.json``, checked to equal what the function returned (after a JSON round
    trip)."""
    written = json.loads((metrics / STAGES[stage].metrics_file).read_text())
    assert written == json.loads(json.dumps(returned))
    return written


def test_prepare_writes_the_data_and_its_manifest_as_summary(tmp_path):
    info = stages.prepare(DataParams(resolution=8, max_images=50), out=tmp_path / "data", metrics=tmp_path / "m")
    assert info["n_train"] + info["n_test"] == 50 and "files" not in info
    assert set(json.loads((tmp_path / "data" / "manifest.json").read_text())["files"]) >= {"train.npy"}
    _summary(tmp_path / "m", "prepare", info)


def test_builtin_teacher_creates_the_declared_checkpoint_folder(tmp_path):
    stages.prepare(DataParams(max_images=40), out=tmp_path / "data", metrics=tmp_path / METRICS)
    info = stages.teacher(TeacherParams(), data=tmp_path / "data", out=tmp_path / "teacher",
                          checkpoints=tmp_path / "ck", metrics=tmp_path / METRICS)
    assert info["pretrained"] == "builtin:teacher-digits16"
    assert (tmp_path / "ck").is_dir(), "dvc.yaml declares checkpoints/teacher as an output"
    unet = load_model(tmp_path / "teacher")[0]
    assert (unet.config.sample_size, unet.config.in_channels) == (16, 1) and info["params"] == count_params(unet)
    _summary(tmp_path / METRICS, "teacher", info)


@pytest.mark.skipif(not (ASSETS / "latent-digits32" / "unet").is_dir(), reason="latent teacher not trained yet")
def test_builtin_latent_teacher_caches_the_training_latents_it_encodes(tmp_path):
    from diffprune.family.latents import LATENTS_FILE, training_inputs
    from diffprune.family.models import load_diffusion

    stages.prepare(DataParams(resolution=32, max_images=60), out=tmp_path / "data", metrics=tmp_path / METRICS)
    info = stages.teacher(TeacherParams(builtin="latent-digits32"), data=tmp_path / "data",
                          out=tmp_path / "teacher", checkpoints=tmp_path / "ck", metrics=tmp_path / METRICS)
    assert info["family"] == "latent-class" and info["latents"] == [48, 4, 8, 8]
    model, data = load_diffusion(tmp_path / "teacher"), load_prepared(tmp_path / "data")
    cached = training_inputs(model, tmp_path / "teacher", data)
    assert torch.equal(cached, model.encode(data.train)), "the cache holds what encoding gives"
    (tmp_path / "teacher" / LATENTS_FILE).write_bytes(b"damaged")
    assert torch.equal(training_inputs(model, tmp_path / "teacher", data), cached), "a damaged cache is re-encoded"
    _summary(tmp_path / METRICS, "teacher", info)


# ---- the chain: module-scoped fixtures run each stage once; the tests check what it wrote and returned ----

@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("chain")


@pytest.fixture(scope="module")
def teacher_run(root, digits_dir):
    """A tiny teacher trained by the teacher stage on a 100-step schedule (a short diff-pruning loop)."""
    params = TeacherParams(source="scratch", architecture=TINY_ARCH, num_train_timesteps=100,
                           train=tiny_train(steps=4, checkpoint_every=2))
    return stages.teacher(params, data=digits_dir, out=root / "teacher", checkpoints=root / "ck-teacher",
                          metrics=root / "m-teacher")


@pytest.fixture(scope="module")
def score_runs(root, digits_dir, teacher_run):
    runs = {}
    for criterion in ("diff-pruning", "magnitude"):
        runs[criterion] = stages.score(ScoreParams(criterion=criterion, batch_size=8, thr=0.3), data=digits_dir,
                                       teacher=root / "teacher", out=root / f"scores-{criterion}",
                                       metrics=root / f"m-score-{criterion}")
    return runs


PRUNES = {"ratio": ({"pruning_ratio": 0.3}, "diff-pruning"),
          "target_macs": ({"pruning_ratio": None, "target_macs": 0.6}, "magnitude")}


@pytest.fixture(scope="module")
def prune_runs(root, score_runs):
    return {how: stages.prune(PruneParams(**params), teacher=root / "teacher", scores=root / f"scores-{criterion}",
                              out=root / f"pruned-{how}", metrics=root / f"m-prune-{how}")
            for how, (params, criterion) in PRUNES.items()}


FINETUNE = FinetuneParams(**tiny_train(steps=3, ema_decay=0.0).model_dump())


@pytest.fixture(scope="module")
def finetune_run(root, digits_dir, prune_runs):
    """The ratio-pruned student fine-tuned (distilled from the teacher) for 3 steps."""
    return stages.finetune(FINETUNE, data=digits_dir, student=root / "pruned-ratio", teacher=root / "teacher",
                           out=root / "finetuned", checkpoints=root / "ck-finetune", metrics=root / "m-finetune")


def test_teacher_from_scratch_trains_and_saves(root, teacher_run):
    info = teacher_run
    assert info["source"] == "scratch" and info["steps"] == 4
    assert (root / "m-teacher" / "teacher_loss.csv").read_text().count("\n") == 5  # header + one row per step
    unet, scheduler = load_model(root / "teacher")
    assert scheduler.config.num_train_timesteps == 100
    assert (unet.config.sample_size, unet.config.in_channels) == (8, 1) and info["params"] == count_params(unet)
    assert any((root / "ck-teacher").rglob("model.safetensors")), "the training checkpoints are kept"
    _summary(root / "m-teacher", "teacher", info)


@pytest.mark.parametrize(("criterion", "gradients"), [("diff-pruning", True), ("magnitude", False)])
def test_score_writes_gradients_only_for_gradient_criteria(root, score_runs, criterion, gradients):
    info, out = score_runs[criterion], root / f"scores-{criterion}"
    assert (out / "gradients.safetensors").is_file() == gradients
    if gradients:
        assert 1 <= info["timesteps_visited"] <= 100 and info["thr"] == 0.3
        assert (out / "loss_over_t.csv").read_text().count("\n") == info["timesteps_visited"] + 1
        weights = dict(load_model(root / "teacher")[0].named_parameters())
        grads = load_file(out / "gradients.safetensors")
        assert grads and all(grads[n].shape == weights[n].shape for n in grads)
    else:
        assert info["timesteps_visited"] == 0 and info["thr"] is None
    written = _summary(root / f"m-score-{criterion}", "score", info)
    assert json.loads((out / "score.json").read_text()) == written, "out holds the same summary"


def test_the_paper_variant_travels_from_score_to_prune(root, digits_dir, teacher_run, score_runs):
    """score.variant paper: recorded in score.json and used by the prune stage to rank (the loop's own rule,
    one step fewer where the threshold stops it, is tested in test_importance)."""
    info = stages.score(ScoreParams(criterion="diff-pruning", batch_size=8, thr=0.3, variant="paper"),
                        data=digits_dir, teacher=root / "teacher", out=root / "scores-paper",
                        metrics=root / "m-score-paper")
    assert info["variant"] == "paper" and score_runs["diff-pruning"]["variant"] == "diffusers"
    assert score_runs["magnitude"]["variant"] is None, "no gradient pass, no variant"
    assert info["timesteps_visited"] <= score_runs["diff-pruning"]["timesteps_visited"]
    pruned = {v: stages.prune(PruneParams(pruning_ratio=0.5), teacher=root / "teacher", scores=root / f"scores-{s}",
                              out=root / f"pruned-{v}", metrics=root / f"m-prune-{v}")
              for v, s in (("paper", "paper"), ("diffusers", "diff-pruning"))}
    assert pruned["paper"]["variant"] == "paper" and pruned["diffusers"]["variant"] == "diffusers"


@pytest.mark.parametrize("how", PRUNES)
def test_prune_shrinks_the_teacher_as_asked(root, prune_runs, how):
    info = prune_runs[how]
    assert info["criterion"] == PRUNES[how][1]
    assert info["pruned"]["params"] < info["teacher"]["params"] and info["macs_ratio"] < 1
    if how == "target_macs":
        assert info["macs_ratio"] <= 0.6
    else:
        assert info["pruning_ratio"] == 0.3
    unet = load_model(root / f"pruned-{how}")[0]
    assert unet.config.in_channels == 1 and count_params(unet) == info["pruned"]["params"]
    written = _summary(root / f"m-prune-{how}", "prune", info)
    assert written["widths"], "the per-layer widths are part of the summary"


def test_finetune_trains_the_student_the_steps_asked_and_resumes(root, digits_dir, finetune_run):
    info = finetune_run
    assert info["steps"] == 3 and info["distill"] is True and info["resumed_from"] is None
    assert (root / "m-finetune" / "finetune_loss.csv").read_text().count("\n") == 4
    student, tuned = load_model(root / "pruned-ratio")[0], load_model(root / "finetuned")[0]
    assert count_params(tuned) == info["params"] == count_params(student), "fine-tuning keeps the architecture"
    s, t = student.state_dict(), tuned.state_dict()
    assert any(not torch.equal(s[k], t[k]) for k in s), "the weights were trained"
    _summary(root / "m-finetune", "finetune", info)
    again = stages.finetune(FINETUNE, data=digits_dir, student=root / "pruned-ratio", teacher=root / "teacher",
                            out=root / "finetuned-again", checkpoints=root / "ck-finetune",
                            metrics=root / "m-finetune-again")
    assert again["resumed_from"] == 3, "a second run resumes from the kept checkpoints"


def test_evaluate_compares_teacher_and_pruned_student(root, digits_dir, finetune_run, tmp_path):
    params = tiny_eval(tmp_path / "fid")
    result = stages.evaluate(params, data=digits_dir, teacher=root / "teacher", student=root / "finetuned",
                             out=root / "samples", metrics=root / "m-evaluate")
    teacher, pruned = result["teacher"], result["pruned"]
    for r in (teacher, pruned):
        assert len(r["fid_per_seed"]) == len(params.seeds) and r["fid"] >= 0 and r["fid_std"] >= 0
    assert pruned["macs"] < teacher["macs"] and pruned["params"] < teacher["params"] and result["macs_ratio"] < 1
    assert 0 < pruned["ssim"] <= 1 and result["fid_extractor"].startswith("classifier-")
    assert len(list((root / "samples" / "pruned" / "seed0").glob("*.png"))) == params.n_samples
    assert (root / "samples" / "grid_pairs.png").is_file()
    assert (root / "m-evaluate" / "evaluate_fid_vs_macs.csv").read_text().startswith("model,macs_m,fid")
    _summary(root / "m-evaluate", "evaluate", result)
