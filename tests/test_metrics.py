import numpy as np
import pytest
import torch

from diffprune.evaluation.metrics import fid_reference, latency_pair, ssim
from diffprune.evaluation.sampling import save_pngs
from diffprune.family.diffusion import Diffusion
from diffprune.family.models import make_scheduler
from diffprune.pruning.macs import macs_and_params
from tiny import tiny_eval


@pytest.fixture(scope="module")
def fid_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("fid")


@pytest.fixture(scope="module")
def reference(digits, fid_cache):
    return fid_reference(digits, tiny_eval(fid_cache), torch.device("cpu"))


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise(digits, reference, tmp_path):
    feats = reference.features(_folder(digits.train, tmp_path / "clean"))
    assert reference.fid(feats) == pytest.approx(0.0, abs=1e-3)
    rng = np.random.default_rng(0)
    fids = []
    for i, sigma in enumerate((20, 60, 120)):
        noisy = np.clip(digits.train + rng.normal(0, sigma, digits.train.shape), 0, 255).astype(np.uint8)
        fids.append(reference.fid(reference.features(_folder(noisy, tmp_path / f"n{i}"))))
    assert 0 < fids[0] < fids[1] < fids[2]


def test_reference_is_cached_and_names_its_extractor(digits, reference, fid_cache, tmp_path, monkeypatch):
    """A second call on the same cache folder trains no classifier, extracts no features and rewrites no file:
    it loads the first call's extractor and statistics (same features for the same input, same mu/sigma)."""
    import diffprune.evaluation.features
    import diffprune.evaluation.metrics

    def recomputed(*args, **kwargs):
        raise AssertionError("the cached classifier or statistics were computed again")

    def snapshot():
        return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(fid_cache.rglob("*")) if p.is_file()}

    before = snapshot()
    assert any(p.name == "classifier.safetensors" for p in before) and any(p.name == "train_mu.npy" for p in before)
    monkeypatch.setattr(diffprune.evaluation.features, "_train_classifier", recomputed)
    monkeypatch.setattr(diffprune.evaluation.metrics.FidReference, "features", recomputed)
    with pytest.raises(AssertionError, match="computed again"):  # the patches bite where nothing is cached
        fid_reference(digits, tiny_eval(tmp_path / "empty"), torch.device("cpu"))
    again = fid_reference(digits, tiny_eval(fid_cache), torch.device("cpu"))
    assert snapshot() == before, "the cache was rewritten"
    assert reference.name.startswith("classifier-64d") and again.name == reference.name
    batch = torch.from_numpy(np.array(digits.test[:16])).permute(0, 3, 1, 2).float().expand(-1, 3, -1, -1)
    assert torch.equal(again.extract(batch), reference.extract(batch))  # the same classifier weights
    assert np.array_equal(again.mu, reference.mu) and np.array_equal(again.sigma, reference.sigma)
    assert np.array_equal(again.test_features, reference.test_features)
    assert again.info == reference.info and "test_accuracy" in reference.info


def test_ssim_identical_is_one_and_matches_skimage():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 16, 16, 1), dtype=np.uint8)
    b = np.clip(a + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    assert np.allclose(ssim(a, a), 1.0)
    ours = ssim(a, b)
    ref = [structural_similarity(a[i, ..., 0] / 255, b[i, ..., 0] / 255, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=1.0) for i in range(3)]
    assert np.allclose(ours, ref, atol=1e-9) and (ours < 1).all()


def test_macs_params_and_latency(tiny_unet):
    macs, params = macs_and_params(tiny_unet)
    assert params == sum(p.numel() for p in tiny_unet.parameters()) and macs > params
    model = Diffusion(tiny_unet, make_scheduler())
    lat = latency_pair({"a": model, "b": model}, batch=2, steps=2, repeats=1, device=torch.device("cpu"))
    assert set(lat) == {"a", "b"} and all(v["denoise_s"] > 0 and v["decode_s"] == 0 for v in lat.values())


def _folder(images, path):
    save_pngs(images, path)
    return path


def test_inception_requested_offline_without_weights_says_where_to_put_them(digits, tmp_path, monkeypatch):
    import urllib.error

    import cleanfid.downloads_helper

    from diffprune.common.errors import DiffpruneError

    def offline(fpath):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(cleanfid.downloads_helper, "check_download_inception", offline)
    params = tiny_eval(tmp_path / "fid", fid_extractor="inception",
                       inception_path=str(tmp_path / "w" / "inception-2015-12-05.pt"))
    with pytest.raises(DiffpruneError) as info:
        fid_reference(digits, params, torch.device("cpu"))
    assert "inception-2015-12-05.pt" in str(info.value) and "\n" not in str(info.value)


def test_auto_extractor_falls_back_to_the_classifier_without_weights(digits, tmp_path):
    params = tiny_eval(tmp_path / "fid", inception_path=str(tmp_path / "absent" / "inception-2015-12-05.pt"))
    assert fid_reference(digits, params, torch.device("cpu")).name.startswith("classifier-")


def test_frechet_distance_matches_the_sqrtm_formula():
    from scipy import linalg

    from diffprune.evaluation.metrics import frechet_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 16)), rng.normal(0.3, 1.2, size=(300, 16)) @ rng.normal(size=(16, 16))
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6)
