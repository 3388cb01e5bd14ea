import numpy as np
import pytest

from diffprune.evaluation.sampling import SamplerOptions, grid, paired_grid, sample, save_pngs
from diffprune.family.models import make_scheduler


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_fixed_seed_is_reproducible_and_seeds_differ(tiny_unet, sampler):
    options = SamplerOptions(sampler, steps=4, batch_size=4)
    a = sample(tiny_unet, make_scheduler(), 6, 0, options, progress=False)
    b = sample(tiny_unet, make_scheduler(), 6, 0, options, progress=False)
    c = sample(tiny_unet, make_scheduler(), 6, 1, options, progress=False)
    assert a.shape == (6, 8, 8, 1) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_image_i_depends_on_its_own_noise_only(tiny_unet):
    options = SamplerOptions(steps=3, batch_size=3)
    few = sample(tiny_unet, make_scheduler(), 3, 0, options, progress=False)
    more = sample(tiny_unet, make_scheduler(), 6, 0, options, progress=False)
    assert np.array_equal(few, more[:3])


def test_pngs_and_grids(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 255, (10, 8, 8, 1), dtype=np.uint8)
    paths = save_pngs(imgs, tmp_path)
    assert len(paths) == 10 and paths[0].name == "000000.png"
    assert grid(imgs, cols=5).size == (5 * 9 + 1, 2 * 9 + 1)
    assert paired_grid(imgs, imgs, cols=5, scale=1).size == (46, 4 * 9 + 1)
