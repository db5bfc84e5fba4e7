"""Log-space importance weights.

All weights live in log space (``lw``); linear weights are only ever formed
normalised, as ``W = exp(lw - logsumexp(lw))``. With ``lse = log Σ exp``:

    W_i   = exp(lw_i - lse(lw))
    ESS   = 1 / Σ W_i² = exp(2 lse(lw) - lse(2 lw))
    log_mean_exp(lw) = lse(lw) - log N
"""
from __future__ import annotations

import numpy as np


def logsumexp(lw: np.ndarray) -> float:
    """log Σ exp(lw), stable; -inf when every entry is -inf."""
    m = np.max(lw)
    if not np.isfinite(m):
        return float(m)
    return float(m + np.log(np.sum(np.exp(lw - m))))


def log_mean_exp(lw: np.ndarray) -> float:
    """log of the mean of exp(lw)."""
    return logsumexp(lw) - np.log(lw.shape[0])


def normalise(lw: np.ndarray) -> np.ndarray:
    """Normalised linear weights W (sum to one). Requires a finite max."""
    w = np.exp(lw - np.max(lw))
    return w / np.sum(w)


def summarise(lw: np.ndarray) -> tuple[float, np.ndarray | None, float]:
    """``(logsumexp(lw), W, ESS)`` from a single exponentiation; ``(-inf, None, 0)`` if all -inf."""
    m = lw.max()
    if not np.isfinite(m):
        return float(m), None, 0.0
    W = np.exp(lw - m)
    s = W.sum()
    W /= s
    return float(m + np.log(s)), W, float(1.0 / (W @ W))


def ess(lw: np.ndarray) -> float:
    """Effective sample size 1 / Σ W_i² of log-weights ``lw`` (0 if all -inf)."""
    if not np.isfinite(np.max(lw)):
        return 0.0
    W = normalise(lw)
    return float(1.0 / np.sum(W * W))
