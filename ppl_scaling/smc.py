"""The SMC engine: *how* to sample a Feynman-Kac model.

One loop serves every method in this toolkit (particle filtering, FK steering,
importance sampling / best-of-N, conditional SMC for particle Gibbs)::

    t = 0:   x_0 ~ M0;                       lw = logG(0, None, x_0)
    t >= 1:  if time to resample:  A ~ scheme(W),  x = x[A],  lw = 0
             x_t ~ M(t, x_{t-1});            lw += logG(t, x_{t-1}, x_t)

Weights are carried between resampling steps. The evidence increment at step t
is the ratio of mean weights

    log Z_t - log Z_{t-1} = log Σ_i W_{t-1,i} G_t(x_i)   (= log mean G_t right after a resample)

which keeps Z unbiased under adaptive (ESS-triggered) resampling. Finished
particles (``fk.done``) keep their state and get logG = 0 from the step after
they finish; the run stops early once all have finished.

    result = smc(fk, num_particles=1000, ess_threshold=0.5, seed=0)
    result.log_evidence, result.ess, result.weights
"""
from __future__ import annotations

import time
from typing import Any, Iterable

import numpy as np
from tqdm import tqdm

from .errors import DegenerateWeightsError, PotentialError
from .resampling import Scheme, get_scheme
from .result import SMCResult
from .rng import as_generator
from .state import num_particles, take, where
from .weights import summarise


def as_log_potential(value: Any, N: int, t: int, what: str = "logG") -> np.ndarray:
    """Convert a potential's output to a float64 numpy array of shape (N,), or raise."""
    if hasattr(value, "detach"):  # torch
        value = value.detach().to("cpu").double().numpy()
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != (N,):
        raise PotentialError(
            f"{what} at step t={t} returned shape {arr.shape}; expected ({N},), one log potential per particle"
        )
    top = np.max(arr)  # NaN if any entry is NaN
    if np.isnan(top):
        raise PotentialError(
            f"{what} at step t={t} returned NaN for {int(np.isnan(arr).sum())} of {N} particles; "
            "return -inf to reject a particle, or fix the reward model"
        )
    if top == np.inf:
        raise PotentialError(f"{what} at step t={t} returned +inf; log potentials must be finite or -inf")
    return arr


