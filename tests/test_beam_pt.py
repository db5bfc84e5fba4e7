"""Beam search and DVTS on an enumerable bigram LM tilted by a reward; parallel tempering
against the exact (tempered) Kalman smoother, for FK models and tilted dynamics."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import norm

import ppl_scaling as pps
from ppl_scaling.models.step import StepModel
from ppl_scaling.models.types import Partial
from ppl_scaling.potentials import Potential
from ppl_scaling.samplers.beam import beam_search, dvts
from ppl_scaling.samplers.parallel_tempering import TemperedFK, parallel_tempering, path_log_potential
from ppl_scaling.ssm import LinearGaussian
from ppl_scaling.tilt import Tilted
from test_samplers import batch_means_se
from test_step_model import ABReward, BigramLM

T = 4


def bigram():
    return StepModel(BigramLM(), "^", step_delimiter=None, max_steps=T)


def bigram_fk():
    """The bigram LM tilted by the reward: a path's score is its reward (difference shape)."""
    return Tilted(bigram(), ABReward(), shape="difference", lam=1.0)


def best_reward():
    """max of the reward over every generation of at most T one-token steps."""
    best = -np.inf
    for k in range(1, T + 1):
        for toks in itertools.product("ab$", repeat=k):
            if "$" in toks[:-1] or (k < T and toks[-1] != "$"):
                continue
            steps = tuple("" if c == "$" else c for c in toks)
            best = max(best, ABReward().score([Partial("^", steps, True)], np.array([True]))[0])
    return best


@pytest.mark.parametrize("search", [beam_search, dvts])
def test_search_finds_the_best_generation_and_scores_it(search):
    res = search(bigram(), num_beams=32, beam_width=4, potential=ABReward(), seed=0)
    final = ABReward().score(res.particles.partials(), res.particles.finished)
    np.testing.assert_allclose(res.log_weights, final)  # score = reward of the final path (difference shape)
    np.testing.assert_allclose(res.rewards, final)
    assert res.done.all() and np.isnan(res.log_evidence)
    assert res.log_weights.max() == pytest.approx(best_reward())
    assert res.info["method"] == search.__name__ and res.info["selection_rule"] == "argmax_weight"
    assert res.ledger.tokens > 0 and res.ledger.reward_calls > 0
    same = search(bigram_fk(), num_beams=32, beam_width=4, seed=0)  # the tilted model itself
    np.testing.assert_array_equal(same.log_weights, res.log_weights)


