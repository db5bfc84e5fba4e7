"""Selection: which particles continue, and with what weights, before each step t >= 1.

Resampling is one kind of selection; search methods are others. A selection is a
callable ``select(t, rng, lw, W, ess, done) -> (A, lw_new)``: ``A`` the parent index
of each slot (``None``: particles stay where they are) and ``lw_new`` the slots'
log-weights. The engine (``ppl_scaling.smc``) calls it at the start of every step t >= 1
with the current log-weights ``lw``, their normalised weights ``W`` and ``ess``, and the
``done`` mask of finished particles.

    Resample(scheme, ess_threshold, resample_at)   SMC: A ~ scheme(W), weights reset to 0
                                                  when ESS < threshold * N or t in resample_at
    Beam(width)          beam search: finished slots keep their path; the unfinished slots
                         are refilled with ``width`` children each of the best ceil(n/width)
                         unfinished paths; scores (log-weights) are kept
    Groups(width, temperature)   DVTS / SVDD: consecutive groups of ``width`` slots each continue
                         from one of their members, the best (temperature 0) or one drawn
                         ∝ exp(score / temperature); a group whose slots have all finished
                         stops (a finished choice fills its group with copies); scores are kept

Only ``Resample`` keeps the evidence estimate unbiased (``unbiased = True``); with the
others the engine reports ``log_evidence = nan`` and the log-weights are search scores.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .resampling import Scheme, get_scheme

__all__ = ["Selection", "Resample", "Beam", "Groups"]


class Selection:
    """Base class; see the module docstring. ``name`` is recorded in results."""

    unbiased: bool = False
    name: str = "selection"

    def validate(self, N: int, T: int) -> None:
        """Raise ValueError if the selection cannot run with N particles over T steps."""

    def __call__(self, t: int, rng: np.random.Generator, lw: np.ndarray, W: np.ndarray, ess: float,
                 done: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        raise NotImplementedError


class Resample(Selection):
    """Resample with ``scheme`` when ESS < ``ess_threshold`` * N (0: never; 1: every step),
    or, if ``resample_at`` is given, exactly at those steps (each in 1..T-1)."""

    unbiased = True

    def __init__(self, scheme: str | Scheme = "systematic", ess_threshold: float = 0.5,
                 resample_at: Iterable[int] | None = None) -> None:
        if not 0.0 <= ess_threshold <= 1.0:
            raise ValueError(f"ess_threshold must be in [0, 1], got {ess_threshold}")
        self.scheme = get_scheme(scheme)
        self.name = scheme if isinstance(scheme, str) else getattr(scheme, "__name__", "custom")
        self.ess_threshold = float(ess_threshold)
        self.resample_at = None if resample_at is None else frozenset(int(t) for t in resample_at)

    def validate(self, N: int, T: int) -> None:
        bad = sorted(t for t in self.resample_at or () if not 1 <= t < T)
        if bad:
            raise ValueError(f"resample_at steps {bad} are outside 1..{T - 1}: resampling happens at the "
                             f"start of a step t >= 1 of the T = {T} steps")

    def due(self, t: int, ess: float, N: int) -> bool:
        """Resample at the start of step t, given the ESS of the current weights?"""
        if self.resample_at is not None:
            return t in self.resample_at
        if self.ess_threshold <= 0.0:
            return False
        return self.ess_threshold >= 1.0 or ess < self.ess_threshold * N

    def __call__(self, t, rng, lw, W, ess, done):
        if not self.due(t, ess, lw.shape[0]):
            return None, lw
        return self.scheme(rng, W), np.zeros_like(lw)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class Beam(Selection):
    """Beam search selection with beam width ``width`` (module docstring)."""

    name = "beam search"

    def __init__(self, width: int) -> None:
        self.width = _positive_int("beam width", width)

    def __call__(self, t, rng, lw, W, ess, done):
        A = np.arange(lw.size)
        active = np.flatnonzero(~done)
        if active.size:
            keep = -(-active.size // self.width)
            order = active[np.argsort(-lw[active], kind="stable")]
            A[active] = np.repeat(order[:keep], self.width)[: active.size]
        return A, lw[A]


class Groups(Selection):
    """Per-group selection over consecutive groups of ``width`` slots (module docstring):
    DVTS at ``temperature`` 0, SVDD's soft value selection at ``temperature`` > 0."""

    def __init__(self, width: int, temperature: float = 0.0, name: str = "groups") -> None:
        self.width = _positive_int("group width", width)
        if not (np.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0 (0 = keep the best), got {temperature}")
        self.temperature, self.name = float(temperature), name

    def validate(self, N: int, T: int) -> None:
        if N % self.width:
            raise ValueError(f"{self.name} splits {N} particles into groups of {self.width}; "
                             "the number of particles must be a multiple of the group width")

    def __call__(self, t, rng, lw, W, ess, done):
        g = lw.reshape(-1, self.width)
        if self.temperature == 0.0:
            pick = np.argmax(g, axis=1)
        else:
            top = g.max(axis=1, keepdims=True)
            with np.errstate(invalid="ignore"):
                p = np.exp((g - np.where(np.isfinite(top), top, 0.0)) / self.temperature)
            p = np.nan_to_num(p) / np.maximum(np.nan_to_num(p).sum(axis=1, keepdims=True), 1e-300)
            u = rng.random((g.shape[0], 1))
            pick = np.minimum((np.cumsum(p, axis=1) < u).sum(axis=1), self.width - 1)
        best = pick + np.arange(g.shape[0]) * self.width
        stopped = done.reshape(-1, self.width).all(axis=1).repeat(self.width)
        A = np.where(stopped, np.arange(lw.size), best.repeat(self.width))
        return A, lw[A]
