"""Mechanics of the diffusion FK model, the baselines and the rewards: time indexing,
compute counters, reproducibility, conditioning under resampling, bad input."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler, UNet2DModel

import ppl_scaling as pps
from ppl_scaling.diffusion import baselines, rewards
from ppl_scaling.diffusion.gmm import GaussianMixture, LinearReward
from ppl_scaling.diffusion.model import DiffusionModel, fk_schedule, potential_steps, soft_value
from ppl_scaling.diffusion.steering import fk_steering

GMM = GaussianMixture.isotropic([0.5, 0.5], [[-1.5], [1.5]], std=0.5)
SCHED = DDPMScheduler(clip_sample=False)
REWARD = LinearReward([1.0])


def gmm_model(**kw):
    kw.setdefault("num_inference_steps", 5)
    return DiffusionModel(GMM.denoiser(SCHED), SCHED, (1,), dtype=torch.float64, **kw)


def test_time_indexing_and_counters():
    K, N = 5, 8
    res = pps.smc(gmm_model(reward=REWARD, num_inference_steps=K), N, seed=0)
    assert len(res.ess) == K + 1  # t = 0 (noise) .. K (clean sample)
    c = res.compute
    assert (c["nfe"], c["denoiser_calls"]) == (N * K, K)
    assert (c["reward_evals"], c["reward_calls"]) == (N * (K + 1), K + 1)
    final = res.particles
    assert final.model_output is None and torch.equal(final.x0, final.x)
    np.testing.assert_allclose(final.reward, final.x[:, 0].numpy())  # the final reward is r(sample)
    sparse = pps.smc(gmm_model(reward=REWARD, num_inference_steps=K, potential_at=[2]), N, seed=0)
    assert sparse.compute["reward_evals"] == 2 * N  # step 2 and the final step


def test_fk_schedule_maps_loop_indices_to_resampling_steps():
    assert fk_schedule(100, every=5, start=5, end=30) == [6, 11, 16, 21, 26, 31]
    assert fk_schedule(10) == list(range(1, 11))
    assert potential_steps([6, 11]) == [5, 10]
    out = fk_steering(GMM.denoiser(SCHED), SCHED, (1,), REWARD, num_particles=16, lam=1.0, num_inference_steps=10,
                      resample_every=3, t_start=1, t_end=7, dtype=torch.float64, seed=0)
    assert np.flatnonzero(out.smc.resampled).tolist() == [2, 5, 8]
    assert out.compute["reward_evals"] == 16 * 4  # potentials at steps 1, 4, 7 and the final step 10


def test_reproducible_and_rerunnable():
    m = gmm_model(reward=REWARD, lam=2.0)
    a, b = pps.smc(m, 16, seed=3), pps.smc(m, 16, seed=3)  # same model object: fresh scheduler state per run
    assert torch.equal(a.particles.x, b.particles.x) and np.array_equal(a.log_weights, b.log_weights)
    assert not torch.equal(a.particles.x, pps.smc(m, 16, seed=4).particles.x)
    c = pps.smc(gmm_model(reward=REWARD, lam=2.0), 16, seed=3)
    assert torch.equal(a.particles.x, c.particles.x)


def test_conditioning_is_resampled_with_the_latents():
    """x0_hat = cond (a 'sample'-predicting denoiser): each final particle keeps its ancestor's cond."""
    sched = DDPMScheduler(clip_sample=False, prediction_type="sample")
    N = 12
    cond = torch.arange(N, dtype=torch.float64)[:, None]
    m = DiffusionModel(lambda x, t, c: c.expand_as(x), sched, (1,), reward=lambda x: x[:, 0], lam=0.5,
                       num_inference_steps=6, cond=cond, dtype=torch.float64)
    res = pps.smc(m, N, ess_threshold=1.0, seed=0, store_history=True)
    assert res.resampled[1:].all()
    origin = res.lineage()[0]
    torch.testing.assert_close(res.particles.cond[:, 0], cond[origin, 0])
    torch.testing.assert_close(res.particles.x, res.particles.cond)  # last DDPM step returns x0_hat exactly
    assert len(np.unique(origin)) < N  # selection happened (toward large cond)
    with pytest.raises(ValueError, match="one row per particle"):
        pps.smc(m, N + 1, seed=0)


