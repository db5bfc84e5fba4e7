"""Mechanics of the diffusion dynamics, the diffusion methods and the rewards: time indexing,
the compute ledger, reproducibility, conditioning under resampling, the search methods'
selections, bad input."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler, UNet2DModel

import ppl_scaling as pps
from ppl_scaling import Tilted
from ppl_scaling.diffusion import rewards
from ppl_scaling.diffusion.gmm import GaussianMixture, LinearReward
from ppl_scaling.diffusion.model import DiffusionModel, soft_value
from ppl_scaling.diffusion.process import ReverseProcess, dynamic_threshold
from ppl_scaling.diffusion.schedules import fk_schedule, potential_steps
from ppl_scaling.samplers.best_of_n import best_of_n
from ppl_scaling.samplers.fk_steering import fk_steering
from ppl_scaling.samplers.importance import importance_sampling
from ppl_scaling.samplers.noise_search import random_search, search_over_paths, zero_order_search
from ppl_scaling.samplers.svdd import svdd

GMM = GaussianMixture.isotropic([0.5, 0.5], [[-1.5], [1.5]], std=0.5)
SCHED = DDPMScheduler(clip_sample=False)
REWARD = LinearReward([1.0])


def gmm_model(sched=SCHED, **kw):
    kw.setdefault("num_inference_steps", 5)
    return DiffusionModel(GMM.denoiser(sched), sched, (1,), dtype=torch.float64, **kw)


def test_time_indexing_and_ledger():
    K, N = 5, 8
    res = pps.smc(Tilted(gmm_model(num_inference_steps=K), REWARD), N, seed=0)
    assert len(res.ess) == K + 1  # t = 0 (noise) .. K (clean sample)
    assert (res.ledger.nfe, res.ledger.reward_calls) == (N * K, N * (K + 1))
    final = res.particles
    assert final.model_output is None and torch.equal(final.x0, final.x)
    np.testing.assert_allclose(final.reward, final.x[:, 0].numpy())  # the final reward is r(sample)
    sparse = pps.smc(Tilted(gmm_model(num_inference_steps=K), REWARD, at=[2]), N, seed=0)
    assert sparse.ledger.reward_calls == 2 * N  # step 2 and the final step
    torch.testing.assert_close(gmm_model().sample(N, np.random.default_rng(0)),
                               pps.smc(gmm_model(), N, seed=0).particles.x)  # sample = the untilted run


def test_fk_schedule_maps_loop_indices_to_resampling_steps():
    assert fk_schedule(100, every=5, start=5, end=30) == [6, 11, 16, 21, 26, 31]
    assert fk_schedule(10) == list(range(1, 11))
    assert potential_steps([6, 11]) == [5, 10]
    out = fk_steering(gmm_model(num_inference_steps=10), 16, potential=REWARD, lam=1.0, resample_every=3, t_start=1,
                      t_end=7, seed=0)
    assert np.flatnonzero(out.resampled).tolist() == [2, 5, 8]
    assert out.ledger.reward_calls == 16 * 4  # potentials at steps 1, 4, 7 and the final step 10
    assert out.info["method"] == "fk_steering" and out.info["selection_rule"] == "argmax_weight"
    np.testing.assert_allclose(out.rewards, out.particles.x[:, 0].numpy())


def test_fk_schedule_refuses_a_schedule_that_never_resamples():
    with pytest.raises(ValueError, match=r"start \(t_start\) = 8 is after end \(t_end\) = 3"):
        fk_schedule(10, start=8, end=3)
    with pytest.raises(ValueError, match="past the last scheduler step 9"):
        fk_schedule(10, start=10)
    with pytest.raises(ValueError, match=">= 0"):
        fk_schedule(10, start=-1)
    assert fk_schedule(10, start=3, end=3) == [4] and fk_schedule(10, start=9, end=50) == [10]
    with pytest.raises(ValueError, match="after end"):
        fk_steering(gmm_model(num_inference_steps=10), 4, potential=REWARD, resample_every=2, t_start=7, t_end=2,
                    seed=0)


def broken_unet(x, t):
    """A denoiser that breaks down below timestep 500 (noisy levels are fine)."""
    return x * float("nan") if int(t) < 500 else torch.zeros_like(x)


def test_a_nan_denoiser_is_blamed_by_name_and_step():
    from ppl_scaling.diffusion.process import DenoiserError

    model = DiffusionModel(broken_unet, SCHED, (1,), num_inference_steps=5)
    levels = [int(t) for t in model.process.timesteps]
    bad = next(i for i, t in enumerate(levels) if t < 500)
    with pytest.raises(DenoiserError, match=rf"denoiser broken_unet returned NaN/inf at level {bad} of 5 "
                                            rf"\(scheduler timestep {levels[bad]}.*8 of 8 samples"):
        pps.smc(Tilted(model, REWARD), 8, seed=0)       # not a PotentialError from the reward
    assert issubclass(DenoiserError, ValueError) and not issubclass(DenoiserError, pps.PotentialError)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                           down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                           layers_per_block=1, norm_num_groups=4).eval()
    with torch.no_grad():
        unet.conv_out.bias.fill_(float("inf"))
    model = DiffusionModel(unet, DDIMScheduler(), (1, 8, 8), num_inference_steps=3)
    with pytest.raises(DenoiserError, match="denoiser UNet2DModel returned NaN/inf at level 0 of 3"):
        fk_steering(model, 2, potential=rewards.brightness, seed=0)


def test_negative_lam_is_refused_for_diffusion():
    for lam in (-1.0, -1e-9, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"lam must be finite and >= 0"):
            Tilted(gmm_model(), REWARD, lam=lam)
        with pytest.raises(ValueError, match=r"lam must be finite and >= 0"):
            fk_steering(gmm_model(intermediate="many"), 4, potential=REWARD, lam=lam, seed=0)
    pps.smc(Tilted(gmm_model(intermediate="many"), REWARD, lam=0.0), 4, seed=0)  # lam = 0: the support only


def test_reproducible_and_rerunnable():
    m = Tilted(gmm_model(), REWARD, lam=2.0)
    a, b = pps.smc(m, 16, seed=3), pps.smc(m, 16, seed=3)  # same model object: fresh scheduler state per run
    assert torch.equal(a.particles.x, b.particles.x) and np.array_equal(a.log_weights, b.log_weights)
    assert not torch.equal(a.particles.x, pps.smc(m, 16, seed=4).particles.x)
    c = pps.smc(Tilted(gmm_model(), REWARD, lam=2.0), 16, seed=3)
    assert torch.equal(a.particles.x, c.particles.x)


def test_conditioning_is_resampled_with_the_latents():
    """x0_hat = cond (a 'sample'-predicting denoiser): each final particle keeps its ancestor's cond."""
    sched = DDPMScheduler(clip_sample=False, prediction_type="sample")
    N = 12
    cond = torch.arange(N, dtype=torch.float64)[:, None]
    m = DiffusionModel(lambda x, t, c: c.expand_as(x), sched, (1,), num_inference_steps=6, cond=cond,
                       dtype=torch.float64)
    fk = Tilted(m, lambda x: x[:, 0], lam=0.5)
    res = pps.smc(fk, N, ess_threshold=1.0, seed=0, store_history=True)
    assert res.resampled[1:].all()
    origin = res.lineage()[0]
    torch.testing.assert_close(res.particles.cond[:, 0], cond[origin, 0])
    torch.testing.assert_close(res.particles.x, res.particles.cond)  # last DDPM step returns x0_hat exactly
    assert len(np.unique(origin)) < N  # selection happened (toward large cond)
    with pytest.raises(ValueError, match="one row per particle"):
        pps.smc(fk, N + 1, seed=0)


