"""Tilting dynamics by a potential: the one place where rewards become potentials G_t.

    fk = Tilted(dynamics, potential, shape="difference", lam=1.0, at=None)
    result = pps.smc(fk, num_particles=16, seed=0)

``dynamics`` is an FK model of generation (``ppl_scaling.fk.Dynamics``: ``M0``, ``M``,
optional ``done`` and ``logG`` of its own) and ``potential`` a ``Potential`` (or a
function, coerced by ``as_potential``) with log-value r(x), the reward. The tilted
model targets

    pi(x_{0:T}) ∝ dynamics' target(x_{0:T}) · exp(lam r(x_final)),

reached through intermediate rewards r_t of the states on the way, turned into
potentials by an FK shape (``ppl_scaling.shapes``: difference, max, sum, last, with the
terminal correction, so the product of all potentials is exactly exp(lam r(x_final))).

What happens at step t, for the particles that moved (not finished before t):

    finished   dynamics.done(t, x); every particle at the last step t = T - 1
    r_t        potential.score(view, finished): ``complete`` for finished particles,
               ``prefix`` for the others, on ``dynamics.view(t, x)`` (what the potential
               reads: partial texts, decoded x0 predictions); only at the steps in ``at``
               (default: every step) and when a particle finishes
    logG_t     shape(r_t) + dynamics.logG(t, xp, x)

Dynamics that score a state in their own way (e.g. a Monte Carlo soft value over
several x0 draws) define ``rewards(t, x, rows, finished, tilt, rng)``: the rewards of
particles ``rows`` of ``x``, read with ``tilt.potential`` (and ``tilt.lam``). The shape
accumulators, the latest rewards and the finished flags travel in ``TiltedState``, so
resampling reindexes them with the particles. Rewards are validated once, by
``Potential.score``. ``lam = 0`` keeps the potential's support only (see ``shapes``).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .potentials import as_potential, subset
from .shapes import FKShape
from .state import num_particles, take, where

__all__ = ["Tilted", "TiltedState"]


@dataclass(frozen=True, eq=False)
class TiltedState:
    """The dynamics' state ``base`` plus per-particle tilt bookkeeping. Attributes it
    does not have are read from ``base`` (``state.x``, ``state.partials()``)."""

    base: Any
    acc: dict[str, np.ndarray]   # FK-shape accumulators
    logG: np.ndarray             # (N,) shaped log potential of the latest step
    reward: np.ndarray           # (N,) latest evaluated reward (nan before the first)
    done: np.ndarray             # (N,) bool: finished

    @property
    def num_particles(self) -> int:
        return int(self.done.shape[0])

    def take(self, idx: np.ndarray) -> TiltedState:
        return TiltedState(take(self.base, idx), take(self.acc, idx), self.logG[idx], self.reward[idx],
                           self.done[idx])

    def where(self, mask: np.ndarray, other: TiltedState) -> TiltedState:
        return TiltedState(where(mask, self.base, other.base), where(mask, self.acc, other.acc),
                           np.where(mask, self.logG, other.logG), np.where(mask, self.reward, other.reward),
                           np.where(mask, self.done, other.done))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)


class Tilted:
    """``dynamics`` tilted by ``potential`` ** ``lam`` through an FK ``shape`` (module docstring).
    ``at``: the steps at which intermediate rewards are evaluated (default all; the
    step where a particle finishes always is)."""

    def __init__(self, dynamics: Any, potential: Any, *, shape: str = "difference", lam: float = 1.0,
                 at: Iterable[int] | None = None) -> None:
        T = getattr(dynamics, "T", None)
        if T is None or int(T) < 1:
            raise ValueError(f"{type(dynamics).__name__}.T must be a positive number of steps, got {T!r}")
        self.dynamics, self.T = dynamics, int(T)
        if callable(getattr(dynamics, "logpt", None)):  # the tilt leaves M, hence its density, as it is
            self.logpt = lambda t, xp, x: dynamics.logpt(t, xp.base, x.base)
        self.potential = as_potential(potential)
        self.shape = FKShape(shape, float(lam))
        if at is None:
            self.at = None
        else:
            self.at = frozenset(int(t) for t in at)
            bad = sorted(t for t in self.at if not 0 <= t < self.T)
            if bad:
                raise ValueError(f"reward steps (at) {bad} are outside 0..{self.T - 1}")

    @property
    def lam(self) -> float:
        return self.shape.lam

    def __repr__(self) -> str:
        return (f"Tilted({type(self.dynamics).__name__}, {self.potential!r}, shape={self.shape.name!r}, "
                f"lam={self.lam:g})")

    # -- the FK model ----------------------------------------------------------------
    def M0(self, N: int, rng: np.random.Generator) -> TiltedState:
        return self._tilt(0, None, self.dynamics.M0(N, rng), rng)

    def M(self, t: int, xp: TiltedState, rng: np.random.Generator) -> TiltedState:
        return self._tilt(t, xp, self.dynamics.M(t, xp.base, rng), rng)

    def logG(self, t: int, xp: TiltedState | None, x: TiltedState) -> np.ndarray:
        """log G_t(xp, x): the tilt's potential of x after its parent xp (plus the dynamics' own).
        The engine passes x with its own parents: the value stored when x was made. One state
        weighed after N candidate parents (x has 1 particle, xp N) gets the shape's step
        recomputed from each candidate's accumulators: the FK potential depends on the parent
        (``difference``: r(x) - r(xp)); ``future_log_weights`` gives the whole future's."""
        tilt = x.logG
        if xp is not None and num_particles(x) == 1 and num_particles(xp) != 1:
            tilt = self._after(t, xp.acc, xp.done, x)[0]
        return tilt + self._own_logG(t, xp, x)

    def _own_logG(self, t: int, xp: TiltedState | None, x: TiltedState) -> np.ndarray | float:
        own = getattr(self.dynamics, "logG", None)
        if own is None:
            return 0.0
        return np.asarray(own(t, None if xp is None else xp.base, x.base), dtype=np.float64)

    def _after(self, t: int, acc: dict[str, np.ndarray], parent_done: np.ndarray,
               x: TiltedState) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        """The shape's step for state ``x`` (its reward, its done flag; 1 particle, broadcast)
        after parents with accumulators ``acc`` and done flags ``parent_done`` (N each), as
        ``_tilt`` took it: x's reward counts iff x moved (with ``at``: iff t is in ``at`` or x
        finished now). Returns (log G_t, the new accumulators, finished now)."""
        N = parent_done.shape[0]
        moved = ~parent_done
        finished = np.broadcast_to(x.done, (N,)) & moved
        due = finished if self.at is not None and t not in self.at else moved
        logG, new = np.zeros(N), {k: v.copy() for k, v in acc.items()}
        rows = np.flatnonzero(due)
        if rows.size:
            r = np.broadcast_to(x.reward, (N,))[rows]
            logG[rows], stepped = self.shape.step({k: v[rows] for k, v in acc.items()}, r, final=finished[rows])
            for k in new:
                new[k][rows] = stepped[k]
        return logG, new, finished

    def rebase(self, t: int, xp: TiltedState, x: TiltedState) -> TiltedState:
        """The state x (its dynamics state and reward) after another parent xp: the tilt's
        accumulators and log G_t recomputed from xp's (conditional SMC re-parents its
        reference this way after ancestor sampling)."""
        logG, acc, finished = self._after(t, xp.acc, xp.done, x)
        return TiltedState(x.base, acc, logG, np.broadcast_to(x.reward, logG.shape).copy(), xp.done | finished)

    def future_log_weights(self, t: int, xp: TiltedState, path: Sequence[TiltedState]) -> np.ndarray:
        """Σ_{s >= t} log G_s of the 1-particle states ``path`` (x_t, x_{t+1}, ...) after each of
        the N candidate parents ``xp`` at t - 1: the shape run on from each candidate's
        accumulators along the path's rewards (all that depends on the candidate; the
        dynamics' own log G only at t). Ancestor and backward sampling weigh candidates by it
        (for ``difference`` only log G_t depends on the parent, not for the other shapes)."""
        acc, done = xp.acc, xp.done
        total = np.zeros(done.shape[0])
        for k, x in enumerate(path):
            logG, acc, _ = self._after(t + k, acc, done, x)
            total += logG
            done = np.broadcast_to(x.done, done.shape)
        return total + self._own_logG(t, xp, path[0])

    def done(self, t: int, x: TiltedState) -> np.ndarray:
        return x.done

    # -- one step --------------------------------------------------------------------
    def _tilt(self, t: int, xp: TiltedState | None, x: Any, rng: np.random.Generator) -> TiltedState:
        N = num_particles(x)
        if N is None:
            raise TypeError(f"cannot tell the number of particles in a {type(x).__name__} state; "
                            "give it a num_particles attribute")
        moved = np.ones(N, dtype=bool) if xp is None else ~xp.done
        get_done = getattr(self.dynamics, "done", None)
        finished = get_done(t, x) if get_done is not None else None
        finished = np.zeros(N, dtype=bool) if finished is None else np.array(finished, dtype=bool)
        if finished.shape != (N,):
            raise ValueError(f"{type(self.dynamics).__name__}.done at t={t} returned shape {finished.shape}; "
                             f"expected ({N},)")
        if t == self.T - 1:
            finished[:] = True
        finished &= moved
        if xp is None:
            acc, reward = self.shape.init(N), np.full(N, np.nan)
        else:
            acc, reward = {k: v.copy() for k, v in xp.acc.items()}, xp.reward.copy()
        logG = np.zeros(N)
        due = finished if self.at is not None and t not in self.at else moved
        rows = np.flatnonzero(due)
        if rows.size:
            r = self._rewards(t, x, rows, finished[rows], rng)
            logG[rows], new = self.shape.step({k: v[rows] for k, v in acc.items()}, r, final=finished[rows])
            for k in acc:
                acc[k][rows] = new[k]
            reward[rows] = r
        done = finished if xp is None else xp.done | finished
        return TiltedState(x, acc, logG, reward, done)

    def _rewards(self, t: int, x: Any, rows: np.ndarray, finished: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
        own = getattr(self.dynamics, "rewards", None)
        if own is not None:
            return own(t, x, rows, finished, self, rng)
        view = self.dynamics.view(t, x) if hasattr(self.dynamics, "view") else x
        if rows.size != num_particles(x):
            view = subset(view, rows)
        return self.potential.score(view, finished)
