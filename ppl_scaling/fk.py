"""The Feynman-Kac model: *what* to sample, independent of *how*.

A Feynman-Kac (FK) model is three functions over batches of N particles
(Chopin & Papaspiliopoulos 2020, ch. 5)::

    M0(N, rng)       -> x_0          initial particles
    M(t, xp, rng)    -> x_t          move particles x_{t-1} = xp to x_t  (t >= 1)
    logG(t, xp, x)   -> (N,) float   log potential; xp is None at t = 0
    done(t, x)       -> (N,) bool    optional: finished particles, frozen from then on
    T                                number of steps, t = 0 .. T-1

It defines the sequence of targets
    Q_t(dx_{0:t}) = (1/L_t) M0(dx_0) G_0(x_0) Π_{s=1..t} M_s(x_{s-1}, dx_s) G_s(x_{s-1}, x_s)
whose normalising constant L_{T-1} (the *evidence*) SMC estimates without bias.

Subclass ``FeynmanKac`` and write the three methods; ``ppl_scaling.smc`` runs it.
Any object with these attributes works too (duck typing).

*Dynamics* are FK models of generation alone — an LLM's step sampler, a reverse
diffusion, a Pyro program's latent moves: ``Dynamics`` has logG = 0 unless it carries
weights of its own (a proposal correction log p - log q, observation likelihoods), and
``view(t, x)``, the batch of values a potential scores. ``ppl_scaling.tilt.Tilted``
turns dynamics and a potential into the steered FK model.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .state import num_particles


class FeynmanKac:
    """Base class of FK models. Override ``M0``, ``M`` and ``logG``; set ``T``.

    ``done`` defaults to "no particle ever finishes". Models whose particles
    finish at different times (an LLM reaching EOS) override it; the engine then
    freezes finished particles (their state is kept and their potential is 0),
    and stops early when every particle has finished.
    """

    T: int | None = None

    def M0(self, N: int, rng: np.random.Generator) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement M0(N, rng)")

    def M(self, t: int, xp: Any, rng: np.random.Generator) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement M(t, xp, rng)")

    def logG(self, t: int, xp: Any, x: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement logG(t, xp, x)")

    def done(self, t: int, x: Any) -> Any | None:
        return None


class Dynamics(FeynmanKac):
    """FK model of generation without a reward: override ``M0``, ``M`` (and ``done``);
    ``logG`` is 0 unless the dynamics weight their own moves; ``view(t, x)`` is what a
    potential scores (default: the state itself)."""

    def logG(self, t: int, xp: Any, x: Any) -> Any:
        return np.zeros(num_particles(x))

    def view(self, t: int, x: Any) -> Any:
        return x