def test_intermediate_options():
    np.testing.assert_allclose(soft_value(np.array([[0.0, np.log(3.0)]]), 1.0), [np.log(2.0)])
    np.testing.assert_allclose(soft_value(np.array([[1.0, 3.0]]), 0.0), [2.0])
    seen = []

    def value(x, t):
        seen.append(int(t))
        return x[:, 0]

    res = pps.smc(Tilted(gmm_model(intermediate=value), REWARD), 4, seed=0)
    assert seen == [int(t) for t in gmm_model().process.timesteps] and res.ledger.reward_calls == 4 * 5 + 4
    many = pps.smc(Tilted(gmm_model(intermediate="many", num_x0_samples=3), REWARD), 4, seed=0)
    assert many.ledger.reward_calls == 4 * 3 * 5 + 4 and many.ledger.nfe == 4 * 5
    # the x0 draws come from a child stream: without resampling the trajectories are those of "x0"
    plain = pps.smc(Tilted(gmm_model(), REWARD), 4, ess_threshold=0.0, seed=1)
    drawn = pps.smc(Tilted(gmm_model(intermediate="many"), REWARD), 4, ess_threshold=0.0, seed=1)
    assert torch.equal(plain.particles.x, drawn.particles.x)
    assert not np.allclose(plain.ess[:-1], drawn.ess[:-1])  # other intermediate weights ...
    np.testing.assert_allclose(plain.log_weights, drawn.log_weights)  # ... that telescope to exp(r(x))
    with pytest.raises(ValueError, match="intermediate"):
        gmm_model(intermediate="mean")


