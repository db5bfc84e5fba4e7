"""The steppable engine, the selection hook, the tilt and the ledger against exact answers.

Exact reference: a 3-state Markov chain over T = 4 steps, enumerated (81 paths). The
tilted target is pi(x) ∝ p(x) exp(lam r(x)) for a reward r of the complete path; for
every FK shape the product of potentials is exp(lam r), so Z = E_p[exp(lam r)] and
Z_hat · Σ_i W_i f(x_i) is an unbiased estimate of Z · pi(f) (Del Moral): over R runs
its mean is within Z_MAX standard errors of the enumerated value.
"""
import itertools

import numpy as np
import pytest

import ppl_scaling as pps
from ppl_scaling.ledger import record, recording
from ppl_scaling.selection import Beam, Groups, Resample

Z_MAX = 4.5
INIT = np.array([0.5, 0.3, 0.2])
TRANS = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.3, 0.3, 0.4]])
T = 4


class Chain(pps.Dynamics):
    """Paths of the Markov chain; the state is the (N, t+1) array of paths so far.
    Each move records one generated 'token' per particle in the ledger."""

    T = T

    def M0(self, N, rng):
        record(tokens=N)
        return rng.choice(3, size=(N, 1), p=INIT)

    def M(self, t, xp, rng):
        record(tokens=len(xp))
        u = rng.random(len(xp))[:, None]
        nxt = (np.cumsum(TRANS[xp[:, -1]], axis=1) < u).sum(axis=1)
        return np.concatenate([xp, nxt[:, None]], axis=1)


def reward_prefix(xs):
    return 0.3 * (xs == 2).sum(axis=1)


def reward_complete(xs):
    return reward_prefix(xs) + 0.5 * (xs[:, -1] == 0)


def no_two_ones(xs):
    """0 (accept) or -inf (reject): paths with two consecutive 1s are rejected."""
    bad = ((xs[:, 1:] == 1) & (xs[:, :-1] == 1)).any(axis=1) if xs.shape[1] > 1 else np.zeros(len(xs), bool)
    return np.where(bad, -np.inf, 0.0)


REWARD = pps.Potential.from_callable(reward_prefix, reward_complete, name="reward")
PATHS = np.array(list(itertools.product(range(3), repeat=T)))
P_PATH = INIT[PATHS[:, 0]] * np.prod(TRANS[PATHS[:, :-1], PATHS[:, 1:]], axis=1)


def exact(lam, potential=REWARD, f=lambda x: x[:, -1] == 0):
    """(Z, pi(f)) by enumeration."""
    with np.errstate(invalid="ignore"):
        g = np.exp(np.where(np.isneginf(r := potential.complete(PATHS)), -np.inf, lam * r))
    Z = float(P_PATH @ g)
    return Z, float(P_PATH @ (g * f(PATHS))) / Z


def check_unbiased(fk, lam, runs=400, N=40, potential=REWARD, seed=0, **kw):
    Z, pif = exact(lam, potential)
    rng = np.random.default_rng(seed)
    z, zf = [], []
    for _ in range(runs):
        res = pps.smc(fk, N, rng=rng, **kw)
        zhat = np.exp(res.log_evidence)
        z.append(zhat / Z)
        zf.append(zhat * (res.weights @ (res.particles.base[:, -1] == 0)) / (Z * pif))
    for v in (np.array(z), np.array(zf)):
        se = v.std(ddof=1) / np.sqrt(runs)
        assert abs(v.mean() - 1) < Z_MAX * se, (v.mean(), se)


@pytest.mark.parametrize("shape", ["difference", "max", "sum", "last"])
@pytest.mark.parametrize("threshold", [0.5, 1.0])
def test_tilted_targets_the_exact_tilted_posterior(shape, threshold):
    check_unbiased(pps.Tilted(Chain(), REWARD, shape=shape, lam=1.5), 1.5, ess_threshold=threshold)


