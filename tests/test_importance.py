import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffprune.common.runtime import derive_seed
from diffprune.family.diffusion import Diffusion, images_to_tensor
from diffprune.family.models import make_scheduler
from diffprune.pruning.importance import ScoreOptions, accumulate_gradients


def _pass(unet, digits, criterion, thr, T=100):
    x0 = images_to_tensor(digits.train[:8])
    return accumulate_gradients(Diffusion(unet, make_scheduler(T)), [x0], ScoreOptions(criterion, thr), progress=False)


def test_diff_pruning_visits_fewer_timesteps_as_thr_grows(trained_tiny, digits):
    visited = [len(_pass(trained_tiny, digits, "diff-pruning", thr).timesteps) for thr in (0.0, 0.05, 0.3, 0.7)]
    assert visited[0] == 100
    assert visited == sorted(visited, reverse=True) and visited[-1] < visited[0]
    result = _pass(trained_tiny, digits, "diff-pruning", 0.3)
    assert result.timesteps == list(range(len(result.timesteps)))  # t = 0, 1, 2, … from the least noisy
    assert result.losses[-1] < 0.3 * max(result.losses)  # the first sub-threshold step is included
    assert all(v >= 0.3 * max(result.losses[: i + 1]) for i, v in enumerate(result.losses[:-1]))


def test_thr_zero_accumulates_the_taylor_gradient(tiny_unet, digits):
    a = _pass(tiny_unet, digits, "diff-pruning", 0.0, T=30)
    b = _pass(tiny_unet, digits, "taylor", 0.05, T=30)  # taylor ignores thr: all T steps
    assert a.grads.keys() == b.grads.keys() and len(b.timesteps) == 30
    assert all(torch.equal(a.grads[k], b.grads[k]) for k in a.grads)


def test_gradients_are_the_sum_over_visited_timesteps(tiny_unet, digits):
    full = _pass(tiny_unet, digits, "diff-pruning", 0.0, T=3)
    x0 = images_to_tensor(digits.train[:8])
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(derive_seed(0, 0)))
    alphas = make_scheduler(3).alphas_cumprod
    tiny_unet.zero_grad()
    for t in range(3):
        xt = alphas[t].sqrt() * x0 + (1 - alphas[t]).sqrt() * eps
        F.mse_loss(tiny_unet(xt, torch.full((8,), t)).sample, eps).backward()
    manual = {n: p.grad for n, p in tiny_unet.named_parameters()}
    assert all(torch.allclose(full.grads[k], manual[k], atol=1e-6) for k in full.grads)
    tiny_unet.zero_grad(set_to_none=True)


@pytest.mark.parametrize("timestep_batch", [1, 3, 16])
def test_n_batches_average_the_per_batch_gradients_and_losses(trained_tiny, digits, timestep_batch):
    """Three batches, each with its own noise: the pass's gradient is the mean of each batch's own gradient
    (summed over the visited t), its per-t loss the mean of the batches' losses, and it stops where that mean
    loss first falls below thr × the maximum so far (the diff-pruning rule, exercised here: it stops early,
    inside a chunk when several timesteps share a forward/backward)."""
    seed, thr, T = 5, 0.7, 100
    batches = list(images_to_tensor(digits.train[:24]).split(8))
    options = ScoreOptions("diff-pruning", thr, seed=seed, timestep_batch=timestep_batch)
    result = accumulate_gradients(Diffusion(trained_tiny, make_scheduler(T)), batches, options, progress=False)
    alphas = make_scheduler(T).alphas_cumprod
    noises = [torch.randn(x0.shape, generator=torch.Generator().manual_seed(derive_seed(seed, b)))
              for b, x0 in enumerate(batches)]
    params = dict(trained_tiny.named_parameters())
    own = [{n: torch.zeros_like(p) for n, p in params.items()} for _ in batches]  # each batch's own gradient
    visited, losses = [], []
    trained_tiny.eval()
    for t in range(T):
        mean_loss = 0.0
        for b, (x0, eps) in enumerate(zip(batches, noises, strict=True)):
            trained_tiny.zero_grad(set_to_none=True)
            xt = alphas[t].sqrt() * x0 + (1 - alphas[t]).sqrt() * eps
            loss = F.mse_loss(trained_tiny(xt, torch.full((8,), t)).sample, eps)
            loss.backward()
            for n, p in params.items():
                own[b][n] += p.grad
            mean_loss += loss.item() / len(batches)
        visited.append(t)
        losses.append(mean_loss)
        if mean_loss < thr * max(losses):
            break
    trained_tiny.zero_grad(set_to_none=True)
    assert 1 < len(visited) < T, "the threshold must stop the loop early for this test to check the rule"
    assert timestep_batch == 1 or len(visited) % timestep_batch, "the stop must fall inside a chunk"
    assert result.timesteps == visited
    assert result.losses == [pytest.approx(v, rel=1e-5) for v in losses]
    assert result.grads.keys() == params.keys()
    assert any(not torch.allclose(own[0][n], own[1][n]) for n in params), "the batches' gradients differ"
    for name, grad in result.grads.items():
        mean = sum(g[name] for g in own) / len(own)
        assert torch.allclose(grad, mean, rtol=1e-4, atol=1e-6), name