class SMC:
    """Sequential Monte Carlo over ``fk`` with ``num_particles`` particles.

    Resampling happens at the start of step t >= 1 either when ESS < ess_threshold * N
    (``ess_threshold`` = 0: never, i.e. importance sampling; >= 1: every step), or,
    if ``resample_at`` is given, exactly at those steps.
    Subclasses change one piece by overriding ``initial``, ``move`` or ``ancestors``.
    """

    def __init__(
        self,
        fk: Any,
        num_particles: int,
        *,
        ess_threshold: float = 0.5,
        resampling: str | Scheme = "systematic",
        resample_at: Iterable[int] | None = None,
        store_history: bool = False,
        progress: bool = False,
    ) -> None:
        if not isinstance(num_particles, (int, np.integer)) or num_particles < 1:
            raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
        if not 0.0 <= ess_threshold <= 1.0:
            raise ValueError(f"ess_threshold must be in [0, 1], got {ess_threshold}")
        T = getattr(fk, "T", None)
        if T is None or int(T) < 1:
            raise ValueError(f"{type(fk).__name__}.T must be a positive number of steps, got {T!r}")
        self.fk = fk
        self.N = int(num_particles)
        self.T = int(T)
        self.ess_threshold = float(ess_threshold)
        self.scheme = get_scheme(resampling)
        self.resampling_name = resampling if isinstance(resampling, str) else getattr(resampling, "__name__", "custom")
        self.resample_at = None if resample_at is None else frozenset(int(t) for t in resample_at)
        self.store_history = store_history
        self.progress = progress

    # -- pieces a variant may override ------------------------------------------------
    def initial(self, rng: np.random.Generator) -> Any:
        return self.fk.M0(self.N, rng)

    def move(self, t: int, xp: Any, rng: np.random.Generator) -> Any:
        return self.fk.M(t, xp, rng)

    def ancestors(self, rng: np.random.Generator, W: np.ndarray) -> np.ndarray:
        return self.scheme(rng, W)

    def time_to_resample(self, t: int, ess: float) -> bool:
        """Resample at the start of step t, given the ESS of the current weights?"""
        if self.resample_at is not None:
            return t in self.resample_at
        if self.ess_threshold <= 0.0:
            return False
        return self.ess_threshold >= 1.0 or ess < self.ess_threshold * self.N

    # -- the loop ----------------------------------------------------------------------
    def run(self, rng: np.random.Generator) -> SMCResult:
        fk, N = self.fk, self.N
        counters0 = _counters(fk)
        start = time.perf_counter()
        lw = np.zeros(N)
        lse, W, ess_now = float(np.log(N)), None, float(N)  # logsumexp(lw), normalised lw, ESS
        done = np.zeros(N, dtype=bool)
        log_Z = 0.0
        ess_trace, resampled, increments = [], [], []
        history: list[Any] = []
        lw_history: list[np.ndarray] = []
        ancestry: list[np.ndarray] = []
        x: Any = None
        bar = tqdm(total=self.T, desc="SMC", disable=not self.progress, leave=False)
        for t in range(self.T):
            A = None  # identity ancestry unless resampled
            did_resample = False
            if t == 0:
                xp = None
                x = self.initial(rng)
                n = num_particles(x)
                if n is not None and n != N:
                    raise ValueError(f"{type(fk).__name__}.M0 returned {n} particles; expected {N}")
            else:
                if done.all():
                    break
                if self.time_to_resample(t, ess_now):
                    A = self.ancestors(rng, W)
                    x, lw, done = take(x, A), np.zeros(N), done[A]
                    lse = float(np.log(N))
                    did_resample = True
                xp = x
                x = self.move(t, xp, rng)
                if done.any():
                    x = where(done, xp, x)
            lG = as_log_potential(fk.logG(t, xp, x), N, t)
            if done.any():
                lG = np.where(done, 0.0, lG)
            new_lw = lw + lG
            new_lse, W, ess_now = summarise(new_lw)
            increment = new_lse - lse
            if increment == -np.inf:
                raise DegenerateWeightsError(
                    f"all {N} particles have weight zero (logG = -inf) at step t={t} of {type(fk).__name__}. "
                    "Use more particles, a softer potential (finite penalty or tempering), or a proposal "
                    "that respects the constraint."
                )
            lw, lse, log_Z = new_lw, new_lse, log_Z + increment
            finished = fk.done(t, x) if hasattr(fk, "done") else None
            if finished is not None:
                finished = np.asarray(finished, dtype=bool)
                if finished.shape != (N,):
                    raise ValueError(f"{type(fk).__name__}.done at t={t} returned shape {finished.shape}; expected ({N},)")
                done = done | finished
            ess_trace.append(ess_now)
            resampled.append(did_resample)
            increments.append(increment)
            if self.store_history:
                history.append(x)
                lw_history.append(lw)
                ancestry.append(np.arange(N) if A is None else A)
            bar.update(1)
        bar.close()
        compute = {"wall_s": time.perf_counter() - start, "steps": len(ess_trace), "resamples": int(sum(resampled))}
        compute.update(_counter_delta(counters0, _counters(fk)))
        return SMCResult(
            particles=x,
            log_weights=lw,
            log_evidence=log_Z,
            ess=np.asarray(ess_trace),
            resampled=np.asarray(resampled, dtype=bool),
            log_evidence_increments=np.asarray(increments),
            done=done,
            history=history if self.store_history else None,
            log_weights_history=lw_history if self.store_history else None,
            ancestors=ancestry if self.store_history else None,
            compute=compute,
            info={"num_particles": N, "resampling": self.resampling_name, "ess_threshold": self.ess_threshold,
                  "resample_at": None if self.resample_at is None else sorted(self.resample_at),
                  "model": type(fk).__name__},
        )


def _counters(fk: Any) -> dict[str, float]:
    get = getattr(fk, "counters", None)
    return dict(get()) if callable(get) else {}


def _counter_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0) for k, v in after.items()}


def smc(
    fk: Any,
    num_particles: int,
    *,
    ess_threshold: float = 0.5,
    resampling: str | Scheme = "systematic",
    resample_at: Iterable[int] | None = None,
    seed: int | None = None,
    rng: np.random.Generator | None = None,
    store_history: bool = False,
    progress: bool = False,
) -> SMCResult:
    """Run SMC on the Feynman-Kac model ``fk``; see ``SMC`` for the options.

    Pass ``seed`` (an int) or ``rng`` (a ``numpy.random.Generator``) for
    reproducibility. ``store_history=True`` keeps every step's particles and
    ancestors, for genealogies and ``SMCResult.paths()``.
    """
    algo = SMC(fk, num_particles, ess_threshold=ess_threshold, resampling=resampling,
               resample_at=resample_at, store_history=store_history, progress=progress)
    return algo.run(as_generator(seed, rng))
