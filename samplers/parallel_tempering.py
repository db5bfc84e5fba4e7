"""Parallel tempering over potential temperatures, with conditional SMC chains.

Chain k targets the FK model with its potentials raised to the power lam_k,

    pi_k(x_{0:T}) ∝ M0(x_0) Π_t M_t(x_{t-1}, x_t) · exp(lam_k L(x_{0:T})),
    L(x_{0:T}) = Σ_t log G_t(x_{t-1}, x_t)             (the path's total log potential),

so lam = 1 is the model itself and lam = 0 its support under the dynamics: G ** 0 =
1[G > 0], the one meaning of lam = 0 (as in ``Tilted``, the FK shapes and
``Potential.tempered``): paths the potential rejects stay rejected, all others weigh
alike. ``TemperedFK(fk, lam)`` is that model; for ``fk = Tilted(dynamics, potential,
shape, lam=a)`` only the tilt is tempered (the dynamics' own logG is kept) and chain k
has exactly the potentials of ``Tilted(dynamics, potential, shape, lam=lam_k a)``.

Every iteration runs one conditional SMC sweep per chain (``ConditionalSMC``, reference
in slot 0), draws each chain's new reference path, then proposes to swap the references
of neighbouring chains (k, k+1) — pairs (0,1), (2,3), ... on even iterations and (1,2),
(3,4), ... on odd ones — accepted with the Metropolis-Hastings probability

    min(1, pi_k(x') pi_{k+1}(x) / (pi_k(x) pi_{k+1}(x')))
      = min(1, exp((lam_k - lam_{k+1}) (L(x') - L(x))))       x = ref_k, x' = ref_{k+1},

where the dynamics cancel because all chains share them. Each sweep leaves its chain's
target invariant and each swap the product of targets, so every chain is an exact MCMC
sampler of its tempered target for any N >= 2 (Puri et al. 2025, Alg. 3). All chains
move the same states (those of ``fk``), so references can change chains.

    out = parallel_tempering(fk, lams=[1.0, 0.5, 0.25], num_particles=16, num_iterations=100, seed=0)
    out                                  # the last sweep of chain 0 (lams[0], usually 1): an SMCResult
    out.trajectories                     # chain 0's reference path after each iteration
    out.info["chain_trajectories"][k]    # chain k's
    out.info["acceptance"]               # swap acceptance rate of each neighbouring pair
    out.ledger                           # every sweep of every chain

``pt_paper`` is the LLM preset of ``METHODS``: chains at lam_k times the PF paper's weighting.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ppl_scaling.ledger import recording
from ppl_scaling.result import SMCResult
from ppl_scaling.rng import as_generator
from ppl_scaling.smc import SMC, as_log_potential
from ppl_scaling.tilt import Tilted

from .particle_filtering import paper_tilt, pf_paper_instead
from .particle_gibbs import ConditionalSMC, draw_trajectory

__all__ = ["TemperedFK", "log_potential_parts", "path_log_potential", "parallel_tempering", "pt_paper", "METHODS"]


def log_potential_parts(fk: Any, t: int, xp: Any, x: Any) -> tuple[np.ndarray, np.ndarray | float]:
    """log G_t split into (the potential that temperatures scale, the part they keep): for a
    ``Tilted`` fk the tilt's shaped potential and the dynamics' own logG, else (fk.logG, 0)."""
    if not isinstance(fk, Tilted):
        return np.asarray(fk.logG(t, xp, x), dtype=np.float64), 0.0
    own = getattr(fk.dynamics, "logG", None)
    kept = 0.0 if own is None else np.asarray(own(t, None if xp is None else xp.base, x.base), dtype=np.float64)
    return x.logG, kept


class TemperedFK:
    """``fk`` with its potentials raised to the power ``lam`` >= 0: log G -> lam log G, where
    G ** 0 = 1[G > 0] (a -inf stays -inf); same M0, M, done and states as ``fk``. For a
    ``Tilted`` fk the dynamics' own logG is not tempered (``log_potential_parts``)."""

    def __init__(self, fk: Any, lam: float) -> None:
        if not (np.isfinite(lam) and lam >= 0):
            raise ValueError(f"temperature lam must be finite and >= 0, got {lam}")
        self.fk, self.lam, self.T = fk, float(lam), fk.T

    def M0(self, N: int, rng: np.random.Generator) -> Any:
        return self.fk.M0(N, rng)

    def M(self, t: int, xp: Any, rng: np.random.Generator) -> Any:
        return self.fk.M(t, xp, rng)

    def logG(self, t: int, xp: Any, x: Any) -> np.ndarray:
        tempered, kept = log_potential_parts(self.fk, t, xp, x)
        with np.errstate(invalid="ignore"):
            return np.where(np.isneginf(tempered), -np.inf, self.lam * tempered) + kept

    def done(self, t: int, x: Any) -> Any:
        return self.fk.done(t, x) if hasattr(self.fk, "done") else None


def path_log_potential(fk: Any, path: Sequence[Any]) -> float:
    """L(x_{0:T}) = Σ_t log G_t along a 1-particle path, the part a temperature scales
    (``log_potential_parts``); steps after the path finished count 0."""
    total, finished = 0.0, False
    for t, x in enumerate(path):
        if finished:
            break
        tempered, _ = log_potential_parts(fk, t, path[t - 1] if t else None, x)
        total += float(as_log_potential(tempered, 1, t)[0])
        d = fk.done(t, x) if hasattr(fk, "done") else None
        finished = d is not None and bool(np.asarray(d)[0])
    return total


