"""Conditional families through the stages: a tiny Stable-Diffusion-layout folder (tiny CLIP text encoder
and tokenizer made here) goes score → prune → finetune → evaluate → register, and the registered model
generates from a prompt; bad conditional input is one line, exit 2, nothing half-written."""

import json

import mlflow
import numpy as np
import pytest
import yaml
from families import tiny_family
from mlflow.tracking import fluent

from diffprune.evaluation.report import headline
from diffprune.family.models import load_diffusion
from diffprune.flows.cli import main
from diffprune.pipeline import stages
from diffprune.pipeline.stage_params import (
    DataParams,
    FinetuneParams,
    PruneParams,
    RegisterParams,
    ScoreParams,
    TeacherParams,
)
from tiny import TINY_PARAMS, tiny_eval, tiny_train


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A tiny text-to-image model saved the way diffusers saves StableDiffusionPipeline."""
    from diffusers import StableDiffusionPipeline

    tmp = tmp_path_factory.mktemp("sd")
    m = tiny_family("latent-text", tmp)
    StableDiffusionPipeline(vae=m.autoencoder, text_encoder=m.condition.module, tokenizer=m.condition.tokenizer,
                            unet=m.unet, scheduler=m.scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp / "sd", safe_serialization=True)
    return tmp / "sd"


@pytest.mark.slow
def test_a_stable_diffusion_folder_goes_through_every_stage_and_generates_from_a_prompt(sd_folder, tmp_path,
                                                                                        monkeypatch):
    metrics = tmp_path / "metrics"
    data = DataParams(resolution=8, max_images=160, caption_template="a digit {label}")
    summaries = {"prepare": stages.prepare(data, out=tmp_path / "data", metrics=metrics)}
    summaries["teacher"] = stages.teacher(TeacherParams(source="pretrained", pretrained=str(sd_folder)),
                                          data=tmp_path / "data", out=tmp_path / "teacher",
                                          checkpoints=tmp_path / "ck0", metrics=metrics)
    assert summaries["teacher"]["family"] == "latent-text" and summaries["teacher"]["latents"][1:] == [4, 4, 4]
    summaries["score"] = stages.score(ScoreParams(batch_size=8, include_null=True, device="cpu"),
                                      data=tmp_path / "data", teacher=tmp_path / "teacher", out=tmp_path / "scores",
                                      metrics=metrics)
    assert summaries["score"]["timesteps_visited"] > 1
    summaries["prune"] = stages.prune(PruneParams(pruning_ratio=0.3, round_to=2), teacher=tmp_path / "teacher",
                                      scores=tmp_path / "scores", out=tmp_path / "pruned", metrics=metrics)
    assert summaries["prune"]["macs_ratio"] < 0.9
    ft = FinetuneParams(**tiny_train(steps=2, checkpoint_every=1).model_dump(), condition_dropout=0.5)
    summaries["finetune"] = stages.finetune(ft, data=tmp_path / "data", student=tmp_path / "pruned",
                                            teacher=tmp_path / "teacher", out=tmp_path / "finetuned",
                                            checkpoints=tmp_path / "ck1", metrics=metrics)
    summaries["evaluate"] = stages.evaluate(tiny_eval(tmp_path / "fid", guidance_scale=2.0, n_samples=10),
                                            data=tmp_path / "data", teacher=tmp_path / "teacher",
                                            student=tmp_path / "finetuned", out=tmp_path / "samples", metrics=metrics)
    ev = summaries["evaluate"]
    assert ev["family"] == "latent-text" and ev["guidance_scale"] == 2.0
    assert ev["pruned"]["pipeline_s"] > ev["pruned"]["decode_s"] > 0 and ev["pipeline_speedup"] > 0
    assert ev["clip_score"].startswith("not reported: evaluate.clip_model is not set")
    model = load_diffusion(tmp_path / "finetuned")
    assert model.family == "latent-text" and model.unet.config.cross_attention_dim == 24

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(fluent, "_active_experiment_id", None)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("text", artifact_location=(tmp_path / "art").as_uri())
    mlflow.set_experiment(experiment_id=experiment)
    from diffprune.tracking.register import register_version

    summary = headline(summaries)
    assert summary["family"] == "latent-text"
    out = register_version(tmp_path / "finetuned", summary, RegisterParams(model_name="tiny-sd", max_fid_ratio=1e9,
                                                                   max_macs_ratio=1.0, predict_steps=2))
    generator = mlflow.pyfunc.load_model(out["model_uri"])
    images = generator.predict([{"num_images": 2, "seed": 1, "prompt": "a digit 3"},
                                {"num_images": 1, "seed": 1, "prompt": "a digit 3", "guidance_scale": 1.0}])
    assert images.shape == (3, 8, 8, 1) and images.dtype == np.uint8
    with pytest.raises(Exception, match="needs a prompt"):
        generator.predict([{"num_images": 1, "seed": 0, "label": 3}])
    with pytest.raises(Exception, match="guidance_scale must be a number >= 0"):
        generator.predict([{"num_images": 1, "seed": 0, "prompt": "x", "guidance_scale": -1.0}])


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _imagefolder(root, n=6):
    from PIL import Image

    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(root / c / f"{i}.png")


def test_a_captions_file_that_does_not_match_the_images_is_one_line(project, capsys):
    _imagefolder(project / "imgs")
    rows = [{"file": f"a/{i}.png", "text": "x"} for i in range(6)] + [{"file": "b/0.png", "text": "y"}]
    (project / "caps.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    argv = ["prepare", "--set", "dataset=imagefolder", "--set", f"path={project / 'imgs'}",
            "--set", f"captions={project / 'caps.jsonl'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no caption for 5 of the 12 images, e.g. b/1.png" in err
    assert not (project / "data" / "prepared").exists()


def test_several_captions_per_image_are_kept_and_training_draws_among_them(project):
    import torch

    from diffprune.data.datasets import load_prepared
    from diffprune.family.conditioning import TextCondition
    from diffprune.training.loop import _conditions
    from diffprune.training.options import Conditioning

    _imagefolder(project / "imgs")
    rows = [{"file": f"{c}/{i}.png", "text": f"{c}{i}"} for c in "ab" for i in range(6)]
    rows.append({"file": "a/0.png", "text": "a zero, said again"})
    (project / "caps.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["prepare", "--set", "dataset=imagefolder", "--set", f"path={project / 'imgs'}",
                 "--set", f"captions={project / 'caps.jsonl'}", "--set", "test_fraction=0.1"]) == 0
    data = load_prepared(project / "data" / "prepared")
    captions = data.captions["train"] + data.captions["test"]
    assert ["a0", "a zero, said again"] in captions and sum(isinstance(c, list) for c in captions) == 1
    text = TextCondition.__new__(TextCondition)  # the data-side methods need no encoder
    assert all(isinstance(v, str) for v in text.values(data, "train")), "scoring and evaluation: the first"
    two = ["a0", "a zero, said again"]
    picks = {_conditions(text, Conditioning([two]), torch.zeros(1, dtype=torch.long),
                         torch.Generator().manual_seed(step))[0] for step in range(20)}
    assert picks == set(two), "training sees every caption of the image"


def test_a_negative_guidance_scale_is_refused_naming_the_key(project, capsys):
    assert main(["evaluate", "--set", "guidance_scale=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "evaluate.guidance_scale" in err


def test_a_teacher_folder_without_its_autoencoder_is_refused_before_anything_is_written(project, capsys, tmp_path):
    import shutil

    from diffprune.family.models import save_diffusion

    save_diffusion(tiny_family("latent-class", tmp_path), tmp_path / "m")
    shutil.rmtree(tmp_path / "m" / "vae")
    assert main(["prepare"]) == 0
    assert main(["teacher", "--set", "source=pretrained", "--set", f"pretrained={tmp_path / 'm'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lists vae but vae/config.json is missing" in err[0]
    assert not (project / "models" / "teacher").exists()
