"""Solve-Detect-Verify with a verification cascade ("Solve-Detect-Verify: Inference-Time Scaling
with Flexible Generative Verifier", 2025).

The solver generates one attempt at a time; when an attempt reaches a completion point (the
dynamics' ``done``: EOS or the answer pattern of ``StepModel(stop=...)``) it is verified
by a cascade, and the first attempt the cascade accepts is submitted — rejection sampling
(``samplers/rejection_sampling.py``) with the verifier

    Cascade(cheap, expensive, low, high):  phi_c = exp(cheap(x))
        phi_c >= high          accept            (fast verification is confident)
        phi_c <= low           reject
        low < phi_c < high     escalate: accept iff exp(expensive(x)) > 1/2   (slow verification)

so the expensive verifier (an exact checker, a large judge) only sees the attempts the cheap
one (a learned PRM) is unsure about. If the cheap tier accepts outright w.p. h_1 / h_0 and is
unsure w.p. u_1 / u_0 (correct / wrong attempt), the cascade is one verifier with
TPR = h_1 + u_1 TPR_e and FPR = h_0 + u_0 FPR_e, escalating a share p u_1 + (1-p) u_0 of the
verifications (``ppl_scaling.metrics.cascade_rates``), whose accuracy is rejection sampling's.

Compute: every verification counts once in ``reward_calls`` (the cheap tier), each escalation
in ``escalated_calls`` (the expensive tier); ``info["cheap_calls"]``, ``info["expensive_calls"]``.

    res = verify_cascade(StepModel(lm, prompt, ...), 8, potential=learned_prm, expensive=checker, seed=0)
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ppl_scaling.ledger import record
from ppl_scaling.potentials import Potential, as_potential, batch_size, subset
from ppl_scaling.result import SMCResult

from .rejection_sampling import rejection_sampling

__all__ = ["Cascade", "verify_cascade", "METHODS"]


class Cascade(Potential):
    """The two-tier verdict of the module docstring: log-value 0 (accept) or -inf (reject) of
    finished values; prefix 0 (no verdict before a completion point). Records
    ``escalated_calls`` for the values passed on to ``expensive``."""

    def __init__(self, cheap: Any, expensive: Any, *, low: float = 0.2, high: float = 0.8) -> None:
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"need 0 <= low <= high <= 1 for the cheap tier's band, got low={low}, high={high}")
        self.cheap, self.expensive = as_potential(cheap, "cheap verifier"), as_potential(expensive, "expensive verifier")
        self.low, self.high = float(low), float(high)
        self.name = f"Cascade({self.cheap!r} -> {self.expensive!r})"

    def prefix(self, xs: Any) -> np.ndarray:
        return np.zeros(batch_size(xs))

    def complete(self, xs: Any) -> np.ndarray:
        phi = np.exp(self.cheap.evaluate("complete", xs))
        accept = phi >= self.high
        unsure = np.flatnonzero((phi > self.low) & (phi < self.high))
        if unsure.size:
            record(escalated_calls=int(unsure.size))
            accept[unsure] = self.expensive.evaluate("complete", subset(xs, unsure)) > np.log(0.5)
        return np.where(accept, 0.0, -np.inf)


def verify_cascade(model: Any, budget: int, *, potential: Any, expensive: Any, low: float = 0.2,
                   high: float = 0.8, fallback: str = "last", batch: int = 1, seed: int | None = None,
                   rng: np.random.Generator | None = None) -> SMCResult:
    """At most ``budget`` attempts until ``Cascade(potential, expensive, low, high)`` accepts
    one (module docstring); ``fallback`` and ``batch`` as in ``rejection_sampling``."""
    cascade = Cascade(potential, expensive, low=low, high=high)
    res = rejection_sampling(model, budget, potential=cascade, fallback=fallback, batch=batch, seed=seed, rng=rng)
    return res.for_method("verify_cascade", "argmax_weight", low=cascade.low, high=cascade.high,
                          cheap_calls=res.ledger.reward_calls, expensive_calls=res.ledger.escalated_calls)


METHODS = {"verify_cascade": verify_cascade}