def parallel_tempering(fk: Any, lams: Sequence[float], num_particles: int, num_iterations: int, *,
                       seed: int | None = None, rng: np.random.Generator | None = None,
                       progress: bool = False) -> SMCResult:
    """``num_iterations`` of parallel tempering on ``fk`` at temperatures ``lams`` (lams[0] is
    usually 1, the target): the last sweep of chain 0 with its reference paths in
    ``trajectories``, every chain's in ``info["chain_trajectories"]``, the swap acceptance
    rates in ``info["acceptance"]`` and the ledger of every sweep. Initial references come
    from one plain SMC run per chain."""
    lams = [float(v) for v in lams]
    if len(lams) < 1:
        raise ValueError("parallel tempering needs at least one temperature")
    if isinstance(num_iterations, bool) or not isinstance(num_iterations, (int, np.integer)) or num_iterations < 1:
        raise ValueError(f"num_iterations must be a positive integer, got {num_iterations!r}")
    rng = as_generator(seed, rng)
    chains = [TemperedFK(fk, lam) for lam in lams]
    paths: list[list[list[Any]]] = [[] for _ in lams]
    tried, accepted = np.zeros(len(lams) - 1), np.zeros(len(lams) - 1)
    with recording() as spent:
        refs = [draw_trajectory(SMC(c, num_particles, store_history=True).run(rng), rng) for c in chains]
        L = [path_log_potential(fk, r) for r in refs]
        for it in tqdm(range(num_iterations), desc="parallel tempering", disable=not progress, leave=False):
            for k, chain in enumerate(chains):
                result = ConditionalSMC(chain, num_particles, refs[k]).run(rng)
                if k == 0:
                    last = result
                refs[k] = draw_trajectory(result, rng)
                L[k] = path_log_potential(fk, refs[k])
            for k in range(it % 2, len(lams) - 1, 2):
                tried[k] += 1
                log_a = (lams[k] - lams[k + 1]) * (L[k + 1] - L[k])
                if np.isnan(log_a):  # both paths rejected (-inf): nothing to compare, keep them
                    continue
                if np.log(rng.random()) < log_a:
                    refs[k], refs[k + 1], L[k], L[k + 1] = refs[k + 1], refs[k], L[k + 1], L[k]
                    accepted[k] += 1
            for k in range(len(lams)):
                paths[k].append(refs[k])
    acceptance = np.divide(accepted, tried, out=np.zeros_like(accepted), where=tried > 0)
    return replace(last, trajectories=paths[0], ledger=spent,
                   info={**last.info, "lams": lams, "acceptance": acceptance, "chain_trajectories": paths,
                         "iterations": int(num_iterations)})


def pt_paper(model: Any, budget: int, *, potential: Any, rng: np.random.Generator | None = None,
             seed: int | None = None, softmax_temperature: float = 1.0,
             lams: Sequence[float] = (1.0, 0.5, 0.25), sweeps: int = 2, aggregation: str | None = None,
             selection_rule: str = "argmax_reward", allow_fallback: bool = False,
             progress: bool = False) -> SMCResult:
    """Parallel tempering with chains at lam_k times the PF paper's weighting (``paper_tilt``):
    budget N = K chains x S sweeps x N // (K S) particles, S = min(sweeps, N // (2K)) sweeps
    per chain, the initial plain SMC run included. The answer is the lam_0 = 1 chain's last
    sweep's particle with the highest final reward. ``potential``: any potential (a PRM is
    re-read as logit p). S < 2 (N < 4K, 12 for the 3 default chains) is refused unless
    ``allow_fallback=True``, which runs the PF paper's filter with all N particles instead,
    recorded in ``info["fallback"]``."""
    if isinstance(sweeps, bool) or not isinstance(sweeps, (int, np.integer)) or sweeps < 1:
        raise ValueError(f"sweeps must be a positive integer, got {sweeps!r}")
    K = len(lams)
    S = min(int(sweeps), budget // (2 * K))
    if S < 2:
        smallest = (f"the smallest budget for parallel tempering with {K} chains is N={4 * K} ({K} chains x 2 sweeps "
                    "x 2 particles)") if sweeps >= 2 else "use sweeps >= 2"
        return pf_paper_instead(
            "parallel_tempering", f"parallel tempering (pt_paper) with budget N={budget}, {K} chains and "
            f"sweeps={sweeps} would not swap between sweeps, i.e. plain particle filtering: {smallest}", model,
            budget, allow_fallback=allow_fallback, potential=potential, softmax_temperature=softmax_temperature,
            aggregation=aggregation, selection_rule=selection_rule, seed=seed, rng=rng, progress=progress)
    fk = paper_tilt(model, potential, softmax_temperature, aggregation=aggregation)
    res = parallel_tempering(fk, lams, budget // (K * S), S - 1, seed=seed, rng=rng, progress=progress)
    return res.for_method("parallel_tempering", selection_rule, fallback=None, sweeps=S,
                          softmax_temperature=softmax_temperature)


METHODS = {"parallel_tempering": pt_paper}
