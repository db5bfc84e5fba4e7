"""Rejection sampling with an imperfect verifier (Stroebl, Kapoor & Narayanan 2024,
"Inference Scaling fLaws: The Limits of LLM Resampling with Imperfect Verifiers").

Attempts x_1, x_2, ... ~ the model are generated ``batch`` at a time (each round one run of
the engine, never resampled) and every finished attempt is verified: accepted iff
phi(x) > ``threshold``, phi = exp(potential.complete(x)) (a ``Verifier``: phi in {0, 1};
a PRM read as log p: p > threshold). The first accepted attempt is submitted and sampling
stops; after k = ``budget`` attempts with none accepted, the ``fallback`` is: "last" (the
k-th attempt) or "best" (the highest phi, the latest among ties).

With success probability p, verifier rates TPR / FPR, a = p TPR, b = (1-p) FPR and
r = 1 - a - b, the accuracy with fallback "last" is

    P(correct) = a Σ_{i<k} r^i + r^(k-1) p (1 - TPR)   ->   a / (a + b)   as k -> inf,

and the expected number of attempts Σ_{i<k} r^i (``ppl_scaling.metrics.rejection_sampling_accuracy``
and ``rejection_sampling_attempts``; ``fallback="abstain"`` there for ``info["accepted"]``).

    res = rejection_sampling(StepModel(lm, prompt, ...), 8, potential=prm, threshold=0.5, seed=0)
    res.particles          # the attempts made, in order
    res.info["accepted"], res.info["chosen"], res.info["attempts"]

``log_weights`` are 0 for the submitted attempt and -inf for the others (rule
``argmax_weight``); ``rewards`` the verifier's log phi of every attempt; ``ledger`` what
every attempt and verification spent.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ppl_scaling.ledger import recording
from ppl_scaling.potentials import as_potential
from ppl_scaling.result import SMCResult
from ppl_scaling.rng import as_generator
from ppl_scaling.smc import smc
from ppl_scaling.state import num_particles, take, where

__all__ = ["rejection_sampling", "METHODS"]

FALLBACKS = ("last", "best")


def _stack(parts: Sequence[Any]) -> Any:
    """The particles of several batches as one batch, in order (through ``take`` / ``where``)."""
    sizes = [num_particles(x) for x in parts]
    owner = np.repeat(np.arange(len(parts)), sizes)
    pos = np.concatenate([np.arange(n) for n in sizes])
    out = take(parts[0], np.where(owner == 0, pos, 0))
    for j, x in enumerate(parts[1:], 1):
        out = where(owner == j, take(x, np.where(owner == j, pos, 0)), out)
    return out


def rejection_sampling(model: Any, budget: int, *, potential: Any, threshold: float = 0.5,
                       fallback: str = "last", batch: int = 1, seed: int | None = None,
                       rng: np.random.Generator | None = None) -> SMCResult:
    """At most ``budget`` attempts of ``model``, ``batch`` per round, until the verifier
    ``potential`` accepts one (phi > ``threshold``); module docstring."""
    for name, value in (("budget", budget), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1) (accept iff phi > threshold), got {threshold!r}")
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
    verifier, rng = as_potential(potential, "verifier"), as_generator(seed, rng)
    log_threshold = np.log(threshold) if threshold > 0 else -np.inf
    attempts, scores, made = [], [], 0
    with recording() as spent:
        while made < budget:
            n = min(int(batch), budget - made)
            res = smc(model, n, ess_threshold=0.0, rng=rng)
            view = model.view(len(res.ess) - 1, res.particles) if hasattr(model, "view") else res.particles
            attempts.append(res.particles)
            scores.append(verifier.score(view, np.ones(n, dtype=bool)))
            made += n
            if (scores[-1] > log_threshold).any():
                break
    rewards = np.concatenate(scores)
    accepted = rewards > log_threshold
    if accepted.any():
        chosen = int(np.argmax(accepted))
    elif fallback == "last":
        chosen = rewards.size - 1
    else:
        chosen = rewards.size - 1 - int(np.argmax(rewards[::-1]))
    log_weights = np.full(rewards.size, -np.inf)
    log_weights[chosen] = 0.0
    result = SMCResult(particles=_stack(attempts), log_weights=log_weights, log_evidence=float("nan"),
                       ess=np.ones(1), resampled=np.zeros(1, dtype=bool),
                       log_evidence_increments=np.full(1, np.nan), done=np.ones(rewards.size, dtype=bool),
                       ledger=spent, rewards=rewards,
                       info={"num_particles": rewards.size, "selection": "first accepted"})
    return result.for_method("rejection_sampling", "argmax_weight", accepted=bool(accepted.any()), chosen=chosen,
                             attempts=int(rewards.size), threshold=float(threshold), fallback=fallback)


METHODS = {"rejection_sampling": rejection_sampling}