def test_beam_search_keeps_the_top_paths_and_finished_slots():
    fk = bigram_fk()
    rng = np.random.default_rng(1)
    for _ in range(20):
        res = beam_search(fk, num_beams=12, beam_width=3, rng=rng, store_history=True)
        for t in range(1, len(res.history)):
            A, prev = res.ancestors[t], res.log_weights_history[t - 1]
            done_prev = np.asarray(res.history[t - 1].finished)
            assert np.array_equal(A[done_prev], np.flatnonzero(done_prev))   # finished paths keep their slot
            active = np.flatnonzero(~done_prev)
            parents = np.unique(A[active])
            assert len(parents) <= -(-active.size // 3)
            others = np.setdiff1d(active, parents)
            if others.size:
                assert prev[parents].min() >= prev[others].max()             # the kept paths are the best
            assert np.bincount(A[active], minlength=12).max() <= 3          # M children each


def test_dvts_subtrees_are_greedy_and_independent():
    res = dvts(bigram_fk(), num_beams=12, beam_width=4, seed=2, store_history=True)
    for t in range(1, len(res.history)):
        A, prev = res.ancestors[t], res.log_weights_history[t - 1]
        for g in range(3):
            slots = np.arange(4 * g, 4 * g + 4)
            assert set(A[slots]) <= set(slots)                              # parents from the own subtree
            if not np.asarray(res.history[t - 1].finished)[slots].all():
                assert len(set(A[slots])) == 1 and prev[A[slots[0]]] == prev[slots].max()


def test_search_budgets_and_errors():
    """DVTS rounds N down to a multiple of the width; the width is at most N."""
    assert dvts(bigram_fk(), num_beams=10, beam_width=4, seed=0).num_particles == 8
    assert dvts(bigram_fk(), num_beams=3, beam_width=4, seed=0).num_particles == 3
    assert beam_search(bigram_fk(), num_beams=2, beam_width=4, seed=0).num_particles == 2
    with pytest.raises(ValueError, match="positive integer"):
        beam_search(bigram_fk(), num_beams=0, seed=0)
    with pytest.raises(ValueError, match="positive integer"):
        dvts(bigram_fk(), num_beams=8, beam_width=0, seed=0)


# ----------------------------------------------------------------------------- parallel tempering

class ObservedWalk(pps.Dynamics):
    """The linear-Gaussian model's latent moves; the state carries the cumulative log-likelihood
    ll_t = Σ_{s<=t} log N(y_s; x_s, sigma_y²), which the ``difference`` shape turns into the
    bootstrap filter's potentials."""

    def __init__(self, model, y):
        self.model, self.y, self.T = model, y, len(y)

    def M0(self, N, rng):
        return self.observe(0, self.model.sigma0 * rng.standard_normal(N), np.zeros(N))

    def M(self, t, xp, rng):
        return self.observe(t, self.model.a * xp["x"] + self.model.sigma_x * rng.standard_normal(len(xp["x"])),
                            xp["ll"])

    def observe(self, t, x, ll):
        return {"x": x, "ll": ll + norm.logpdf(self.y[t], x, self.model.sigma_y)}

    def view(self, t, x):
        return x["ll"]


LOG_LIKELIHOOD = Potential.from_callable(np.asarray, name="log-likelihood")


@pytest.mark.parametrize("form", ["fk", "tilted"])
def test_parallel_tempering_chains_match_tempered_smoothers(form):
    """A Gaussian likelihood tempered by lam is N(y; x, sigma_y^2 / lam): every chain has an
    exact Kalman-smoother answer, for an FK model (its logG tempered) and for dynamics tilted
    by a potential (the tilt tempered; chains exchange TiltedState paths). Tolerance: 5
    batch-means standard errors."""
    model = LinearGaussian(a=0.8, sigma_x=1.0, sigma_y=0.6)
    _, y = model.simulate(6, np.random.default_rng(0))
    lams = [1.0, 0.4, 0.15]
    fk = model.bootstrap(y) if form == "fk" else Tilted(ObservedWalk(model, y), LOG_LIKELIHOOD)
    out = parallel_tempering(fk, lams, num_particles=6, num_iterations=1000, seed=1)
    acceptance, chains = out.info["acceptance"], out.info["chain_trajectories"]
    assert np.all((acceptance > 0.05) & (acceptance < 1.0)), acceptance
    assert out.trajectories is chains[0] and out.num_particles == 6 and out.info["lams"] == lams
    value = (lambda x: float(x[0])) if form == "fk" else (lambda x: float(x.base["x"][0]))
    for k, lam in enumerate(lams):
        paths = np.array([[value(x) for x in p] for p in chains[k]])[100:]
        exact = LinearGaussian(a=0.8, sigma_x=1.0, sigma_y=0.6 / np.sqrt(lam)).smoother(y)
        assert np.all(np.abs(paths.mean(0) - exact.mean) < 5 * batch_means_se(paths)), (lam, paths.mean(0), exact.mean)
        sq = paths**2
        assert np.all(np.abs(sq.mean(0) - (exact.var + exact.mean**2)) < 5 * batch_means_se(sq))


def test_tempered_fk_and_path_potential():
    model = LinearGaussian()
    fk = model.bootstrap(np.array([0.3, -0.2, 0.5]))
    path = [np.array([0.1]), np.array([0.0]), np.array([0.4])]
    L = path_log_potential(fk, path)
    assert L == pytest.approx(sum(float(fk.logG(t, None, x)[0]) for t, x in enumerate(path)))
    x = np.array([0.1, 1e9])
    np.testing.assert_allclose(TemperedFK(fk, 0.5).logG(0, None, x), 0.5 * fk.logG(0, None, x))
    assert np.all(TemperedFK(fk, 0.0).logG(0, None, x) == 0.0)
    with pytest.raises(ValueError, match="lam"):
        TemperedFK(fk, -1.0)


class Constrained(pps.FeynmanKac):
    T = 1

    def M0(self, N, rng):
        return rng.standard_normal(N)

    def logG(self, t, xp, x):
        return np.where(x > 0, -x, -np.inf)


def test_temperature_zero_keeps_the_support():
    """G ** 0 = 1[G > 0]: rejected paths stay rejected, all others weigh alike."""
    fk = Constrained()
    x = np.array([-1.0, 0.5, 2.0])
    np.testing.assert_array_equal(TemperedFK(fk, 0.0).logG(0, None, x), [-np.inf, 0.0, 0.0])
    np.testing.assert_array_equal(TemperedFK(fk, 2.0).logG(0, None, x), [-np.inf, -1.0, -4.0])


class OwnWeights(pps.Dynamics):
    """An increasing random walk with weights of its own (as a proposal correction log p - log q)."""

    T = 5

    def M0(self, N, rng):
        return rng.standard_normal(N)

    def M(self, t, xp, rng):
        return xp + 0.3 * np.abs(rng.standard_normal(xp.shape[0]))

    def logG(self, t, xp, x):
        return -0.1 * x**2


def bounded(x):
    """Rejects x >= 1.5, for good: the walk only goes up (the potential contract)."""
    return np.where(x < 1.5, -(x - 0.5) ** 2, -np.inf)


@pytest.mark.parametrize("shape", ["difference", "max", "sum", "last"])
@pytest.mark.parametrize("a", [1.0, 0.7])
@pytest.mark.parametrize("lam", [0.0, 0.5, 2.0])
def test_tempering_a_tilt_is_the_tilt_at_the_product_temperature(shape, a, lam):
    """TemperedFK(Tilted(d, p, shape, lam=a), lam) has the weights of Tilted(d, p, shape, lam=lam a):
    the shapes are linear in lam, lam = 0 keeps the support, and d's own logG is not tempered."""
    chain = TemperedFK(Tilted(OwnWeights(), bounded, shape=shape, lam=a), lam)
    direct = Tilted(OwnWeights(), bounded, shape=shape, lam=lam * a)
    ra, rb = np.random.default_rng(3), np.random.default_rng(3)
    xa, xb = chain.M0(400, ra), direct.M0(400, rb)
    wa, wb = chain.logG(0, None, xa), direct.logG(0, None, xb)
    for t in range(1, OwnWeights.T):
        ya, yb = chain.M(t, xa, ra), direct.M(t, xb, rb)
        wa, wb = wa + chain.logG(t, xa, ya), wb + direct.logG(t, xb, yb)
        xa, xb = ya, yb
    assert np.isneginf(wb).any() and np.isfinite(wb).any()
    np.testing.assert_allclose(wa, wb, rtol=1e-12, atol=1e-12)
