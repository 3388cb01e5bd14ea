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


def test_a_model_hashes_alike_in_every_process_and_after_a_round_trip(tmp_path):
    """A fresh diffusers model lists its defaulted arguments in set order: the hash must not see that order."""
    import os
    import subprocess
    import sys

    from diffprune.family.models import load_diffusion, model_hash

    code = ("import torch; from diffusers import UNet2DModel; from diffprune.family.models import model_hash\n"
            "torch.manual_seed(0)\n"
            "u = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),\n"
            "    down_block_types=('DownBlock2D',) * 2, up_block_types=('UpBlock2D',) * 2, norm_num_groups=8)\n"
            "print(model_hash(u))\n"
            "import sys; from diffprune.family.models import save_model, make_scheduler\n"
            "save_model(u, make_scheduler(), sys.argv[1])\n")
    hashes = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / seed)], capture_output=True, text=True,
                             env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        hashes.add(out.stdout.strip())
    assert len(hashes) == 1
    assert model_hash(load_diffusion(tmp_path / "1").unet) == hashes.pop()
