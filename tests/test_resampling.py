"""Resampling schemes: deterministic invariants and statistical unbiasedness.

Unbiasedness: E[N_i] = M W_i. Over R replicates, z_i = (mean N_i - M W_i) / (sd_i / sqrt R)
is ~N(0, 1); with <= 20 components per configuration, max |z| < 4.5 has a
false-alarm rate below 1e-4. A deliberately biased scheme must fail the same check.
"""
import numpy as np
import pytest

from ppl_scaling import resampling
from ppl_scaling.resampling import SCHEMES, inverse_cdf

R = 6000
Z_MAX = 4.5


def offspring(A: np.ndarray, N: int) -> np.ndarray:
    return np.bincount(A, minlength=N)


def unbiasedness_z(scheme, W: np.ndarray, M: int, rng) -> float:
    counts = np.array([offspring(scheme(rng, W, M), len(W)) for _ in range(R)])
    mean, sd = counts.mean(0), counts.std(0, ddof=1)
    dev = mean - M * W
    # A count that never varied (a deterministic copy, or a weight too small to be
    # drawn in R replicates) is judged with the multinomial sd sqrt(M W (1 - W)).
    sd = np.where(sd > 0, sd, np.sqrt(M * W * (1 - W)))
    exact = sd == 0  # zero or unit weights: counts must be exact
    if np.any(exact & (np.abs(dev) > 1e-9)):
        return np.inf
    return float(np.max(np.abs(dev[~exact]) / (sd[~exact] / np.sqrt(R)), initial=0.0))


def weight_configs(rng):
    yield rng.dirichlet(np.full(12, 0.1))
    yield rng.dirichlet(np.full(12, 1.0))
    yield rng.dirichlet(np.full(12, 10.0))
    W = np.array([0.0, 0.3, 0.0, 0.05, 0.45, 0.2, 0.0])  # leading, interior, trailing zeros
    yield W


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_unbiased_offspring_counts(name):
    rng = np.random.default_rng(1)
    for W in weight_configs(rng):
        for M in (len(W), 2 * len(W) + 1):
            assert unbiasedness_z(SCHEMES[name], W, M, rng) < Z_MAX, (name, W, M)


def test_negative_control_biased_scheme_is_rejected():
    def squared_weights(rng, W, M=None):  # a plausible bug: resample with W**2
        W2 = W**2 / np.sum(W**2)
        return resampling.multinomial(rng, W2, M)

    rng = np.random.default_rng(2)
    W = rng.dirichlet(np.full(12, 1.0))
    assert unbiasedness_z(squared_weights, W, 12, rng) > Z_MAX


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_basic_invariants_and_zero_weights(name):
    rng = np.random.default_rng(3)
    W = np.array([0.0, 0.0, 0.2, 0.0, 0.5, 0.3, 0.0])
    for M in (1, 7, 50):
        A = SCHEMES[name](rng, W, M)
        assert A.shape == (M,) and A.dtype == np.int64
        assert A.min() >= 0 and A.max() < len(W)
        assert np.all(W[A] > 0), "a zero-weight particle was selected"
    single = np.zeros(9)
    single[4] = 1.0
    assert np.all(SCHEMES[name](rng, single) == 4)


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_float32_weights_whose_sum_is_below_one(name):
    rng = np.random.default_rng(4)
    W = np.full(1000, 1e-3, dtype=np.float32)
    W[-1] = 0.0  # the cumulative sum in float32 stops short of 1
    for _ in range(50):
        A = SCHEMES[name](rng, W)
        assert A.max() < 999


def test_inverse_cdf_with_a_uniform_of_exactly_zero_skips_zero_weights():
    W = np.array([0.0, 0.0, 1.0, 0.0])
    assert inverse_cdf(np.array([0.0, 0.999999]), W).tolist() == [2, 2]


@pytest.mark.parametrize("name", ["systematic", "ssp"])
def test_offspring_between_floor_and_ceil(name):
    rng = np.random.default_rng(5)
    for _ in range(200):
        W = rng.dirichlet(np.full(15, 0.5))
        M = int(rng.integers(1, 40))
        n = offspring(SCHEMES[name](rng, W, M), 15)
        assert np.all(n >= np.floor(M * W) - 1e-9) and np.all(n <= np.ceil(M * W) + 1e-9)
        assert n.sum() == M


def test_residual_keeps_the_deterministic_copies():
    rng = np.random.default_rng(6)
    for _ in range(200):
        W = rng.dirichlet(np.full(15, 0.5))
        assert np.all(offspring(resampling.residual(rng, W), 15) >= np.floor(15 * W))


@pytest.mark.parametrize("name", ["stratified", "residual"])
def test_variance_is_below_multinomial(name):
    """Var of the resampled mean of f(x) = x (x sorted): stratified and residual are
    provably <= multinomial (Douc, Cappe & Moulines 2005). One-sided F-test at 1e-4
    that the variance is strictly smaller on this configuration."""
    from scipy import stats

    rng = np.random.default_rng(7)
    N, reps = 20, 3000
    x = np.sort(rng.standard_normal(N))
    W = rng.dirichlet(np.ones(N))
    est = {s: np.array([x[SCHEMES[s](rng, W)].mean() for _ in range(reps)]) for s in (name, "multinomial")}
    F = est["multinomial"].var(ddof=1) / est[name].var(ddof=1)
    assert stats.f.sf(F, reps - 1, reps - 1) < 1e-4, F


def test_scheme_lookup_errors():
    with pytest.raises(ValueError, match="unknown resampling scheme"):
        resampling.get_scheme("stratifed")
    with pytest.raises(ValueError, match="sum to zero"):
        resampling.systematic(np.random.default_rng(0), np.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        resampling.systematic(np.random.default_rng(0), np.array([0.5, np.nan]))


class _AlmostOne:
    """A generator whose every uniform is the largest double below 1 (numpy's
    ``Generator.random`` can return 1 - 2^-53)."""

    def random(self, size=None):
        u = 1.0 - 2.0**-53
        return u if size is None else np.full(size, u)


@pytest.mark.parametrize("name", sorted(SCHEMES))
@pytest.mark.parametrize("N", [3, 7, 1000, 4097])
def test_ancestors_stay_in_range_when_uniforms_are_one_minus_2_to_the_minus_53(name, N):
    rng = np.random.default_rng(N)
    for W in (rng.dirichlet(np.ones(N)), np.r_[rng.dirichlet(np.ones(N - 1)), 0.0]):
        A = SCHEMES[name](_AlmostOne(), W)
        assert A.shape == (N,) and A.min() >= 0 and A.max() <= N - 1, (A.min(), A.max())
        assert np.all(W[A] > 0)  # never a particle of weight zero