def test_conditional_pass_is_the_hand_computed_sum_with_the_batches_conditions(tmp_path):
    """A class-conditional latent model, real labels and their null twin (include_null): each t adds
    ∇ of the mean of both losses, the same noise serving a batch under both contexts."""
    from families import tiny_family

    model = tiny_family("latent-class", tmp_path)
    unet, T, seed = model.unet, 4, 3
    x0 = model.encode(np.random.default_rng(0).integers(0, 255, (6, 8, 8, 1), dtype=np.uint8))
    labels = [0, 1, 2, 3, 4, 5]
    ctx, null = model.context(labels), model.null_context(6)
    result = accumulate_gradients(Diffusion(unet, make_scheduler(T)), [x0, x0],
                                  ScoreOptions("diff-pruning", 0.0, seed=seed, timestep_batch=3), progress=False,
                                  contexts=[ctx, null])
    alphas = make_scheduler(T).alphas_cumprod
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(derive_seed(seed, 0)))
    unet.zero_grad(set_to_none=True)
    losses = []
    for t in range(T):
        xt = alphas[t].sqrt() * x0 + (1 - alphas[t]).sqrt() * eps
        ts = torch.full((6,), t)
        loss = (F.mse_loss(unet(xt, ts, encoder_hidden_states=ctx).sample, eps)
                + F.mse_loss(unet(xt, ts, encoder_hidden_states=null).sample, eps)) / 2
        loss.backward()
        losses.append(loss.item())
    manual = {n: p.grad for n, p in unet.named_parameters() if p.grad is not None}
    assert result.timesteps == list(range(T)) and result.losses == [pytest.approx(v, rel=1e-5) for v in losses]
    assert result.grads.keys() == manual.keys()
    assert all(torch.allclose(result.grads[k], manual[k], atol=1e-6) for k in manual)
    unet.zero_grad(set_to_none=True)


@pytest.mark.parametrize("criterion, thr", [("diff-pruning", 0.3), ("taylor", 0.0)])
def test_timestep_batches_equal_the_sequential_loop(trained_tiny, digits, criterion, thr):
    """Several timesteps per forward/backward: the same visited steps, losses and gradients as one at a time
    (up to float rounding, measured against each tensor's scale and the whole gradient's)."""
    x0 = images_to_tensor(digits.train[:8])
    model = Diffusion(trained_tiny, make_scheduler(60))
    one = accumulate_gradients(model, [x0], ScoreOptions(criterion, thr, timestep_batch=1), progress=False)
    for k in (4, 7, 64):
        many = accumulate_gradients(model, [x0], ScoreOptions(criterion, thr, timestep_batch=k), progress=False)
        assert many.timesteps == one.timesteps
        assert many.losses == [pytest.approx(v, rel=1e-5) for v in one.losses]
        scale = max(g.abs().max() for g in one.grads.values())
        assert many.grads.keys() == one.grads.keys()
        for name, grad in one.grads.items():
            torch.testing.assert_close(many.grads[name], grad, rtol=1e-4, atol=1e-6 * float(scale), msg=name)


def test_paper_variant_sums_the_error_and_stops_before_the_sub_threshold_step(trained_tiny, digits):
    """ddpm_exp's loop by hand: loss = squared error summed over C, H, W and averaged over the batch; the
    maximum is updated, then the loop breaks *before* backward, so the first sub-threshold step is left out."""
    seed, thr, T = 2, 0.3, 100
    x0 = images_to_tensor(digits.train[:8])
    sched = make_scheduler(T)
    model = Diffusion(trained_tiny, sched)
    result = accumulate_gradients(model, [x0], ScoreOptions("diff-pruning", thr, seed, 4, "paper"), progress=False)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(derive_seed(seed, 0)))
    alphas = sched.alphas_cumprod
    trained_tiny.eval().zero_grad(set_to_none=True)
    visited, losses, loss_max = [], [], 0.0
    for t in range(T):
        xt = alphas[t].sqrt() * x0 + (1 - alphas[t]).sqrt() * eps
        loss = (trained_tiny(xt, torch.full((8,), t)).sample - eps).pow(2).sum(dim=(1, 2, 3)).mean()
        loss_max = max(loss_max, loss.item())
        if loss.item() < thr * loss_max:
            break
        loss.backward()
        visited.append(t)
        losses.append(loss.item())
    manual = {n: p.grad.clone() for n, p in trained_tiny.named_parameters() if p.grad is not None}
    trained_tiny.zero_grad(set_to_none=True)
    diffusers = accumulate_gradients(model, [x0], ScoreOptions("diff-pruning", thr, seed), progress=False)
    assert 1 < len(visited) < T and result.timesteps == visited
    assert diffusers.timesteps == [*visited, len(visited)], "the diffusers path keeps the sub-threshold step"
    assert result.losses == [pytest.approx(v, rel=1e-5) for v in losses]
    scale = max(float(g.abs().max()) for g in manual.values())
    for name, grad in manual.items():
        torch.testing.assert_close(result.grads[name], grad, rtol=1e-4, atol=1e-6 * scale, msg=name)
