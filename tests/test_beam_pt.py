"""Beam search and DVTS on an enumerable bigram LM; parallel tempering against the
exact (tempered) Kalman smoother."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from ppl_scaling.models.step import StepModel
from ppl_scaling.models.types import Partial
from ppl_scaling.samplers.beam import beam_search, dvts
from ppl_scaling.samplers.parallel_tempering import TemperedFK, parallel_tempering, path_log_potential
from ppl_scaling.ssm import LinearGaussian
from test_samplers import batch_means_se
from test_step_model import ABReward, BigramLM

T = 4


def bigram_fk():
    return StepModel(BigramLM(), "^", ABReward(), step_delimiter=None, max_steps=T, shape="difference")


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
    res = search(bigram_fk(), num_beams=32, beam_width=4, seed=0)
    final = ABReward().score(res.particles.partials(), res.particles.finished)
    np.testing.assert_allclose(res.log_weights, final)  # score = reward of the final path (difference shape)
    assert res.done.all() and np.isnan(res.log_evidence)
    assert res.log_weights.max() == pytest.approx(best_reward())
    assert res.compute["tokens"] > 0 and res.compute["reward_calls"] > 0


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


def test_search_budget_errors():
    with pytest.raises(ValueError, match="multiple of beam_width"):
        dvts(bigram_fk(), num_beams=10, beam_width=4, seed=0)
    with pytest.raises(ValueError, match="positive integer"):
        beam_search(bigram_fk(), num_beams=0, seed=0)


# ----------------------------------------------------------------------------- parallel tempering

def test_parallel_tempering_chains_match_tempered_smoothers():
    """A Gaussian likelihood tempered by lam is N(y; x, sigma_y^2 / lam): every chain has an
    exact Kalman-smoother answer. Tolerance: 5 batch-means standard errors."""
    model = LinearGaussian(a=0.8, sigma_x=1.0, sigma_y=0.6)
    _, y = model.simulate(6, np.random.default_rng(0))
    lams = [1.0, 0.4, 0.15]
    out = parallel_tempering(model.bootstrap(y), lams, num_particles=6, num_iterations=1000, seed=1)
    assert np.all((out.acceptance > 0.05) & (out.acceptance < 1.0)), out.acceptance
    for k, lam in enumerate(lams):
        paths = np.array([[float(x[0]) for x in p] for p in out.trajectories[k]])[100:]
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
    assert path_log_potential(TemperedFK(fk, 0.5), path) == pytest.approx(0.5 * L)
    assert np.all(TemperedFK(fk, 0.0).logG(0, None, np.array([1e9])) == 0.0)
    with pytest.raises(ValueError, match="lam"):
        TemperedFK(fk, -1.0)
