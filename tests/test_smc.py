"""The SMC engine against exact answers (Kalman filter, forward algorithm).

Evidence: Z_hat is unbiased for every N, scheme and (adaptive) threshold, so over
R independent runs mean(Z_hat / Z) = 1 within Z_MAX standard errors. (log Z_hat is
biased low by Jensen, so the test is on the natural scale.)
"""
import numpy as np
import pytest

import ppl_scaling as pps
from ppl_scaling.ssm import DiscreteHMM, LinearGaussian

Z_MAX = 4.5


def assert_unbiased(ratios: np.ndarray) -> None:
    se = ratios.std(ddof=1) / np.sqrt(len(ratios))
    assert abs(ratios.mean() - 1.0) < Z_MAX * se, (ratios.mean(), se)


@pytest.fixture(scope="module")
def lingauss():
    model = LinearGaussian(a=0.9, sigma_x=1.0, sigma_y=1.5, sigma0=1.0)
    _, y = model.simulate(10, np.random.default_rng(0))
    return model, y


@pytest.mark.parametrize(
    "threshold,scheme",
    [(0.0, "systematic")] + [(thr, s) for thr in (0.5, 1.0) for s in sorted(pps.resampling.SCHEMES)],
)
def test_evidence_unbiased_against_kalman(lingauss, threshold, scheme):
    model, y = lingauss
    fk, log_Z = model.bootstrap(y), model.kalman(y).log_evidence
    rng = np.random.default_rng(11)
    ratios = np.array([np.exp(pps.smc(fk, 25, ess_threshold=threshold, resampling=scheme, rng=rng).log_evidence - log_Z)
                       for _ in range(800)])
    assert_unbiased(ratios)


def test_filtering_means_match_kalman(lingauss):
    """Each run's filtering mean has O(1/N) bias; across R runs its mean is within
    Z_MAX standard errors of the Kalman mean at every step."""
    model, y = lingauss
    exact = model.kalman(y)
    rng = np.random.default_rng(12)
    est = np.array([pps.smc(model.bootstrap(y), 2000, rng=rng, store_history=True).filtering_mean() for _ in range(30)])
    se = est.std(0, ddof=1) / np.sqrt(len(est))
    assert np.all(np.abs(est.mean(0) - exact.mean) < Z_MAX * se + 1e-3)
    # and the weighted variance at the last step is close to the Kalman variance
    r = pps.smc(model.bootstrap(y), 20000, seed=3)
    var = r.weights @ (r.particles - r.weights @ r.particles) ** 2
    assert abs(var / exact.var[-1] - 1) < 0.1


def test_log_evidence_variance_shrinks_like_one_over_N(lingauss):
    model, y = lingauss
    rng = np.random.default_rng(13)
    var = {N: np.var([pps.smc(model.bootstrap(y), N, rng=rng).log_evidence for _ in range(300)]) for N in (20, 80)}
    # Var(log Z_hat) ~ c / N: a factor 4 in N gives about 4; the F(299, 299) quantiles at 1e-4 are about 0.6 / 1.6
    assert 4 * 0.6 < var[20] / var[80] < 4 * 1.6


@pytest.fixture(scope="module")
def hmm():
    model = DiscreteHMM(
        init=np.array([0.5, 0.3, 0.2]),
        trans=np.array([[0.8, 0.15, 0.05], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]),
        emit=np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]),
    )
    _, y = model.simulate(8, np.random.default_rng(1))
    return model, y


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
def test_hmm_evidence_unbiased_against_forward_algorithm(hmm, threshold):
    model, y = hmm
    log_Z = model.forward(y).log_evidence
    rng = np.random.default_rng(14)
    ratios = np.array([np.exp(pps.smc(model.bootstrap(y), 10, ess_threshold=threshold, rng=rng).log_evidence - log_Z)
                       for _ in range(1500)])
    assert_unbiased(ratios)


def test_hmm_filtering_marginals(hmm):
    model, y = hmm
    exact = model.forward(y).probs
    rng = np.random.default_rng(15)
    one_hot = lambda x: np.eye(3)[x]  # noqa: E731
    est = np.array([pps.smc(model.bootstrap(y), 1000, rng=rng, store_history=True).filtering_mean(one_hot)
                    for _ in range(20)])
    se = est.std(0, ddof=1) / np.sqrt(len(est))
    assert np.all(np.abs(est.mean(0) - exact) < Z_MAX * se + 2e-3)


