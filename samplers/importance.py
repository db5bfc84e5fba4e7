"""Importance sampling: SMC that never resamples.

N independent paths of the model, weighted by the product of their potentials,
w = Π_t G_t; ``log_evidence`` = log mean w, an unbiased estimate of Z. With a
``potential`` the model is tilted at its final step only (``Tilted(model, potential,
lam=lam, at=())``: w = exp(lam r(x)) times the model's own weights), i.e. weighted
best-of-N; the default answer rule is the weighted majority Σ_i W_i 1[answer_i = a].

    res = importance_sampling(fk, 1000, seed=0)
    res = importance_sampling(dynamics, 16, potential=reward, seed=0)
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ppl_scaling.result import SMCResult
from ppl_scaling.smc import smc
from ppl_scaling.tilt import Tilted

__all__ = ["importance_sampling", "METHODS"]


def importance_sampling(model: Any, budget: int, *, potential: Any = None, rng: np.random.Generator | None = None,
                        seed: int | None = None, lam: float = 1.0, selection_rule: str = "weighted_majority",
                        store_history: bool = False, progress: bool = False) -> SMCResult:
    """``budget`` independent particles of ``model`` (tilted by ``potential`` ** ``lam`` at the
    end, if given), never resampled."""
    fk = model if potential is None else Tilted(model, potential, lam=lam, at=())
    res = smc(fk, budget, ess_threshold=0.0, seed=seed, rng=rng, store_history=store_history, progress=progress)
    return res.for_method("importance_sampling", selection_rule, lam=lam)


METHODS = {"importance_sampling": importance_sampling}
