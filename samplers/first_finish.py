"""First Finish Search ("First Finish Search: Efficient Test-Time Scaling in Large Language
Models", 2025): n generations in parallel; the first to finish is the answer and the
others are stopped.

On the engine: n particles of the untilted dynamics, never resampled, with the rule
``stop = any particle finished``, so the run ends after the first step in which a generation
finishes and the others spend nothing more (``result.ledger`` counts the tokens actually
generated). The winner is, among the particles that finished at that step, the one with the
fewest generated tokens; ties go to the lowest index. Particles are i.i.d. and exchangeable, so
this is a uniform choice among the tied ones, and with one token per step
(``step_delimiter=None``) the output is distributed as the shortest of n i.i.d. generations,
ties broken uniformly at random:

    P(winner = x) = q(x | L = l) (S(l)^n - S(l + 1)^n),   l = len(x), S(l) = P(L >= l).

With multi-token steps "first" is counted in steps, then tokens. The result keeps every particle
(the stopped ones are unfinished) with search scores as log-weights: -(generated tokens) for the
particles that finished, -inf for the others; the answer rule is ``argmax_weight``.

    res = first_finish(step_model, 8, seed=0)
    res.particles.completions()[res.best_index], res.ledger.tokens
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from ppl_scaling.result import SMCResult
from ppl_scaling.rng import as_generator
from ppl_scaling.smc import SMC, SMCState

__all__ = ["first_finish", "METHODS"]


def _anyone_finished(state: SMCState) -> bool:
    return bool(state.done.any())


def first_finish(model: Any, num_particles: int, *, potential: Any = None, seed: int | None = None,
                 rng: np.random.Generator | None = None, store_history: bool = False,
                 progress: bool = False) -> SMCResult:
    """``num_particles`` generations of ``model`` (dynamics with ``done``), stopped as soon as one
    finishes (module docstring); ``potential`` is ignored (no reward model)."""
    algo = SMC(model, num_particles, ess_threshold=0.0, stop=_anyone_finished, store_history=store_history,
               progress=progress)
    res = algo.run(as_generator(seed, rng))
    x = res.particles
    length = np.asarray(getattr(x, "num_tokens", np.zeros(res.num_particles)), dtype=np.float64)
    score = np.where(res.done, -length, -np.inf)
    return replace(res, log_weights=score, log_evidence=float("nan")).for_method(
        "first_finish", "argmax_weight", finished=int(res.done.sum()))


METHODS = {"first_finish": first_finish}
