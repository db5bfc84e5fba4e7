"""Importance sampling and particle Gibbs against exact answers; the LLM presets of
particle Gibbs and parallel tempering (budget split, refused or allowed fallback, any potential,
one ledger)."""
import numpy as np
import pytest

import ppl_scaling as pps
from ppl_scaling.result import SMCResult
from ppl_scaling.samplers.importance import importance_sampling
from ppl_scaling.samplers.parallel_tempering import pt_paper
from ppl_scaling.samplers.particle_gibbs import ConditionalSMC, particle_gibbs, pg_paper, stack_paths
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
    assert isinstance(out, SMCResult) and out.info["iterations"] == len(out.trajectories) == 2600
    paths = stack_paths(out.trajectories)[100:]  # burn-in
    assert paths.shape == (2500, 6)
    se = batch_means_se(paths)
    assert np.all(np.abs(paths.mean(0) - smooth.mean) < Z_MAX * se)
    # second moments: E[x_t²] = var + mean²
    sq = paths**2
    assert np.all(np.abs(sq.mean(0) - (smooth.var + smooth.mean**2)) < Z_MAX * batch_means_se(sq))


@pytest.mark.parametrize("how", ["ancestor_sampling", "backward_sampling"])
def test_pgas_and_backward_sampling_match_the_kalman_smoother_at_n_10(how):
    model = LinearGaussian(a=0.8, sigma_x=1.0, sigma_y=0.7)
    _, y = model.simulate(12, np.random.default_rng(2))
    smooth = model.smoother(y)
    out = particle_gibbs(model.bootstrap(y), 10, 2600, seed=5, **{how: True})
    assert out.info[how] is True
    paths = stack_paths(out.trajectories)[100:]
    for f, exact in ((paths, smooth.mean), (paths**2, smooth.var + smooth.mean**2)):
        assert np.all(np.abs(f.mean(0) - exact) < Z_MAX * batch_means_se(f))


def update_rate(paths: np.ndarray) -> np.ndarray:
    """Fraction of iterations in which the reference's state at each time changed."""
    return (np.diff(paths, axis=0) != 0).mean(0)


def test_ancestor_sampling_mixes_where_conditional_smc_is_stuck():
    """Path degeneracy: with N = 10 over T = 50 steps, plain conditional SMC almost never
    replaces the reference's early states; ancestor sampling does most of the time."""
    model = LinearGaussian(a=0.9, sigma_x=1.0, sigma_y=0.5)
    _, y = model.simulate(50, np.random.default_rng(8))
    rates = {a: update_rate(stack_paths(particle_gibbs(model.bootstrap(y), 10, 200, ancestor_sampling=a,
                                                       seed=9).trajectories))
             for a in (False, True)}
    # measured (seed 9): CSMC 0.00 at t < 10 (never replaced); PGAS 0.63 there, 0.71 over all t
    assert rates[False][:10].max() < 0.05 and rates[True][:10].mean() > 0.5 and rates[True].mean() > 0.5


def test_ancestor_and_backward_sampling_need_the_transition_density():
    model = LinearGaussian()
    _, y = model.simulate(5, np.random.default_rng(0))
    fk = pps.Tilted(Walk(), pps.Potential.from_callable(lambda x: -x**2))
    for how in ("ancestor_sampling", "backward_sampling"):
        with pytest.raises(TypeError, match=r"needs the transition log-density .*logpt"):
            particle_gibbs(fk, 4, 2, seed=0, **{how: True})


def test_conditional_smc_keeps_the_reference_alive():
    model = LinearGaussian()
    _, y = model.simulate(8, np.random.default_rng(4))
    ref = [np.array([v]) for v in np.linspace(-1, 1, 8)]
    r = ConditionalSMC(model.bootstrap(y), 10, ref).run(np.random.default_rng(5))
    assert all(h[0] == ref[t][0] for t, h in enumerate(r.history))
    assert all(A[0] == 0 for A in r.ancestors)
    assert r.resampled[1:].all() and np.isnan(r.log_evidence)  # conditional: no estimate of Z
    with pytest.raises(ValueError, match="num_particles >= 2"):
        ConditionalSMC(model.bootstrap(y), 1, ref)


def test_path_degeneracy_is_visible_in_the_genealogy():
    model = LinearGaussian()
    _, y = model.simulate(60, np.random.default_rng(6))
    r = pps.smc(model.bootstrap(y), 100, seed=7, store_history=True, ess_threshold=1.0)
    unique = r.num_unique_ancestors()
    assert unique[0] < 10 < unique[-2] < 100  # resampling every step: duplicates already one step back


# ----------------------------------------------------------------------------- LLM presets

