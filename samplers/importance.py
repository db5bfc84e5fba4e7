"""Importance sampling: SMC that never resamples.

With a terminal potential only, this is weighted best-of-N: N independent draws
from the base model, weighted by G. ``log_evidence`` = log mean of the product
of potentials, an unbiased estimate of Z.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ppl_scaling.result import SMCResult
from ppl_scaling.smc import smc


def importance_sampling(fk: Any, num_particles: int, *, seed: int | None = None,
                        rng: np.random.Generator | None = None, store_history: bool = False,
                        progress: bool = False) -> SMCResult:
    """Run ``fk`` with ``num_particles`` independent particles and no resampling."""
    return smc(fk, num_particles, ess_threshold=0.0, seed=seed, rng=rng,
               store_history=store_history, progress=progress)
