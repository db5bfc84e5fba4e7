"""Exact references for testing SMC: the Kalman filter and RTS smoother of the
scalar linear-Gaussian model, and the forward algorithm of a discrete HMM.

Linear-Gaussian model (``ssm.LinearGaussian``)::

    x_0 ~ N(0, sigma0²),  x_t = a x_{t-1} + sigma_x ε_t,  y_t = x_t + sigma_y η_t   (t = 0..T-1)

Discrete HMM (``ssm.DiscreteHMM``)::

    x_0 ~ init,  x_t | x_{t-1} ~ trans[x_{t-1}],  y_t | x_t ~ emit[x_t]
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GaussianMarginals:
    mean: np.ndarray
    var: np.ndarray
    log_evidence: float


def kalman_filter(y: np.ndarray, a: float, sigma_x: float, sigma_y: float, sigma0: float) -> GaussianMarginals:
    """Filtering marginals p(x_t | y_{0:t}) and log p(y_{0:T-1})."""
    y = np.asarray(y, dtype=np.float64)
    mean, var = np.empty_like(y), np.empty_like(y)
    m, P, loglik = 0.0, sigma0**2, 0.0
    for t, yt in enumerate(y):
        if t > 0:
            m, P = a * m, a * a * P + sigma_x**2
        S = P + sigma_y**2
        loglik += -0.5 * (np.log(2 * np.pi * S) + (yt - m) ** 2 / S)
        K = P / S
        m, P = m + K * (yt - m), (1 - K) * P
        mean[t], var[t] = m, P
    return GaussianMarginals(mean, var, float(loglik))


def kalman_smoother(y: np.ndarray, a: float, sigma_x: float, sigma_y: float, sigma0: float) -> GaussianMarginals:
    """Smoothing marginals p(x_t | y_{0:T-1}) by the Rauch-Tung-Striebel recursion."""
    filt = kalman_filter(y, a, sigma_x, sigma_y, sigma0)
    mean, var = filt.mean.copy(), filt.var.copy()
    for t in range(len(y) - 2, -1, -1):
        m_pred, P_pred = a * filt.mean[t], a * a * filt.var[t] + sigma_x**2
        J = filt.var[t] * a / P_pred
        mean[t] = filt.mean[t] + J * (mean[t + 1] - m_pred)
        var[t] = filt.var[t] + J * J * (var[t + 1] - P_pred)
    return GaussianMarginals(mean, var, filt.log_evidence)


@dataclass(frozen=True)
class DiscreteMarginals:
    probs: np.ndarray  # (T, K) filtering probabilities p(x_t = k | y_{0:t})
    log_evidence: float


def hmm_forward(y: np.ndarray, init: np.ndarray, trans: np.ndarray, emit: np.ndarray) -> DiscreteMarginals:
    """Forward algorithm: filtering probabilities and log p(y_{0:T-1})."""
    probs = np.empty((len(y), len(init)))
    alpha, loglik = np.asarray(init, dtype=np.float64), 0.0
    for t, yt in enumerate(y):
        if t > 0:
            alpha = alpha @ trans
        alpha = alpha * emit[:, yt]
        c = alpha.sum()
        loglik += np.log(c)
        alpha = alpha / c
        probs[t] = alpha
    return DiscreteMarginals(probs, float(loglik))