class Walk(pps.Dynamics):
    """A Gaussian random walk over T = 5 steps (stands in for an LLM's step sampler)."""

    T = 5

    def M0(self, N, rng):
        return rng.standard_normal(N)

    def M(self, t, xp, rng):
        return xp + rng.standard_normal(xp.shape[0])


def reward(x):
    return -0.5 * (x - 1.0) ** 2


@pytest.mark.parametrize("preset, budget, runs, particles, iterations", [
    (pg_paper, 8, 4, 2, 3), (pg_paper, 7, 3, 2, 2), (pg_paper, 64, 4, 16, 3),   # S = min(4, N // 2) sweeps
    (pt_paper, 12, 3 * 2, 2, 1), (pt_paper, 50, 3 * 2, 8, 1),                   # 3 chains x min(2, N // 6)
])
def test_presets_split_the_budget_and_count_every_sweep(preset, budget, runs, particles, iterations):
    """Every particle of every SMC run (sweep, chain) is scored once per step: one ledger."""
    res = preset(Walk(), budget, potential=reward, seed=0)
    assert res.num_particles == particles and res.info["fallback"] is None
    assert res.info["method"] == ("particle_gibbs" if preset is pg_paper else "parallel_tempering")
    assert res.info["selection_rule"] == "argmax_reward" and res.rewards.shape == (particles,)
    assert len(res.trajectories) == res.info["iterations"] == iterations
    assert res.ledger.reward_calls == runs * particles * Walk.T
    assert res.select(list(range(particles))) == int(np.argmax(res.rewards))


@pytest.mark.parametrize("preset, budget, smallest", [(pg_paper, 3, 4), (pt_paper, 11, 12)])
def test_presets_refuse_small_budgets_unless_a_fallback_is_allowed(preset, budget, smallest):
    """Too small a budget would silently be plain PF: refused, naming the smallest budget and
    the method to use; ``allow_fallback=True`` runs the PF paper's filter and says so."""
    with pytest.raises(ValueError, match=f"smallest budget .* is N={smallest}.*'particle_filtering'.*allow_fallback"):
        preset(Walk(), budget, potential=reward, seed=0)
    res = preset(Walk(), budget, potential=reward, seed=0, allow_fallback=True)
    assert res.info["fallback"] == "particle_filtering" and res.num_particles == budget
    assert res.trajectories is None and res.ledger.reward_calls == budget * Walk.T
    ok = preset(Walk(), smallest, potential=reward, seed=0)   # the smallest budget runs the method itself
    assert ok.info["fallback"] is None and ok.trajectories


def test_presets_refuse_a_single_sweep():
    with pytest.raises(ValueError, match="sweeps >= 2"):
        pg_paper(Walk(), 16, potential=reward, seed=0, sweeps=1)
    with pytest.raises(ValueError, match="sweeps >= 2"):
        pt_paper(Walk(), 48, potential=reward, seed=0, sweeps=1)


class NoConfigure(pps.Potential):
    """A reward model like ``LLMJudge``: a Potential subclass without ``configured``."""

    name = "judge-like"

    def prefix(self, xs):
        return np.zeros(len(xs))

    def complete(self, xs):
        return -0.5 * (np.asarray(xs) - 1.0) ** 2


@pytest.mark.parametrize("potential", [pps.Potential.from_callable(reward), NoConfigure(), reward],
                         ids=["from_callable", "judge_like", "function"])
@pytest.mark.parametrize("preset", ["pf_paper", "pg_paper", "pt_paper", "particle_filtering"])
def test_every_preset_accepts_any_potential(preset, potential):
    from ppl_scaling.samplers import particle_filtering, pf_paper

    fn = {"pf_paper": pf_paper, "pg_paper": pg_paper, "pt_paper": pt_paper,
          "particle_filtering": particle_filtering}[preset]
    res = fn(Walk(), 12, potential=potential, seed=0)
    assert res.rewards is not None and np.all(np.isfinite(res.rewards)) and res.ledger.reward_calls > 0
    assert not hasattr(potential, "configured")
    if preset != "particle_filtering":   # a PRM's step aggregation is refused for other potentials
        with pytest.raises(TypeError, match="aggregation.*needs a ProcessRewardModel"):
            fn(Walk(), 12, potential=potential, seed=0, aggregation="min")


def test_importance_sampling_with_a_potential_weighs_by_the_final_reward():
    res = importance_sampling(Walk(), 50, potential=reward, lam=2.0, seed=0)
    np.testing.assert_allclose(res.log_weights, 2.0 * reward(res.particles.base))
    assert res.ledger.reward_calls == 50 and res.info["method"] == "importance_sampling"
