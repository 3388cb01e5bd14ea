import json
import pickle
import shutil
from unittest import mock

import pytest
import torch
from diffusers import DDIMPipeline, DDPMPipeline

from diffprune.common.errors import DiffpruneError
from diffprune.family.models import load_model, load_pipeline, make_scheduler, save_model
from diffprune.pruning.structural import prune_unet


@pytest.fixture
def pruned_dir(tiny_unet, tmp_path):
    unet = prune_unet(tiny_unet, 0.5, "random")
    save_model(unet, make_scheduler(), tmp_path / "pruned")
    return unet, tmp_path / "pruned"


def _no_unpickling():
    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    return mock.patch.multiple(pickle, load=refuse, loads=refuse, Unpickler=refuse)


def test_save_load_is_an_exact_replica_without_pickle(pruned_dir):
    unet, path = pruned_dir
    with _no_unpickling(), mock.patch.object(torch, "load", side_effect=AssertionError("torch.load used")):
        loaded, _ = load_model(path)
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in unet.state_dict().items()}
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 700])
    assert torch.equal(unet.eval()(x, t).sample, loaded(x, t).sample)
    assert loaded.down_blocks[0].downsamplers[0].channels == unet.down_blocks[0].downsamplers[0].channels


def test_load_pipeline_gives_ready_diffusers_pipelines(pruned_dir):
    _, path = pruned_dir
    ddim = load_pipeline(path, "ddim")
    assert isinstance(ddim, DDIMPipeline)
    assert ddim(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (1, 8, 8, 1)
    assert isinstance(load_pipeline(path, "ddpm"), DDPMPipeline)
    with pytest.raises(DiffpruneError):
        load_pipeline(path, "euler")


def test_weights_that_do_not_fit_the_json_are_refused(pruned_dir):
    _, path = pruned_dir
    arch_path = path / "unet" / "architecture.json"
    arch = json.loads(arch_path.read_text())
    arch["modules"]["conv_in"]["tensors"]["weight"][0] += 1
    arch_path.write_text(json.dumps(arch))
    with pytest.raises(DiffpruneError) as info:
        load_model(path)
    assert "conv_in.weight" in str(info.value) and "\n" not in str(info.value)


def test_pickle_renamed_to_safetensors_is_refused(pruned_dir, tmp_path):
    _, path = pruned_dir
    weights = path / "unet" / "diffusion_pytorch_model.safetensors"
    with open(weights, "wb") as fh:
        pickle.dump({"x": 1}, fh)
    with _no_unpickling(), pytest.raises(DiffpruneError) as info:
        load_model(path)
    assert "not a valid safetensors file" in str(info.value) and "\n" not in str(info.value)


def test_missing_tensor_and_unknown_module_are_refused(pruned_dir, tmp_path):
    _, path = pruned_dir
    other = tmp_path / "other"
    shutil.copytree(path, other)
    arch_path = other / "unet" / "architecture.json"
    arch = json.loads(arch_path.read_text())
    arch["modules"]["not_a_module"] = {"type": "Conv2d", "attrs": {}, "tensors": {}}
    arch_path.write_text(json.dumps(arch))
    with pytest.raises(DiffpruneError, match="not_a_module"):
        load_model(other)
    from safetensors.torch import load_file, save_file

    weights = path / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state.pop("conv_in.bias")
    save_file(state, weights)
    with pytest.raises(DiffpruneError, match="missing"):
        load_model(path)
