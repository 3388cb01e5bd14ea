"""Run by the data-parallel test under `accelerate launch`: each rank trains, then saves what it holds."""

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from diffprune.data.datasets import load_prepared
from diffprune.family.diffusion import Diffusion
from diffprune.family.models import build_unet, make_scheduler
from diffprune.training.loop import train
from tiny import TINY_ARCH, tiny_train

data_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
unet = build_unet(TINY_ARCH, 8, 1)
# Not PartialState(): created before train()'s Accelerator(cpu=True) it would pin both ranks to rank 0.
rank = int(os.environ.get("RANK", "0"))
if rank == 0:
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, out / "init.safetensors")
result = train(Diffusion(unet, make_scheduler()), load_prepared(data_dir).train, tiny_train(steps=4), out / "ckpt")
save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, out / f"rank{rank}.safetensors")
if rank == 0:
    (out / "world_size").write_text(str(result.world_size))
