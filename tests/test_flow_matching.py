"""Flow matching with SMC: the reverse SDE of the exact Gaussian-mixture velocity, against exact answers.

``GaussianMixture.velocity`` is the exact rectified-flow velocity of the mixture, so the
SDE's marginals are the data mixture at t = 0 up to the Euler-Maruyama discretisation, and
FK steering targets the closed-form tilt ``GaussianMixture.tilt``. Unlike
tests/test_diffusion_gmm.py (DDPM at K = 50 narrows the modes), the references here are the
exact data answers: the grid is fine enough that the discretisation bias, measured with
200k-sample runs of the base sampler at the same K and at 2K (seeded, offline), is a small
fraction of each tolerance (numbers next to each test). Tolerances are 4.5 standard errors
of the Monte Carlo estimates (fixed seeds).
"""
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import ppl_scaling as pps
from ppl_scaling import Tilted
from ppl_scaling.diffusion.flow import FlowMatchingModel
from ppl_scaling.diffusion.gmm import GaussianMixture, LinearReward
from ppl_scaling.samplers.fk_steering import fk_steering
from ppl_scaling.state import take

K = 100
LAM = 0.578  # right-mode weight of the tilted data mixture: 0.85
GMM = GaussianMixture.isotropic([0.5, 0.5], [[-1.5], [1.5]], std=0.5)
REWARD = LinearReward([1.0])
Z_SIGMAS = 4.5


def model(num_inference_steps=K, **kw):
    """The exact-velocity flow of ``GMM`` (float64)."""
    kw.setdefault("dtype", torch.float64)
    return FlowMatchingModel(GMM.velocity, (GMM.dim,), num_inference_steps=num_inference_steps, **kw)


def test_velocity_gives_the_score_of_the_flow_marginals():
    """-(x + (1 - t) v) / t = ∇log p_t, p_t the mixture of N((1 - t) μ_k, (1 - t)² Σ_k + t² I)
    (2-D, full covariances; central differences of the closed-form log-density)."""
    gmm = GaussianMixture([0.2, 0.5, 0.3], [[-2.0, 0.0], [1.0, 1.0], [0.5, -2.0]],
                          [[[0.5, 0.2], [0.2, 0.3]], [[0.2, 0.0], [0.0, 0.6]], [[0.3, -0.1], [-0.1, 0.2]]])
    x = np.random.default_rng(0).normal(size=(6, 2)) * 2
    for t in (0.05, 0.4, 0.9, 1.0):
        pt = GaussianMixture(gmm.weights, (1 - t) * gmm.means, (1 - t) ** 2 * gmm.covs + t**2 * np.eye(2))
        e = 1e-5 * np.eye(2)
        grad = np.stack([(pt.log_prob(x + e[j]) - pt.log_prob(x - e[j])) / 2e-5 for j in range(2)], axis=1)
        v = gmm.velocity(torch.as_tensor(x), t).numpy()
        np.testing.assert_allclose(-(x + (1 - t) * v) / t, grad, rtol=1e-6, atol=1e-6)
    x0 = gmm.posterior(torch.as_tensor(x), 1.0, 0.0)[0].numpy()  # t = 0: v = -x0 (no division by t)
    np.testing.assert_allclose(gmm.velocity(torch.as_tensor(x), 0.0).numpy(), -x0)


@pytest.mark.parametrize("noise_level, shift, steps", [(0.7, 1.0, K), (1.5, 3.0, K), (0.0, 1.0, 4 * K)],
                         ids=["default", "noisy_shift3", "ode"])
def test_sde_preserves_the_marginals(noise_level, shift, steps):
    """Untilted samples at t = 0 have the data mixture's mean, variance and mode weights for every g.
    Bias (200k samples): the variance is the most sensitive; the SDE's at K = 100 is -0.007 (-0.06
    at K = 25), the Euler ODE's is first order, -4 / K (-0.04 at K = 100, -0.013 at 4K); the
    tolerance on it is 4.5 s.e. = 0.05."""
    x = model(steps, noise_level=noise_level, shift=shift, allow_deterministic=True).sample(
        20_000, np.random.default_rng(3)).numpy()[:, 0]
    p = GMM.responsibilities(x[:, None])[:, 1]
    n = len(x)
    for name, est, exact, se in [
        ("mean", x.mean(), GMM.mean()[0], x.std() / np.sqrt(n)),
        ("var", x.var(), 0.25 + 1.5**2, ((x - x.mean()) ** 2).std() / np.sqrt(n)),
        ("right", p.mean(), GMM.weights[1], p.std() / np.sqrt(n)),
    ]:
        assert abs(est - exact) < Z_SIGMAS * se, (name, est, exact, se)


