"""Importance sampling and particle Gibbs against exact answers."""
import numpy as np

import ppl_scaling as pps
from ppl_scaling.samplers import importance_sampling, particle_gibbs
from ppl_scaling.ssm import LinearGaussian

Z_MAX = 4.5


def test_importance_sampling_never_resamples_and_is_unbiased():
    model = LinearGaussian(sigma_y=2.0)
    _, y = model.simulate(5, np.random.default_rng(0))
    rng = np.random.default_rng(1)
    runs = [importance_sampling(model.bootstrap(y), 30, rng=rng) for _ in range(1000)]
    assert not any(r.resampled.any() for r in runs)
    ratios = np.exp(np.array([r.log_evidence for r in runs]) - model.kalman(y).log_evidence)
    assert abs(ratios.mean() - 1) < Z_MAX * ratios.std(ddof=1) / np.sqrt(len(ratios))


def batch_means_se(chain: np.ndarray, batches: int = 25) -> np.ndarray:
    """Standard error of a correlated chain's mean (columns), by batch means."""
    n = len(chain) // batches * batches
    means = chain[:n].reshape(batches, -1, *chain.shape[1:]).mean(1)
    return means.std(0, ddof=1) / np.sqrt(batches)


def test_particle_gibbs_leaves_the_smoothing_distribution_invariant():
    model = LinearGaussian(a=0.8, sigma_x=1.0, sigma_y=0.7)
    _, y = model.simulate(6, np.random.default_rng(2))
    smooth = model.smoother(y)
    out = particle_gibbs(model.bootstrap(y), num_particles=15, num_iterations=2600, seed=3)
    paths = out.stacked()[100:]  # burn-in
    assert paths.shape == (2500, 6)
    se = batch_means_se(paths)
    assert np.all(np.abs(paths.mean(0) - smooth.mean) < Z_MAX * se)
    # second moments: E[x_t²] = var + mean²
    sq = paths**2
    assert np.all(np.abs(sq.mean(0) - (smooth.var + smooth.mean**2)) < Z_MAX * batch_means_se(sq))


def test_conditional_smc_keeps_the_reference_alive():
    model = LinearGaussian()
    _, y = model.simulate(8, np.random.default_rng(4))
    ref = [np.array([v]) for v in np.linspace(-1, 1, 8)]
    from ppl_scaling.samplers import ConditionalSMC

    r = ConditionalSMC(model.bootstrap(y), 10, ref).run(np.random.default_rng(5))
    assert all(h[0] == ref[t][0] for t, h in enumerate(r.history))
    assert all(A[0] == 0 for A in r.ancestors)


def test_path_degeneracy_is_visible_in_the_genealogy():
    model = LinearGaussian()
    _, y = model.simulate(60, np.random.default_rng(6))
    r = pps.smc(model.bootstrap(y), 100, seed=7, store_history=True, ess_threshold=1.0)
    unique = r.num_unique_ancestors()
    assert unique[0] < 10 < unique[-1] == 100
