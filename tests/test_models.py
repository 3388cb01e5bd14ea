import pytest
import torch
from diffusers import DDPMPipeline

from diffprune.common.errors import DiffpruneError
from diffprune.family import models
from diffprune.family.models import BUILTIN_TEACHER, load_model, load_pretrained, make_scheduler, save_model


def test_save_load_roundtrip_is_exact(tiny_unet, tmp_path):
    save_model(tiny_unet, make_scheduler(), tmp_path / "m")
    unet, scheduler = load_model(tmp_path / "m")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 500])
    assert torch.equal(tiny_unet.eval()(x, t).sample, unet(x, t).sample)
    assert scheduler.config.num_train_timesteps == 1000
    assert not list((tmp_path / "m").rglob("*.bin")) and not list((tmp_path / "m").rglob("*.pt*"))


def test_teacher_loads_from_a_local_save_pretrained_directory(tiny_unet, tmp_path):
    DDPMPipeline(unet=tiny_unet, scheduler=make_scheduler()).save_pretrained(tmp_path / "pipe")
    unet = load_pretrained(str(tmp_path / "pipe")).unet
    assert tuple(unet.config.block_out_channels) == tuple(tiny_unet.config.block_out_channels)


def test_hub_id_that_cannot_be_fetched_gives_one_line(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore lines")

    monkeypatch.setattr(models.DiffusionPipeline, "from_pretrained", offline)
    with pytest.raises(DiffpruneError) as info:
        load_pretrained("google/ddpm-cifar10-32")
    assert "google/ddpm-cifar10-32" in str(info.value) and "\n" not in str(info.value)


def test_unknown_reference_is_not_sent_to_the_hub():
    with pytest.raises(DiffpruneError, match="no such directory"):
        load_pretrained("./not/here")


def test_damaged_model_directory_is_refused(tiny_model_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    (bad / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x80\x04pickle?")
    with pytest.raises(DiffpruneError, match="not a valid safetensors file"):
        load_model(bad)
    with pytest.raises(DiffpruneError, match="not a model directory"):
        load_model(tmp_path)


@pytest.mark.skipif(not (BUILTIN_TEACHER / "unet" / "config.json").is_file(), reason="teacher not trained yet")
def test_builtin_teacher_is_prunable_and_has_attention():
    unet, _ = load_model(BUILTIN_TEACHER)
    cfg = unet.config
    assert cfg.sample_size == 16 and cfg.in_channels == 1
    assert any("Attn" in b for b in cfg.down_block_types)
    assert all(w % cfg.norm_num_groups == 0 and w // cfg.norm_num_groups >= 2 for w in cfg.block_out_channels)