class Constant(pps.FeynmanKac):
    def __init__(self, c: float, T: int):
        self.c, self.T = c, T

    def M0(self, N, rng):
        return rng.standard_normal(N)

    def M(self, t, xp, rng):
        return xp + rng.standard_normal(xp.shape[0])

    def logG(self, t, xp, x):
        return np.full(x.shape[0], self.c)


def test_constant_potentials_give_exact_evidence():
    r = pps.smc(Constant(0.0, 7), 50, seed=0)
    assert r.log_evidence == 0.0 and np.allclose(r.ess, 50)
    r = pps.smc(Constant(-1.3, 7), 50, seed=0, ess_threshold=1.0)
    assert np.isclose(r.log_evidence, -1.3 * 7)
    assert r.resampled[1:].all() and not r.resampled[0]


def test_same_seed_same_result_and_no_global_rng_use(lingauss):
    import torch

    model, y = lingauss
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    a = pps.smc(model.bootstrap(y), 100, seed=5)
    b = pps.smc(model.bootstrap(y), 100, seed=5)
    assert np.array_equal(a.particles, b.particles) and a.log_evidence == b.log_evidence
    assert np.array_equal(np.random.get_state()[1], np_state) and torch.equal(torch.get_rng_state(), torch_state)


def test_numpy_torch_and_jax_states_agree(lingauss):
    jax = pytest.importorskip("jax", reason='the jax extra: pip install "ppl-scaling[jax]"')

    model, y = lingauss
    ref = pps.smc(model.bootstrap(y, backend="numpy"), 200, seed=9)
    tor = pps.smc(model.bootstrap(y, backend="torch"), 200, seed=9)
    with jax.enable_x64(True):
        jx = pps.smc(model.bootstrap(y, backend="jax"), 200, seed=9)
        jx_particles = np.asarray(jx.particles)
    for other, particles in ((tor, tor.particles.numpy()), (jx, jx_particles)):
        assert np.allclose(particles, ref.particles, rtol=1e-12, atol=1e-12)
        assert np.isclose(other.log_evidence, ref.log_evidence, rtol=1e-12)
        assert np.array_equal(other.resampled, ref.resampled)


class Finishing(pps.FeynmanKac):
    """Particles are counters that grow by 1 or 2 and finish (at step 2 or 3) once they exceed 3."""

    T = 20

    def M0(self, N, rng):
        return {"count": np.zeros(N, dtype=np.int64), "moves": np.zeros(N, dtype=np.int64)}

    def M(self, t, xp, rng):
        step = rng.integers(1, 3, xp["count"].shape[0])
        return {"count": xp["count"] + step, "moves": xp["moves"] + 1}

    def logG(self, t, xp, x):
        return -0.1 * x["count"].astype(float)

    def done(self, t, x):
        return x["count"] > 3


def test_finished_particles_are_frozen_and_the_run_stops_early():
    r = pps.smc(Finishing(), 64, seed=2, store_history=True)
    assert r.done.all() and len(r.ess) < Finishing.T
    assert np.all(r.particles["count"] >= 4)
    # a finished particle never moves again: moves == the step at which it finished
    lineage_counts = np.array([h["count"] for h in r.paths()])
    finish_step = np.argmax(lineage_counts > 3, axis=0)
    assert np.array_equal(r.particles["moves"], finish_step)


def test_potential_errors_are_clear():
    class Bad(Constant):
        def __init__(self, out):
            super().__init__(0.0, 3)
            self.out = out

        def logG(self, t, xp, x):
            return self.out(x)

    with pytest.raises(pps.PotentialError, match=r"shape \(5, 1\).*expected \(5,\)"):
        pps.smc(Bad(lambda x: np.zeros((5, 1))), 5, seed=0)
    with pytest.raises(pps.PotentialError, match="NaN for 1 of 5"):
        pps.smc(Bad(lambda x: np.array([0, 0, np.nan, 0, 0])), 5, seed=0)
    with pytest.raises(pps.DegenerateWeightsError, match="step t=0"):
        pps.smc(Bad(lambda x: np.full(5, -np.inf)), 5, seed=0)
    with pytest.raises(ValueError, match="num_particles must be a positive integer"):
        pps.smc(Constant(0.0, 3), 0)
    with pytest.raises(ValueError, match="ess_threshold"):
        pps.smc(Constant(0.0, 3), 5, ess_threshold=2)
    with pytest.raises(ValueError, match="unknown resampling"):
        pps.smc(Constant(0.0, 3), 5, resampling="sytematic")


def test_all_weights_die_at_a_later_step():
    class DiesAtTwo(Constant):
        def logG(self, t, xp, x):
            return np.full(x.shape[0], -np.inf if t == 2 else 0.0)

    with pytest.raises(pps.DegenerateWeightsError, match="step t=2"):
        pps.smc(DiesAtTwo(0.0, 4), 8, seed=0)


