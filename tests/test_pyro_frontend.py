"""The Pyro front end agrees with Kalman and with the hand-written FK model."""
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from scipy.stats import norm

import ppl_scaling as pps
import ppl_scaling.pyro as ppyro
from ppl_scaling import exact
from ppl_scaling.ssm import LinearGaussian
from ppl_scaling.tilt import Tilted

A, SX, SY, S0 = 0.9, 1.0, 1.5, 1.0
Z_MAX = 4.5


class RandomWalk:
    def __init__(self, use_factor: bool = False):
        self.use_factor = use_factor

    def init(self, state):
        state["x"] = pyro.sample("x0", dist.Normal(0.0, S0))

    def step(self, state, y):
        state["x"] = pyro.sample("x", dist.Normal(A * state["x"], SX))
        if self.use_factor:
            pyro.factor("y", dist.Normal(state["x"], SY).log_prob(y))
        else:
            pyro.sample("y", dist.Normal(state["x"], SY), obs=y)


class WideGuide:
    def init(self, state):
        pyro.sample("x0", dist.Normal(0.0, 2 * S0))

    def step(self, state, y):
        pyro.sample("x", dist.Normal(A * state["x"], 2 * SX))


@pytest.fixture(scope="module")
def data():
    _, y = LinearGaussian(A, SX, SY, S0).simulate(9, np.random.default_rng(0))
    ys = torch.tensor(y, dtype=torch.float64)
    # x_1 | x_0 ~ N(a x_0, sx²) observed from t = 1: the Kalman prior of x_1 has variance a² s0² + sx²
    kalman = exact.kalman_filter(y, A, SX, SY, np.sqrt(A**2 * S0**2 + SX**2))
    return ys, kalman


@pytest.mark.parametrize("guide", [None, WideGuide()], ids=["prior", "guide"])
def test_evidence_unbiased_against_kalman(data, guide):
    ys, kalman = data
    rng = np.random.default_rng(1)
    ratios = np.array([np.exp(ppyro.smc(RandomWalk(), ys, 20, guide=guide, rng=rng).log_evidence - kalman.log_evidence)
                       for _ in range(250)])
    se = ratios.std(ddof=1) / np.sqrt(len(ratios))
    assert abs(ratios.mean() - 1) < Z_MAX * se


def test_agrees_with_hand_written_fk_and_kalman(data):
    ys, kalman = data

    class HandWritten(pps.FeynmanKac):
        T = len(ys) + 1

        def M0(self, N, rng):
            return S0 * rng.standard_normal(N)

        def M(self, t, xp, rng):
            return A * xp + SX * rng.standard_normal(xp.shape[0])

        def logG(self, t, xp, x):
            return np.zeros(x.shape[0]) if t == 0 else -0.5 * ((ys[t - 1].item() - x) / SY) ** 2 - np.log(SY * np.sqrt(2 * np.pi))

    N = 4000
    runs_pyro = [ppyro.smc(RandomWalk(), ys, N, seed=s) for s in range(8)]
    runs_fk = [pps.smc(HandWritten(), N, seed=s) for s in range(8)]
    for runs in (runs_pyro, runs_fk):
        log_z = np.array([r.log_evidence for r in runs])
        means = np.array([r.weights @ np.asarray(r.particles["x"] if isinstance(r.particles, dict) else r.particles)
                          for r in runs])
        assert abs(log_z.mean() - kalman.log_evidence) < Z_MAX * log_z.std(ddof=1) / np.sqrt(len(runs)) + 0.01
        assert abs(means.mean() - kalman.mean[-1]) < Z_MAX * means.std(ddof=1) / np.sqrt(len(runs)) + 0.01


@pytest.mark.parametrize("guide", [None, WideGuide()], ids=["prior", "guide"])
def test_weights_are_likelihood_times_guide_correction(data, guide):
    """Without resampling, the log-weight of a path is exactly Σ_t log N(y_t; x_t, SY²) (the
    likelihood tilt, telescoped by the difference shape) plus, with a guide, Σ_t log p - log q
    of its latent moves (the dynamics' own weights)."""
    ys, _ = data
    fk = ppyro.feynman_kac(RandomWalk(), ys, guide=guide)
    assert isinstance(fk, Tilted) and fk.shape.name == "difference" and fk.lam == 1.0
    res = ppyro.smc(RandomWalk(), ys, 30, guide=guide, ess_threshold=0.0, store_history=True, seed=4)
    x = np.stack([h["x"].numpy() for h in res.history])                    # (T, N)
    y = ys.numpy()[:, None]
    expected = norm.logpdf(y, x[1:], SY).sum(0)
    if guide is not None:
        mean = np.vstack([np.zeros((1, 30)), A * x[:-1]])
        scale = np.array([S0] + [SX] * len(ys))[:, None]
        expected += (norm.logpdf(x, mean, scale) - norm.logpdf(x, mean, 2 * scale)).sum(0)
    np.testing.assert_allclose(res.log_weights, expected, rtol=1e-6)  # the program samples in float32
    assert not res.resampled.any() and res.particles["x"].shape == (30,)


def test_factor_sites_equal_observed_sites_and_global_rng_untouched(data):
    ys, _ = data
    state = torch.get_rng_state().clone()
    a = ppyro.smc(RandomWalk(use_factor=False), ys, 50, seed=3)
    b = ppyro.smc(RandomWalk(use_factor=True), ys, 50, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.allclose(a.particles["x"], b.particles["x"]) and np.isclose(a.log_evidence, b.log_evidence)
    assert a.particles["x"].shape == (50,)


def test_bad_programs_get_clear_errors(data):
    ys, _ = data

    class Leaky(RandomWalk):
        def step(self, state, y):
            super().step(state, y)
            state["summary"] = state["x"].mean()

    with pytest.raises(ValueError, match="leading particle dimension"):
        ppyro.smc(Leaky(), ys, 10, seed=0)

    class WritingGuide(WideGuide):
        def step(self, state, y):
            state["x"] = pyro.sample("x", dist.Normal(0.0, 1.0))

    with pytest.raises(TypeError):
        ppyro.smc(RandomWalk(), ys, 10, guide=WritingGuide(), seed=0)
    with pytest.raises(TypeError, match="init\\(state\\) and step"):
        ppyro.smc(object(), ys, 10)
