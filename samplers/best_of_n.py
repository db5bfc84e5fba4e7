"""Sampling baselines: N independent generations, a reward at the end, a selection rule.

Each is importance sampling (SMC that never resamples) of the model tilted by the
potential at the final step only, so a particle's log-weight is its final reward
r(x) = log phi(x); the methods differ in how they pick the answer:

    best_of_n            the highest reward (argmax weight)
    weighted_best_of_n   the answer with the largest total weight Σ phi(x) (for a PRM read
                         as p: the sum of its scores, Li et al. 2023's weighted vote)
    self_consistency     the most frequent answer (Wang et al. 2023); no potential
    best_of_majority     Best-of-Majority (Di et al. 2025): among the answers with at least
                         ``min_share`` of the N samples, the one with the highest reward
                         (``aggregate.best_of_majority``; ``res.select(answers, k=k)`` for
                         k submissions)

    res = best_of_n(model, 16, potential=prm, seed=0)
    res.rewards, res.select(answers)

Each takes ``stop=`` (a rule of ``ppl_scaling.stopping``): generation ends once it holds and
only the finished samples count (e.g. ``AnswerSettled``: the vote is decided).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ppl_scaling.result import SMCResult
from ppl_scaling.smc import SMCState, smc
from ppl_scaling.tilt import Tilted

__all__ = ["best_of_n", "weighted_best_of_n", "self_consistency", "best_of_majority", "METHODS"]


def _sample(method: str, rule: str, model: Any, num_particles: int, potential: Any, lam: float,
            seed: int | None, rng: np.random.Generator | None, store_history: bool, progress: bool,
            stop: Callable[[SMCState], bool] | None = None, **info: Any) -> SMCResult:
    fk = model if potential is None else Tilted(model, potential, lam=lam, at=())
    res = smc(fk, num_particles, ess_threshold=0.0, seed=seed, rng=rng, store_history=store_history,
              progress=progress, stop=stop)
    return res.for_method(method, rule, **info)


def best_of_n(model: Any, num_particles: int, *, potential: Any, lam: float = 1.0, seed: int | None = None,
              rng: np.random.Generator | None = None, store_history: bool = False,
              progress: bool = False, stop: Callable[[SMCState], bool] | None = None) -> SMCResult:
    """``num_particles`` samples; weights exp(lam r(x)); answer of the best one."""
    return _sample("best_of_n", "argmax_weight", model, num_particles, potential, lam, seed, rng,
                   store_history, progress, stop)


def weighted_best_of_n(model: Any, num_particles: int, *, potential: Any, lam: float = 1.0,
                       seed: int | None = None, rng: np.random.Generator | None = None,
                       store_history: bool = False, progress: bool = False,
                       stop: Callable[[SMCState], bool] | None = None) -> SMCResult:
    """``num_particles`` samples; the answer with the largest total weight."""
    return _sample("weighted_best_of_n", "weighted_majority", model, num_particles, potential, lam, seed, rng,
                   store_history, progress, stop)


def self_consistency(model: Any, num_particles: int, *, potential: Any = None, seed: int | None = None,
                     rng: np.random.Generator | None = None, store_history: bool = False,
                     progress: bool = False, stop: Callable[[SMCState], bool] | None = None) -> SMCResult:
    """``num_particles`` samples and a majority vote; ``potential`` is ignored (no reward model).
    With ``stop=AnswerSettled(extract)`` (``ppl_scaling.stopping``) generation stops once the
    vote is decided: adaptive self-consistency, same answer, fewer tokens."""
    return _sample("self_consistency", "majority_vote", model, num_particles, None, 1.0, seed, rng,
                   store_history, progress, stop)


def best_of_majority(model: Any, num_particles: int, *, potential: Any, min_share: float = 0.2, lam: float = 1.0,
                     seed: int | None = None, rng: np.random.Generator | None = None,
                     store_history: bool = False, progress: bool = False,
                     stop: Callable[[SMCState], bool] | None = None) -> SMCResult:
    """``num_particles`` samples scored by the final reward; Best-of-Majority: the answer with
    the highest reward among those with at least ``min_share`` of the samples (the frequency
    threshold, kept in ``info["min_share"]`` for ``select``)."""
    if not 0.0 <= float(min_share) <= 1.0:
        raise ValueError(f"min_share (the frequency threshold) must be in [0, 1], got {min_share!r}")
    return _sample("best_of_majority", "best_of_majority", model, num_particles, potential, lam, seed, rng,
                   store_history, progress, stop, min_share=float(min_share))


METHODS = {"best_of_n": best_of_n, "weighted_best_of_n": weighted_best_of_n, "self_consistency": self_consistency,
           "best_of_majority": best_of_majority}