def test_sparse_reward_steps_and_products_of_potentials_are_exact():
    support = pps.Potential.from_callable(no_two_ones, name="support")
    product = REWARD * support
    check_unbiased(pps.Tilted(Chain(), product, lam=2.0, at=[1]), 2.0, potential=product)
    # a tempered product: phi ** 0.5 with lam = 2 targets p(x) phi(x)
    check_unbiased(pps.Tilted(Chain(), product ** 0.5, lam=2.0), 1.0, potential=product, seed=1)


def test_lam_zero_keeps_the_support_only():
    """lam = 0: pi(x) ∝ p(x) 1[no two consecutive 1s], Z = P(support) < 1."""
    support = pps.Potential.from_callable(no_two_ones, name="support")
    Z, _ = exact(0.0, support)
    assert 0.5 < Z < 0.95
    check_unbiased(pps.Tilted(Chain(), support * REWARD, lam=0.0), 0.0, potential=support)
    res = pps.smc(pps.Tilted(Chain(), support, lam=0.0), 200, seed=3)
    bad = no_two_ones(res.particles.base) == -np.inf
    assert bad.any() and np.all(res.weights[bad] == 0)
    assert np.all(res.weights[~bad] > 0)


def test_dynamics_with_their_own_weights_are_tilted_on_top():
    """A proposal from the uniform chain with the correction log p - log q in the dynamics'
    logG targets the same tilted posterior as the exact dynamics."""

    class Uniform(Chain):
        def M0(self, N, rng):
            return rng.integers(3, size=(N, 1))

        def M(self, t, xp, rng):
            return np.concatenate([xp, rng.integers(3, size=(len(xp), 1))], axis=1)

        def logG(self, t, xp, x):
            p = INIT[x[:, 0]] if t == 0 else TRANS[x[:, -2], x[:, -1]]
            return np.log(p) - np.log(1 / 3)

    check_unbiased(pps.Tilted(Uniform(), REWARD, lam=1.0), 1.0, seed=4)


def test_stepping_by_hand_equals_run_and_states():
    fk = pps.Tilted(Chain(), REWARD, lam=1.0)
    algo = pps.SMC(fk, 64, ess_threshold=0.7, store_history=True)
    rng = np.random.default_rng(5)
    state = algo.init(rng)
    assert state.t == 1 and len(state.ess_trace) == 1
    while not algo.finished(state):
        before = state
        state = algo.step(state, rng)
        assert before.t == state.t - 1  # the old state is untouched
    by_hand = algo.result(state)
    again = algo.run(np.random.default_rng(5))
    assert by_hand.log_evidence == again.log_evidence
    assert np.array_equal(by_hand.particles.base, again.particles.base)
    states = list(algo.states(np.random.default_rng(5)))
    assert [s.t for s in states] == [1, 2, 3, 4]
    assert np.array_equal(states[-1].log_weights, by_hand.log_weights)
    with pytest.raises(ValueError, match="1 <= state.t < T"):
        algo.step(state, rng)


def test_the_ledger_counts_each_step_and_nests():
    fk = pps.Tilted(Chain(), REWARD, lam=1.0)
    with recording() as outer:
        res = pps.smc(fk, 10, seed=0)
    assert res.ledger.tokens == 10 * T == outer.tokens
    assert res.ledger.reward_calls == 10 * T == outer.reward_calls  # every particle scored at every step
    assert 0 < res.ledger.wall_s <= outer.wall_s
    sparse = pps.smc(pps.Tilted(Chain(), REWARD, at=()), 10, seed=0)
    assert sparse.ledger.reward_calls == 10  # the final step only
    with pytest.raises(TypeError, match="unknown ledger counter"):
        record(tokns=1)


def test_stop_rule_ends_the_run_early():
    res = pps.smc(Chain(), 8, stop=lambda s: s.t >= 2, seed=0)
    assert len(res.ess) == 2 and res.particles.shape == (8, 2)