def test_resample_at_schedule_and_importance_sampling():
    r = pps.smc(Constant(-0.5, 6), 10, resample_at=[2, 4], seed=0)
    assert r.resampled.tolist() == [False, False, True, False, True, False]
    r = pps.smc(Constant(-0.5, 6), 10, ess_threshold=0.0, seed=0)
    assert not r.resampled.any()


def test_result_views(lingauss):
    model, y = lingauss
    r = pps.smc(model.bootstrap(y), 300, seed=4, store_history=True)
    draws = r.resample(1000, seed=0)
    assert draws.shape == (1000,)
    assert abs(draws.mean() - r.weights @ r.particles) < 5 * np.sqrt(r.weights @ r.particles**2) / np.sqrt(1000)
    assert r.lineage().shape == (len(y), 300)
    n_unique = r.num_unique_ancestors()
    # path degeneracy: fewer distinct ancestors further back, strictly fewer than N at the start
    assert np.all(np.diff(n_unique) >= 0) and n_unique[0] < n_unique[-2] < 300
    assert "log evidence" in r.summary()
    assert np.isclose(r.cumulative_log_evidence[-1], r.log_evidence)


def test_to_arviz_layout(lingauss):
    model, y = lingauss
    runs = [pps.smc(model.bootstrap(y), 50, seed=s) for s in range(3)]
    from ppl_scaling.arviz_export import to_arviz

    idata = to_arviz(runs)
    assert idata.posterior["x"].shape == (3, 50)
    assert idata.sample_stats["log_weight"].shape == (3, 50)
    assert idata.smc_stats["ess"].dims == ("chain", "step")
    assert np.allclose(idata.sample_stats["log_marginal_likelihood"].values, [r.log_evidence for r in runs])
    assert np.allclose(idata.smc_stats["log_evidence"].values[:, -1], [r.log_evidence for r in runs])
    single = runs[0].to_arviz()
    assert single.posterior["x"].shape == (1, 50)


def test_to_arviz_posterior_fields_from_extra_info_and_a_state_hook(lingauss):
    """Non-array particles (LLM states) reach the posterior through ``extra``, a result's
    ``info["posterior_fields"]`` or the state's ``arviz_fields()``; lengths are checked."""
    from dataclasses import replace

    from ppl_scaling.arviz_export import to_arviz

    model, y = lingauss
    runs = [pps.smc(model.bootstrap(y), 6, seed=s) for s in range(2)]
    extra = [{"answer": np.array(["7", "", "3", "7", "7", "1"]), "length": np.arange(6) + 10 * i} for i in range(2)]
    idata = to_arviz(runs, extra=extra)
    assert idata.posterior["answer"].shape == (2, 6) and idata.posterior["answer"].values[0, 2] == "3"
    assert np.array_equal(idata.posterior["length"].values[1], np.arange(6) + 10)
    assert idata.posterior["x"].shape == (2, 6)

    class Texts:   # a state that is not an array, with the hook
        def arviz_fields(self):
            return {"length": np.array([3, 4, 5, 6, 7, 8])}

    r = replace(runs[0], particles=Texts(), rewards=np.linspace(-1, 0, 6),
                info={**runs[0].info, "posterior_fields": {"answer": np.array(list("abcdef"))}})
    post = r.to_arviz().posterior
    assert set(post.data_vars) == {"length", "reward", "answer"}
    assert np.allclose(post["reward"].values[0], np.linspace(-1, 0, 6))
    assert post.to_dataframe().shape[0] == 6
    with pytest.raises(ValueError, match="one entry per particle"):
        r.to_arviz(extra={"bad": np.zeros(5)})
    with pytest.raises(ValueError, match="2 runs"):
        to_arviz(runs, extra=extra[:1])


def test_to_arviz_builds_a_datatree_for_arviz_1(lingauss, monkeypatch):
    """arviz >= 1 (Python >= 3.12) takes xarray DataTrees: the same groups and layout."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az
    import xarray as xr

    monkeypatch.setattr(az, "__version__", "1.0.0")
    model, y = lingauss
    tree = pps.smc(model.bootstrap(y), 40, seed=0).to_arviz()
    assert isinstance(tree, xr.DataTree)
    assert set(tree.children) == {"posterior", "sample_stats", "smc_stats"}
    assert tree["posterior"]["x"].shape == (1, 40) and tree["smc_stats"]["ess"].dims == ("chain", "step")
