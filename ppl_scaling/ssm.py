"""Two classic state-space models as Feynman-Kac models (bootstrap filters), with
exact answers in ``ppl_scaling.exact``. They are the test bed of the engine, the
benchmark model and the demo.

    model = LinearGaussian(a=0.9, sigma_x=1.0, sigma_y=0.5)
    x, y = model.simulate(T=100, rng=np.random.default_rng(0))
    result = ppl_scaling.smc(model.bootstrap(y), num_particles=1000, seed=1)
    exact = model.kalman(y)          # exact filtering marginals and log evidence
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import exact
from .fk import FeynmanKac
from .rng import import_jax

_LOG_2PI = float(np.log(2 * np.pi))


@dataclass(frozen=True)
class LinearGaussian:
    """x_0 ~ N(0, sigma0²), x_t = a x_{t-1} + sigma_x ε, y_t = x_t + sigma_y η."""

    a: float = 0.9
    sigma_x: float = 1.0
    sigma_y: float = 0.5
    sigma0: float = 1.0

    def simulate(self, T: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        x = np.empty(T)
        x[0] = self.sigma0 * rng.standard_normal()
        for t in range(1, T):
            x[t] = self.a * x[t - 1] + self.sigma_x * rng.standard_normal()
        return x, x + self.sigma_y * rng.standard_normal(T)

    def bootstrap(self, y: np.ndarray, backend: str = "numpy") -> "LinearGaussianBootstrap":
        return LinearGaussianBootstrap(self, np.asarray(y, dtype=np.float64), backend)

    def kalman(self, y: np.ndarray) -> exact.GaussianMarginals:
        return exact.kalman_filter(y, self.a, self.sigma_x, self.sigma_y, self.sigma0)

    def smoother(self, y: np.ndarray) -> exact.GaussianMarginals:
        return exact.kalman_smoother(y, self.a, self.sigma_x, self.sigma_y, self.sigma0)


def _array_module(backend: str):
    """(xp, as_array) for 'numpy', 'torch' or 'jax' float64 arrays."""
    if backend == "numpy":
        return np, np.asarray
    if backend == "torch":
        import torch

        return torch, lambda v: torch.as_tensor(v, dtype=torch.float64)
    if backend == "jax":
        jnp = import_jax('LinearGaussian.bootstrap(backend="jax")', "jax.numpy")

        return jnp, lambda v: jnp.asarray(v, dtype=jnp.float64)
    raise ValueError(f"backend must be 'numpy', 'torch' or 'jax', got {backend!r}")


class LinearGaussianBootstrap(FeynmanKac):
    """Bootstrap filter: M = the state transition, G_t = N(y_t; x_t, sigma_y²).

    ``backend`` picks the array type of the particles (numpy, torch or JAX; JAX is the
    optional extra ``pip install "ppl-scaling[jax]"`` and needs ``jax.enable_x64`` for
    float64). Noise always comes from the numpy ``rng``, so every backend gives the
    same result for the same seed.
    """

    def __init__(self, model: LinearGaussian, y: np.ndarray, backend: str = "numpy") -> None:
        self.model, self.y, self.T = model, y, len(y)
        self.xp, self.as_array = _array_module(backend)

    def M0(self, N, rng):
        return self.as_array(self.model.sigma0 * rng.standard_normal(N))

    def M(self, t, xp, rng):
        return self.model.a * xp + self.as_array(self.model.sigma_x * rng.standard_normal(xp.shape[0]))

    def logG(self, t, xp, x):
        s = self.model.sigma_y
        return -0.5 * ((self.y[t] - x) / s) ** 2 - np.log(s) - 0.5 * _LOG_2PI

    def logpt(self, t, xp, x):
        """log N(x; a xp, sigma_x²): the density of M (ancestor and backward sampling)."""
        s = self.model.sigma_x
        return -0.5 * ((x - self.model.a * xp) / s) ** 2 - np.log(s) - 0.5 * _LOG_2PI


@dataclass(frozen=True)
class DiscreteHMM:
    """x_0 ~ init, x_t ~ trans[x_{t-1}], y_t ~ emit[x_t] (finite states and symbols)."""

    init: np.ndarray
    trans: np.ndarray
    emit: np.ndarray

    def simulate(self, T: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        K, V = self.emit.shape
        x = np.empty(T, dtype=np.int64)
        x[0] = rng.choice(K, p=self.init)
        for t in range(1, T):
            x[t] = rng.choice(K, p=self.trans[x[t - 1]])
        y = np.array([rng.choice(V, p=self.emit[k]) for k in x])
        return x, y

    def bootstrap(self, y: np.ndarray) -> "DiscreteHMMBootstrap":
        return DiscreteHMMBootstrap(self, np.asarray(y))

    def forward(self, y: np.ndarray) -> exact.DiscreteMarginals:
        return exact.hmm_forward(y, self.init, self.trans, self.emit)


def _categorical(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One draw per row of ``probs`` (N, K), vectorised."""
    u = rng.random((probs.shape[0], 1))
    return np.minimum((np.cumsum(probs, axis=1) <= u).sum(axis=1), probs.shape[1] - 1)


class DiscreteHMMBootstrap(FeynmanKac):
    def __init__(self, model: DiscreteHMM, y: np.ndarray) -> None:
        self.model, self.y, self.T = model, y, len(y)
        self.log_emit = np.log(model.emit)

    def M0(self, N, rng):
        return _categorical(rng, np.broadcast_to(self.model.init, (N, len(self.model.init))))

    def M(self, t, xp, rng):
        return _categorical(rng, self.model.trans[xp])

    def logG(self, t, xp, x):
        return self.log_emit[x, self.y[t]]