def test_dynamic_thresholding_matches_the_scheduler_step():
    """x0 predictions with dynamic thresholding (our implementation) = diffusers' own step."""
    sched = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.8, sample_max_value=2.0)
    proc = ReverseProcess(lambda x, t: 3.0 * x, sched, (2, 3, 3), num_inference_steps=4)
    x = 2.0 * torch.randn((5, 2, 3, 3), generator=torch.Generator().manual_seed(0))
    for i in range(4):
        out, x0 = proc.predict(x, i)
        step = proc.scheduler.step(out, proc.timesteps[i], x, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(x0, step.pred_original_sample)
    y = torch.tensor([[0.5, -3.0, 1.5, 0.2]])
    s = float(torch.quantile(y.abs(), 0.5))  # 1.0 <= s = 1.0 (the median of 0.2, 0.5, 1.5, 3.0)
    torch.testing.assert_close(dynamic_threshold(y, 0.5, 2.0), y.clamp(-s, s) / s)


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match="deterministic"):
        DiffusionModel(GMM.denoiser(SCHED), DDIMScheduler(), (1,), eta=0.0)
    DiffusionModel(GMM.denoiser(SCHED), DDIMScheduler(), (1,), eta=0.0, allow_deterministic=True)
    with pytest.raises(ValueError, match="stochastic"):
        DiffusionModel(GMM.denoiser(SCHED), PNDMScheduler(), (1,))
    with pytest.raises(ValueError, match="num_inference_steps"):
        gmm_model(num_inference_steps=0)
    with pytest.raises(ValueError, match="outside"):
        Tilted(gmm_model(), REWARD, at=[9])
    with pytest.raises(pps.PotentialError, match="shape"):
        pps.smc(Tilted(gmm_model(), lambda x: x), 4, seed=0)
    with pytest.raises(pps.PotentialError, match="NaN"):
        pps.smc(Tilted(gmm_model(), lambda x: x[:, 0] * float("nan")), 4, seed=0)
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
    model = DiffusionModel(unet, DDIMScheduler(), (1, 8, 8), num_inference_steps=4, decode=rewards.to_unit_range)
    out = fk_steering(model, 3, potential=rewards.brightness, lam=5.0, ess_threshold=1.0, seed=0)
    assert out.particles.x.shape == (3, 1, 8, 8) and out.ledger.nfe == 12
    np.testing.assert_allclose(out.rewards, rewards.brightness(rewards.to_unit_range(out.particles.x)).numpy(),
                               rtol=1e-6)
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


