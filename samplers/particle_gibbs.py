"""Particle Gibbs (Andrieu, Doucet & Holenstein 2010).

Conditional SMC keeps one *reference* trajectory alive in slot 0: at every step
slot 0 is overwritten with the reference state and its ancestor is forced to be
slot 0; the other N-1 particles are resampled multinomially from all N. Drawing
a new reference from the final weights gives a Markov kernel that leaves the
smoothing distribution pi(x_{0:T-1}) invariant, for any N >= 2.

    out = particle_gibbs(fk, num_particles=20, num_iterations=500, seed=0)
    out.trajectories[i]       # the reference path after iteration i (list of 1-particle states)
    out.stacked()             # (iterations, T, ...) for array states

Path degeneracy: ``SMCResult.num_unique_ancestors()`` of a run shows how few
distinct ancestors survive far back; with few particles PG then mixes slowly
at early times.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from ppl_scaling.resampling import multinomial
from ppl_scaling.result import SMCResult
from ppl_scaling.rng import as_generator
from ppl_scaling.smc import SMC
from ppl_scaling.state import take, where


class ConditionalSMC(SMC):
    """SMC with the reference path ``reference`` (one 1-particle state per step) pinned to slot 0."""

    def __init__(self, fk: Any, num_particles: int, reference: list[Any], progress: bool = False) -> None:
        if num_particles < 2:
            raise ValueError("conditional SMC needs num_particles >= 2 (one slot is the reference)")
        super().__init__(fk, num_particles, ess_threshold=1.0, resampling=multinomial,
                         store_history=True, progress=progress)
        self.reference = reference
        self.slot = np.zeros(num_particles, dtype=bool)
        self.slot[0] = True

    def _pin(self, t: int, x: Any) -> Any:
        if t >= len(self.reference):  # the reference had finished; slot 0 stays frozen
            return x
        return where(self.slot, take(self.reference[t], np.zeros(self.N, dtype=np.int64)), x)

    def initial(self, rng):
        return self._pin(0, super().initial(rng))

    def move(self, t, xp, rng):
        return self._pin(t, super().move(t, xp, rng))

    def select(self, t, rng, state):
        A = multinomial(rng, state.W)
        A[0] = 0
        return A, np.zeros(self.N)


def draw_trajectory(result: SMCResult, rng: np.random.Generator) -> list[Any]:
    """One path drawn from the final weights, traced back through the genealogy."""
    k = int(rng.choice(result.num_particles, p=result.weights))
    B = result.lineage()
    return [take(x, B[t, k : k + 1]) for t, x in enumerate(result.history)]


@dataclass
class ParticleGibbsResult:
    trajectories: list[list[Any]]   # reference path after each iteration
    runs: list[SMCResult]           # each conditional SMC run (history dropped to save memory)

    def stacked(self) -> np.ndarray:
        """Array states only: (iterations, T, *event shape) of the reference paths."""
        return np.stack([np.concatenate([np.asarray(x) for x in path]) for path in self.trajectories])


def particle_gibbs(fk: Any, num_particles: int, num_iterations: int, *, reference: list[Any] | None = None,
                   seed: int | None = None, rng: np.random.Generator | None = None,
                   progress: bool = False) -> ParticleGibbsResult:
    """Run ``num_iterations`` of particle Gibbs on ``fk``.

    The first reference is ``reference`` if given, else a path drawn from a plain
    SMC run (which counts as iteration 0's run).
    """
    rng = as_generator(seed, rng)
    if reference is None:
        first = SMC(fk, num_particles, store_history=True).run(rng)
        reference = draw_trajectory(first, rng)
    trajectories, runs = [], []
    for _ in tqdm(range(num_iterations), desc="particle Gibbs", disable=not progress):
        result = ConditionalSMC(fk, num_particles, reference).run(rng)
        reference = draw_trajectory(result, rng)
        trajectories.append(reference)
        runs.append(dataclasses.replace(result, history=None, log_weights_history=None))
    return ParticleGibbsResult(trajectories, runs)