def test_intermediate_options():
    np.testing.assert_allclose(soft_value(np.array([[0.0, np.log(3.0)]]), 1.0), [np.log(2.0)])
    np.testing.assert_allclose(soft_value(np.array([[1.0, 3.0]]), 0.0), [2.0])
    seen = []

    def value(x, t):
        seen.append(int(t))
        return x[:, 0]

    res = pps.smc(gmm_model(reward=REWARD, intermediate=value), 4, seed=0)
    assert seen == [int(t) for t in gmm_model().process.timesteps] and res.compute["intermediate_calls"] == 5
    many = pps.smc(gmm_model(reward=REWARD, intermediate="many", num_x0_samples=3), 4, seed=0)
    assert many.compute["reward_evals"] == 4 * 3 * 5 + 4
    with pytest.raises(ValueError, match="intermediate"):
        gmm_model(reward=REWARD, intermediate="mean")


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match="deterministic"):
        DiffusionModel(GMM.denoiser(SCHED), DDIMScheduler(), (1,), eta=0.0)
    with pytest.raises(ValueError, match="stochastic"):
        DiffusionModel(GMM.denoiser(SCHED), PNDMScheduler(), (1,))
    with pytest.raises(ValueError, match="num_inference_steps"):
        gmm_model(num_inference_steps=0)
    with pytest.raises(ValueError, match="potential_at"):
        gmm_model(potential_at=[9])
    with pytest.raises(pps.PotentialError, match="shape"):
        pps.smc(gmm_model(reward=lambda x: x), 4, seed=0)
    with pytest.raises(pps.PotentialError, match="NaN"):
        pps.smc(gmm_model(reward=lambda x: x[:, 0] * float("nan")), 4, seed=0)
    with pytest.raises(ValueError, match="sample_shape"):
        pps.smc(DiffusionModel(lambda x, t: x[:, :1], SCHED, (2,), num_inference_steps=3), 4, seed=0)
    with pytest.raises(ValueError, match="sample_shape"):
        pps.smc(DiffusionModel(GMM.denoiser(SCHED), SCHED, (2,), num_inference_steps=3), 4, seed=0)


def test_unet_images_and_weight_free_rewards():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                           down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                           layers_per_block=1, norm_num_groups=4).eval()
    sched = DDIMScheduler()
    out = fk_steering(unet, sched, (1, 8, 8), rewards.brightness, decode=rewards.to_unit_range, num_particles=3,
                      lam=5.0, num_inference_steps=4, ess_threshold=1.0, seed=0)
    assert out.samples.shape == (3, 1, 8, 8) and out.compute["nfe"] == 12
    flat, noise = torch.full((1, 3, 16, 16), 0.5), torch.rand((1, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    assert rewards.jpeg_compressibility(flat)[0] > rewards.jpeg_compressibility(noise)[0]
    assert rewards.jpeg_incompressibility(noise)[0] > 0
    torch.testing.assert_close(rewards.brightness(torch.stack([flat[0], noise[0]])),
                               torch.tensor([0.5, float(noise.mean())]))


def test_classifier_reward_and_lazy_loaders():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    r = rewards.ClassifierReward(lambda x: x, target=1)(logits)
    torch.testing.assert_close(r, torch.log_softmax(logits.double(), 1)[:, 1])
    per_sample = rewards.ClassifierReward(lambda x: x, target=torch.tensor([0, 2]))(logits)
    torch.testing.assert_close(per_sample, torch.log_softmax(logits.double(), 1)[[0, 1], [0, 2]])
    with pytest.raises(ValueError, match="logits"):
        rewards.ClassifierReward(lambda x: x[:, 0], target=0)(logits)
    with pytest.raises(ImportError, match="pip install image-reward"):
        rewards.image_reward("/nonexistent/ImageReward.pt", "a cat")


def test_baselines_compute_and_selection():
    K, kw = 6, {"num_inference_steps": 6, "dtype": torch.float64, "seed": 0}
    bon = baselines.best_of_n(GMM.denoiser(SCHED), SCHED, (1,), REWARD, n=10, **kw)
    assert bon.compute["nfe"] == 10 * K and bon.compute["reward_evals"] == 10
    assert float(bon.best[0]) == pytest.approx(bon.rewards.max())
    is_ = baselines.importance_sampling(GMM.denoiser(SCHED), SCHED, (1,), REWARD, n=10, lam=0.7, **kw)
    np.testing.assert_allclose(is_.weights, np.exp(0.7 * is_.rewards) / np.exp(0.7 * is_.rewards).sum())
    assert is_.compute["reward_evals"] == 10 and not is_.smc.resampled.any()
    sv = baselines.svdd(GMM.denoiser(SCHED), SCHED, (1,), REWARD, num_particles=8, num_candidates=4, **kw)
    assert sv.compute["nfe"] == 8 + (K - 1) * 8 * 4 and sv.compute["reward_evals"] == K * 8 * 4
    assert sv.rewards.mean() > 1.0  # local argmax search lands in the right mode
    soft = baselines.svdd(GMM.denoiser(SCHED), SCHED, (1,), REWARD, num_particles=8, num_candidates=4, alpha=0.5, **kw)
    assert soft.compute == sv.compute and soft.samples.shape == (8, 1)
    ddim = DDIMScheduler(clip_sample=False)
    zo = baselines.zero_order_search(GMM.denoiser(ddim), ddim, (1,), REWARD, num_candidates=3, rounds=3, **kw)
    assert np.all(np.diff(zo.rewards) >= 0) and zo.compute["nfe"] == K * (1 + 3 * 3)
    ps = baselines.search_over_paths(GMM.denoiser(ddim), ddim, (1,), REWARD, num_paths=3, num_branches=2,
                                     start=2, backward=2, forward=1, **kw)
    assert ps.samples.shape == (3, 1) and ps.compute["reward_evals"] > 0
    np.testing.assert_allclose(ps.rewards, ps.samples[:, 0].numpy())