def test_beam_selection_keeps_the_best_paths_and_their_scores():
    lw = np.array([0.1, 3.0, -1.0, 2.0, 0.5, -np.inf])
    done = np.array([False, False, False, False, True, False])
    A, kept = Beam(2)(1, None, lw, None, 0.0, done)
    # the finished slot 4 keeps its path; the 5 unfinished slots get 2 children each of the
    # best ceil(5/2) = 3 unfinished paths (1, 3, 0), in order, cut to 5
    assert A.tolist() == [1, 1, 3, 3, 4, 0]
    assert np.array_equal(kept, lw[A])


def test_groups_selection_draws_in_proportion_to_exp_score_over_temperature():
    lw = np.log(np.array([1.0, 2.0, 5.0, 1.0, 1.0, 1.0]))
    done = np.zeros(6, bool)
    rng = np.random.default_rng(0)
    picks = np.array([Groups(3, temperature=1.0)(1, rng, lw, None, 0.0, done)[0][0] for _ in range(4000)])
    p = np.array([1, 2, 5]) / 8
    freq = np.bincount(picks, minlength=3)[:3] / len(picks)
    assert np.all(np.abs(freq - p) < Z_MAX * np.sqrt(p * (1 - p) / len(picks)))
    A, _ = Groups(3)(1, rng, lw, None, 0.0, done)
    assert A.tolist() == [2, 2, 2, 3, 3, 3]


def test_engine_and_selection_refuse_bad_settings():
    with pytest.raises(ValueError, match="num_particles"):
        pps.SMC(Chain(), True)
    with pytest.raises(ValueError, match="outside 1..3"):
        pps.SMC(Chain(), 4, resample_at=[0, 2])
    with pytest.raises(ValueError, match="multiple of the group width"):
        pps.SMC(Chain(), 10, selection=Groups(4))
    with pytest.raises(ValueError, match="ess_threshold"):
        Resample("systematic", 1.5)
    with pytest.raises(ValueError, match="lam must be finite and >= 0"):
        pps.Tilted(Chain(), REWARD, lam=-1.0)
    with pytest.raises(TypeError, match="must be a Potential or a function"):
        pps.Tilted(Chain(), 3.0)


def test_beam_search_on_the_engine_reports_no_evidence():
    from ppl_scaling.samplers import beam_search

    res = beam_search(Chain(), 6, 3, potential=REWARD, seed=0)
    assert np.isnan(res.log_evidence) and res.info["method"] == "beam_search"
    assert np.allclose(res.log_weights, res.rewards)  # difference shape, lam = 1: score = final reward


class _Bad(pps.FeynmanKac):
    T = 3

    def __init__(self, logG=None, done=None, extra=0):
        self.lg, self.dn, self.extra = logG, done, extra

    def M0(self, N, rng):
        return np.zeros(N)

    def M(self, t, xp, rng):
        return np.zeros(len(xp) + self.extra)

    def logG(self, t, xp, x):
        return np.zeros(len(x)) if self.lg is None else self.lg(len(x))

    def done(self, t, x):
        return None if self.dn is None else self.dn(len(x))


@pytest.mark.parametrize("fk,error,match", [
    (_Bad(logG=lambda n: np.ones(n, dtype=bool)), pps.PotentialError, "dtype bool.*-inf instead of True"),
    (_Bad(logG=lambda n: np.zeros(n, dtype=complex)), pps.PotentialError, "dtype complex"),
    (_Bad(logG=lambda n: np.full(n, np.nan)), pps.PotentialError, "NaN"),
    (_Bad(done=lambda n: np.full(n, np.nan)), ValueError, "done at t=0 returned float64 values other than 0 / 1"),
    (_Bad(extra=1), ValueError, "M at t=1 returned 6 particles; expected 5"),
])
def test_engine_names_the_model_and_step_of_bad_outputs(fk, error, match):
    with pytest.raises(error, match=match):
        pps.smc(fk, 5, seed=0)
