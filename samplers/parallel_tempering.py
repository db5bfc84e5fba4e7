"""Parallel tempering over potential temperatures, with conditional SMC chains.

Chain k targets the FK model with its potentials tempered by lam_k,

    pi_k(x_{0:T}) ∝ M0(x_0) Π_t M_t(x_{t-1}, x_t) · exp(lam_k L(x_{0:T})),
    L(x_{0:T}) = Σ_t log G_t(x_{t-1}, x_t)             (the path's total log potential),

so lam = 1 is the model itself and lam = 0 its prior (the LLM without reward).
``TemperedFK(fk, lam)`` is that model: same M0 and M, logG multiplied by lam. Every
iteration runs one conditional SMC sweep per chain (``ConditionalSMC``, reference in
slot 0), draws each chain's new reference path, then proposes to swap the references
of neighbouring chains (k, k+1) — pairs (0,1), (2,3), ... on even iterations and
(1,2), (3,4), ... on odd ones — accepted with the Metropolis-Hastings probability

    min(1, pi_k(x') pi_{k+1}(x) / (pi_k(x) pi_{k+1}(x')))
      = min(1, exp((lam_k - lam_{k+1}) (L(x') - L(x))))       x = ref_k, x' = ref_{k+1},

where the dynamics cancel because all chains share them. Each sweep leaves its
chain's target invariant and each swap the product of targets, so every chain is an
exact MCMC sampler of its tempered target for any N >= 2 (Puri et al. 2025, Alg. 3).

Requirement: ``fk.logG(t, xp, x)`` must be the same function of the states in every
chain (it is read along reference paths). A ``StepModel`` qualifies when built with
lam = 1: its states carry their lam = 1 potentials and ``TemperedFK`` scales them.

    out = parallel_tempering(fk, lams=[1.0, 0.5, 0.25], num_particles=16, num_iterations=100, seed=0)
    out.trajectories[0]          # the lam = 1 chain's reference path after each iteration
    out.acceptance               # swap acceptance rate of each neighbouring pair
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from ppl_scaling.result import SMCResult
from ppl_scaling.rng import as_generator
from ppl_scaling.smc import SMC, as_log_potential

from .particle_gibbs import ConditionalSMC, draw_trajectory


class TemperedFK:
    """``fk`` with every log potential multiplied by ``lam`` >= 0 (lam = 0 ignores the
    potential entirely, -inf included: the chain samples the dynamics alone)."""

    def __init__(self, fk: Any, lam: float) -> None:
        if not (np.isfinite(lam) and lam >= 0):
            raise ValueError(f"temperature lam must be finite and >= 0, got {lam}")
        self.fk, self.lam, self.T = fk, float(lam), fk.T

    def M0(self, N: int, rng: np.random.Generator) -> Any:
        return self.fk.M0(N, rng)

    def M(self, t: int, xp: Any, rng: np.random.Generator) -> Any:
        return self.fk.M(t, xp, rng)

    def logG(self, t: int, xp: Any, x: Any) -> np.ndarray:
        lG = np.asarray(self.fk.logG(t, xp, x), dtype=np.float64)
        return np.zeros_like(lG) if self.lam == 0.0 else self.lam * lG

    def done(self, t: int, x: Any) -> Any:
        return self.fk.done(t, x) if hasattr(self.fk, "done") else None

    def counters(self) -> dict[str, float]:
        get = getattr(self.fk, "counters", None)
        return dict(get()) if callable(get) else {}


def path_log_potential(fk: Any, path: Sequence[Any]) -> float:
    """L(x_{0:T}) = Σ_t logG_t along a 1-particle path (steps after the path finished count 0)."""
    total, finished = 0.0, False
    for t, x in enumerate(path):
        if finished:
            break
        total += float(as_log_potential(fk.logG(t, path[t - 1] if t else None, x), 1, t)[0])
        d = fk.done(t, x) if hasattr(fk, "done") else None
        finished = d is not None and bool(np.asarray(d)[0])
    return total


@dataclass
class ParallelTemperingResult:
    lams: list[float]
    trajectories: list[list[list[Any]]]   # [chain][iteration] -> reference path (1-particle states)
    runs: list[SMCResult]                 # the last conditional SMC sweep of each chain
    acceptance: np.ndarray                # (K-1,) swap acceptance rate of pairs (k, k+1)
    compute: dict[str, float] = field(default_factory=dict)


def parallel_tempering(fk: Any, lams: Sequence[float], num_particles: int, num_iterations: int, *,
                       seed: int | None = None, rng: np.random.Generator | None = None,
                       progress: bool = False) -> ParallelTemperingResult:
    """Run ``num_iterations`` of parallel tempering on ``fk`` at temperatures ``lams``
    (lams[0] is usually 1, the target). Initial references come from one plain SMC
    run per chain."""
    lams = [float(v) for v in lams]
    if len(lams) < 1:
        raise ValueError("parallel tempering needs at least one temperature")
    if not isinstance(num_iterations, (int, np.integer)) or num_iterations < 1:
        raise ValueError(f"num_iterations must be a positive integer, got {num_iterations!r}")
    rng = as_generator(seed, rng)
    chains = [TemperedFK(fk, lam) for lam in lams]
    refs = [draw_trajectory(SMC(c, num_particles, store_history=True).run(rng), rng) for c in chains]
    L = [path_log_potential(fk, r) for r in refs]
    trajectories: list[list[list[Any]]] = [[] for _ in lams]
    runs: list[SMCResult] = [None] * len(lams)  # type: ignore[list-item]
    tried, accepted = np.zeros(max(len(lams) - 1, 0)), np.zeros(max(len(lams) - 1, 0))
    compute: dict[str, float] = {}
    for it in tqdm(range(num_iterations), desc="parallel tempering", disable=not progress):
        for k, chain in enumerate(chains):
            result = ConditionalSMC(chain, num_particles, refs[k]).run(rng)
            refs[k] = draw_trajectory(result, rng)
            L[k] = path_log_potential(fk, refs[k])
            runs[k] = dataclasses.replace(result, history=None, log_weights_history=None)
            for key, v in result.compute.items():
                compute[key] = compute.get(key, 0) + v
        for k in range(it % 2, len(lams) - 1, 2):
            tried[k] += 1
            log_a = (lams[k] - lams[k + 1]) * (L[k + 1] - L[k])
            if np.isnan(log_a):  # both paths rejected (-inf): nothing to compare, keep them
                continue
            if np.log(rng.random()) < log_a:
                refs[k], refs[k + 1], L[k], L[k + 1] = refs[k + 1], refs[k], L[k + 1], L[k]
                accepted[k] += 1
        for k in range(len(lams)):
            trajectories[k].append(refs[k])
    acceptance = np.divide(accepted, tried, out=np.zeros_like(accepted), where=tried > 0)
    return ParallelTemperingResult(lams, trajectories, runs, acceptance, compute)