def test_ode_is_diffusers_euler_sampler():
    """noise_level = 0 is FlowMatchEulerDiscreteScheduler.step (shift 3, its grid), whatever the rng."""
    m = FlowMatchingModel(GMM.velocity, (1,), num_inference_steps=12, shift=3.0, noise_level=0.0,
                          allow_deterministic=True)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(12)
    np.testing.assert_array_equal(m.process.sigmas, sched.sigmas.double().numpy())
    s = m.M0(64, np.random.default_rng(0))
    x = s.x.clone()
    for t in range(1, m.T):
        a = m.M(t, s, np.random.default_rng(t))
        b = m.M(t, s, np.random.default_rng(100 + t))
        assert torch.equal(a.x, b.x)
        x = sched.step(GMM.velocity(x, float(sched.sigmas[t - 1])), sched.timesteps[t - 1], x).prev_sample
        torch.testing.assert_close(a.x, x)
        s = a
    with pytest.raises(ValueError, match="deterministic"):
        FlowMatchingModel(GMM.velocity, (1,), noise_level=0.0)


def test_transition_density():
    """The state's x0 prediction is E[x0 | x_t]; M draws from N(m, s² I) and logpt is its log-density
    (broadcast over a 1-particle x)."""
    m = model(20)
    t = 11
    rng = np.random.default_rng(4)
    xp = m.M0(5, rng)
    for s in range(1, t):
        xp = m.M(s, xp, rng)
    s_prev = m.process.sigmas[t - 1]
    torch.testing.assert_close(xp.x0, GMM.posterior(xp.x, 1 - s_prev, s_prev)[0])  # the view: x - t v = E[x0 | x_t]
    mean, std = m.process.transition(xp.model_output, t - 1, xp.x)
    assert std > 0
    draws = m.M(t, take(xp, np.zeros(40_000, dtype=int)), rng).x[:, 0].numpy()
    se = std / np.sqrt(len(draws))
    assert abs(draws.mean() - float(mean[0, 0])) < Z_SIGMAS * se
    assert abs(draws.std() / std - 1) < Z_SIGMAS / np.sqrt(2 * len(draws))
    x = m.M(t, xp, rng)
    normal = torch.distributions.Normal(mean[:, 0], std)
    np.testing.assert_allclose(m.logpt(t, xp, x), normal.log_prob(x.x[:, 0]).numpy(), rtol=1e-12)
    one = take(x, np.array([2]))
    np.testing.assert_allclose(m.logpt(t, xp, one), normal.log_prob(one.x[0, 0]).numpy(), rtol=1e-12)
    tilted = Tilted(m, REWARD, lam=LAM)
    a = tilted.M(t, tilted.M0(5, np.random.default_rng(0)), np.random.default_rng(1))
    assert tilted.logpt(t, tilted.M0(5, np.random.default_rng(0)), a).shape == (5,)
    with pytest.raises(ValueError, match="no transition density"):
        model(20, noise_level=0.0, allow_deterministic=True).logpt(t, xp, x)


def test_fk_steering_matches_the_exact_tilt():
    """FK steering (resampling every step) of the flow SDE targets p(x) exp(lam x) / Z: right-mode
    weight, mean, and evidence against the closed form log Z = log E_p[exp(lam x)] (Z_hat = exp(log
    Z_hat) is unbiased). Discretisation bias at K = 100 (the base sampler's own tilt, 200k samples):
    right weight -0.001, mean -0.006, Z -0.006; the tolerances are 4.5 s.e. of 24 runs: about 0.06,
    0.2 and 0.13. One denoiser evaluation per particle and scheduler step."""
    exact, log_Z = GMM.tilt(REWARD, LAM)
    runs = [fk_steering(model(), 128, potential=REWARD, lam=LAM, ess_threshold=1.0, seed=2000 + r)
            for r in range(24)]
    assert all(o.resampled[1:].all() for o in runs)
    assert runs[0].ledger.nfe == 128 * K
    right = np.array([o.weights @ GMM.responsibilities(o.particles.x.numpy())[:, 1] for o in runs])
    mean = np.array([o.weights @ o.particles.x.numpy()[:, 0] for o in runs])
    Z = np.exp([o.log_evidence for o in runs])
    for name, est, ref in [("right", right, exact.weights[1]), ("mean", mean, exact.mean()[0]),
                           ("Z", Z, np.exp(log_Z))]:
        se = est.std(ddof=1) / np.sqrt(len(est))
        assert abs(est.mean() - ref) < Z_SIGMAS * se, (name, est.mean(), ref, se)


def test_resampled_copies_diverge_only_with_noise():
    """Copies of one particle split under the SDE and stay equal under the ODE; after steering with
    resampling at every step every final particle is distinct with g > 0, while the ODE keeps duplicates."""
    for noise_level in (0.7, 0.0):
        m = model(20, noise_level=noise_level, allow_deterministic=True)
        rng = np.random.default_rng(5)
        copies = take(m.M0(8, rng), np.zeros(8, dtype=int))
        x = m.M(1, copies, rng).x[:, 0]
        assert len(torch.unique(x)) == (8 if noise_level else 1)
        res = pps.smc(Tilted(m, REWARD, lam=3.0), 64, ess_threshold=1.0, seed=6)
        unique = len(torch.unique(res.particles.x[:, 0]))
        assert unique == 64 if noise_level else unique < 64, (noise_level, unique)