def test_best_of_n_and_importance_sampling():
    K, m = 6, gmm_model(num_inference_steps=6)
    bon = best_of_n(m, 10, potential=REWARD, seed=0)
    assert (bon.ledger.nfe, bon.ledger.reward_calls) == (10 * K, 10)
    best = bon.particles.x[int(np.argmax(bon.log_weights))]
    assert float(best[0]) == pytest.approx(bon.rewards.max())
    rs = random_search(m, 10, potential=REWARD, seed=0)
    assert rs.info["method"] == "random_search" and torch.equal(rs.particles.x, bon.particles.x)
    is_ = importance_sampling(m, 10, potential=REWARD, lam=0.7, seed=0)
    np.testing.assert_allclose(is_.weights, np.exp(0.7 * is_.rewards) / np.exp(0.7 * is_.rewards).sum())
    assert is_.ledger.reward_calls == 10 and not is_.resampled.any()


def test_svdd_groups_budget_and_selection():
    K, N, M = 6, 8, 4
    sv = svdd(gmm_model(num_inference_steps=K), N, potential=REWARD, num_candidates=M, seed=0, store_history=True)
    assert sv.num_particles == N * M
    assert (sv.ledger.nfe, sv.ledger.reward_calls) == (K * N * M, (K + 1) * N * M)
    assert sv.rewards.reshape(N, M).max(axis=1).mean() > 1.0  # local argmax search lands in the right mode
    for t in range(1, K + 1):  # each group continues from its best member (argmax of the scores)
        A = sv.ancestors[t].reshape(N, M)
        prev = sv.log_weights_history[t - 1].reshape(N, M)
        np.testing.assert_array_equal(A, (np.argmax(prev, axis=1) + M * np.arange(N))[:, None].repeat(M, 1))
    np.testing.assert_allclose(sv.log_weights, sv.rewards)  # scores are the current rewards
    soft = svdd(gmm_model(num_inference_steps=K), N, potential=REWARD, num_candidates=M, alpha=0.5, seed=0)
    assert soft.ledger.nfe == sv.ledger.nfe and soft.ledger.reward_calls == sv.ledger.reward_calls
    assert np.isnan(soft.log_evidence) and soft.info["method"] == "svdd"


def test_zero_order_search():
    ddim = DDIMScheduler(clip_sample=False)
    K, M, R = 6, 3, 3
    model = gmm_model(ddim, num_inference_steps=K, eta=0.0, allow_deterministic=True)
    zo = zero_order_search(model, M, potential=REWARD, rounds=R, seed=0, store_history=True)
    best = [lw.max() for lw in zo.log_weights_history[1:]]
    assert np.all(np.diff(best) >= 0)  # the incumbent only moves to a better candidate
    assert (zo.ledger.nfe, zo.ledger.reward_calls) == (K * (1 + R * M), R * (M + 1))
    np.testing.assert_allclose(zo.rewards, zo.particles.x[:, 0].numpy())
    x = zo.particles  # deterministic sampler: each slot's sample is the denoised noise
    torch.testing.assert_close(x.x, model.process.run(x.noise, 0, K, np.random.default_rng(0)))


def test_search_over_paths():
    ddim = DDIMScheduler(clip_sample=False)
    model = gmm_model(ddim, num_inference_steps=6, eta=0.0, allow_deterministic=True)
    ps = search_over_paths(model, 3, potential=REWARD, num_branches=2, start=2, backward=2, forward=1, seed=0,
                           store_history=True)
    assert ps.particles.x.shape == (6, 1) and ps.info["method"] == "search_over_paths"
    np.testing.assert_allclose(ps.rewards, ps.particles.x[:, 0].numpy())
    # levels 2 -> 3 -> 4 -> 5 -> 6: 3 paths to level 2, then 4 rounds of 6 branches x 2 steps (+ 1 NFE scoring below K)
    assert (ps.ledger.nfe, ps.ledger.reward_calls) == (3 * 2 + 4 * 6 * 2 + 3 * 6, 4 * 6)
    first = ps.ancestors[1]  # the first beam keeps the 3 distinct initial paths, 2 children each
    assert sorted(first.tolist()) == [0, 0, 1, 1, 2, 2]
    for t in range(2, len(ps.ancestors)):  # then the 3 best branches by the reward of the x0 prediction
        prev = ps.log_weights_history[t - 1]
        kept = np.unique(ps.ancestors[t])
        assert len(kept) == 3 and prev[kept].min() >= np.delete(prev, kept).max()
