"""SVDD-PM (Li et al. 2024, "Derivative-free guidance in continuous and discrete diffusion
models with soft value-based decoding"): local value search, one step at a time.

Each of the N chains proposes M = ``num_candidates`` next states per step from its current
state, scores each candidate by its value r_t (the reward of its x0 prediction, or any
``intermediate`` reward of the model) and continues from one of them: the best
(``alpha = 0``) or one drawn ∝ exp(r_t / alpha). Chains never interact.

On the SMC engine this is ``Tilted(model, potential, shape="difference", lam=1)`` (so a
path's score, its cumulative log potential, is its current reward r_t) run with the
selection ``Groups(width=M, temperature=alpha)``: the population is N * M slots, chain g
owns the consecutive slots g*M .. g*M + M - 1; before each step every group copies its
chosen member into its M slots and the move proposes M fresh candidates from it. At
t = 0 the M slots of a chain are M independent noises, so its first choice is among them.

Budget: ``num_particles`` = N chains (N returned samples, one per group), at M times the
cost of N particles: N * M moves per step (N * M * K denoiser evaluations for K steps) and
N * M reward evaluations per step. The result holds all N * M final slots; chain g's
sample is its group's best, ``rewards.reshape(N, M).argmax(1)``; ``best`` = argmax weight.
There is no evidence estimate (``log_evidence`` is NaN); ``log_weights`` are the scores.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ppl_scaling.result import SMCResult
from ppl_scaling.rng import as_generator
from ppl_scaling.selection import Groups
from ppl_scaling.smc import SMC
from ppl_scaling.tilt import Tilted

__all__ = ["svdd", "METHODS"]


def svdd(model: Any, num_particles: int, *, potential: Any = None, num_candidates: int = 4, alpha: float = 0.0,
         seed: int | None = None, rng: np.random.Generator | None = None, store_history: bool = False,
         progress: bool = False) -> SMCResult:
    """SVDD-PM with ``num_particles`` chains of ``num_candidates`` candidates per step (module docstring)."""
    for name, value in (("num_particles", num_particles), ("num_candidates", num_candidates)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not (np.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be finite and >= 0 (0 = argmax), got {alpha}")
    M = int(num_candidates)
    fk = Tilted(model, potential, shape="difference", lam=1.0)
    algo = SMC(fk, int(num_particles) * M, selection=Groups(M, alpha, name="SVDD"), store_history=store_history,
               progress=progress)
    res = algo.run(as_generator(seed, rng))
    return res.for_method("svdd", "argmax_weight", num_chains=int(num_particles), num_candidates=M, alpha=alpha)


METHODS = {"svdd": svdd}
