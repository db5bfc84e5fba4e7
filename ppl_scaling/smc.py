"""The SMC engine: *how* to sample a Feynman-Kac model.

One loop serves every method in this toolkit (particle filtering, FK steering,
importance sampling / best-of-N, beam search, DVTS, SVDD, conditional SMC)::

    t = 0:   x_0 ~ M0;                       lw = logG(0, None, x_0)
    t >= 1:  A, lw = select(t, lw)           (resampling: A ~ scheme(W), lw = 0, when due)
             x_t ~ M(t, x_{t-1}[A]);         lw += logG(t, x_{t-1}, x_t)

Weights are carried between resampling steps. The evidence increment at step t
is the ratio of mean weights

    log Z_t - log Z_{t-1} = log Σ_i W_{t-1,i} G_t(x_i)   (= log mean G_t right after a resample)

which keeps Z unbiased under adaptive (ESS-triggered) resampling. Finished
particles (``fk.done``) keep their state and get logG = 0 from the step after
they finish; the run stops early once all have finished, or when ``stop(state)`` says so.

The engine is steppable: ``init`` and ``step`` are pure functions of an immutable
``SMCState`` (BlackJAX style), ``run`` is the loop, and iterating yields every state::

    algo = SMC(fk, num_particles=1000)
    state = algo.init(rng)
    while not algo.finished(state):
        state = algo.step(state, rng)
    result = algo.result(state)            # == algo.run(rng) for the same rng
    for state in algo.states(rng): ...     # the same, as in ``particles``

    result = smc(fk, num_particles=1000, ess_threshold=0.5, seed=0)
    result.log_evidence, result.ess, result.weights, result.ledger

``selection`` (``ppl_scaling.selection``) generalises resampling: ``Beam`` and ``Groups``
keep the best paths with their scores (beam search, DVTS, SVDD) on this same loop.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from .errors import DegenerateWeightsError, PotentialError
from .ledger import Ledger, recording
from .resampling import Scheme
from .result import SMCResult
from .rng import as_generator
from .selection import Resample, Selection
from .state import num_particles, take, where
from .weights import logsumexp, summarise


def as_log_potential(value: Any, N: int, t: int, what: str = "logG") -> np.ndarray:
    """Convert a potential's output to a float64 numpy array of shape (N,), or raise."""
    if hasattr(value, "detach"):  # torch
        value = value.detach().to("cpu").numpy()
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu":
        raise PotentialError(
            f"{what} at step t={t} returned values of dtype {arr.dtype}; expected real log potentials "
            "(floats; -inf rejects a particle)" + (": use 0.0 / -inf instead of True / False" if arr.dtype == bool else "")
        )
    arr = arr.astype(np.float64, copy=False)
    if arr.shape != (N,):
        raise PotentialError(
            f"{what} at step t={t} returned shape {arr.shape}; expected ({N},), one log potential per particle"
        )
    top = arr.max()  # NaN if any entry is NaN
    if np.isnan(top):
        raise PotentialError(
            f"{what} at step t={t} returned NaN for {int(np.isnan(arr).sum())} of {N} particles; "
            "return -inf to reject a particle, or fix the reward model"
        )
    if top == np.inf:
        raise PotentialError(f"{what} at step t={t} returned +inf; log potentials must be finite or -inf")
    return arr


def model_name(fk: Any) -> str:
    """``DiffusionModel``, or ``Tilted(DiffusionModel)`` for tilted dynamics."""
    inner = getattr(fk, "dynamics", None)
    return f"{type(fk).__name__}({model_name(inner)})" if inner is not None else type(fk).__name__


def as_done_mask(value: Any, N: int, t: int, who: str) -> np.ndarray:
    """A ``done`` output as an (N,) bool array, or raise (NaN or non-0/1 numbers are errors)."""
    if hasattr(value, "detach"):  # torch
        value = value.detach().to("cpu").numpy()
    arr = np.asarray(value)
    if arr.shape != (N,):
        raise ValueError(f"{who}.done at t={t} returned shape {arr.shape}; expected ({N},)")
    if arr.dtype != bool and not (arr.dtype.kind in "iuf" and np.isin(arr, (0, 1)).all()):
        raise ValueError(f"{who}.done at t={t} returned {arr.dtype} values other than 0 / 1 (e.g. NaN); "
                         "return a boolean mask of finished particles")
    return arr.astype(bool, copy=False)


class SMCState(NamedTuple):
    """Everything an SMC run carries between steps (immutable; ``SMC.step`` returns a new one).

    ``t`` is the number of steps done (the next step to run); ``W``, ``lse`` and ``ess``
    cache the normalised weights, log Σ exp(lw) and ESS of ``log_weights``. Per-step traces
    are tuples with one entry per step done; ``history`` / ``log_weights_history`` /
    ``ancestors`` are None unless the run stores its history.
    """

    t: int
    particles: Any
    log_weights: np.ndarray
    W: np.ndarray | None
    lse: float
    ess: float
    log_evidence: float
    done: np.ndarray
    ledger: Ledger
    ess_trace: tuple[float, ...] = ()
    resampled: tuple[bool, ...] = ()
    increments: tuple[float, ...] = ()
    history: tuple[Any, ...] | None = None
    log_weights_history: tuple[np.ndarray, ...] | None = None
    ancestors: tuple[np.ndarray, ...] | None = None


class SMC:
    """Sequential Monte Carlo over ``fk`` with ``num_particles`` particles.

    Before each step t >= 1 the ``selection`` picks the particles that continue; the
    default, ``Resample(resampling, ess_threshold, resample_at)``, resamples when
    ESS < ess_threshold * N (0: never, i.e. importance sampling; 1: every step), or, if
    ``resample_at`` is given, exactly at those steps. ``stop(state) -> bool`` ends the run
    early (after any step). Subclasses change one piece by overriding ``initial``, ``move``
    or ``select``.
    """

    def __init__(
        self,
        fk: Any,
        num_particles: int,
        *,
        ess_threshold: float = 0.5,
        resampling: str | Scheme = "systematic",
        resample_at: Iterable[int] | None = None,
        selection: Selection | None = None,
        stop: Callable[[SMCState], bool] | None = None,
        store_history: bool = False,
        progress: bool = False,
    ) -> None:
        if isinstance(num_particles, bool) or not isinstance(num_particles, (int, np.integer)) or num_particles < 1:
            raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
        T = getattr(fk, "T", None)
        if T is None or int(T) < 1:
            raise ValueError(f"{type(fk).__name__}.T must be a positive number of steps, got {T!r}")
        self.fk = fk
        self.N = int(num_particles)
        self.T = int(T)
        self.selection = selection or Resample(resampling, ess_threshold, resample_at)
        self.selection.validate(self.N, self.T)
        self.stop = stop
        self.store_history = store_history
        self.progress = progress

    # -- pieces a variant may override ------------------------------------------------
    def initial(self, rng: np.random.Generator) -> Any:
        return self.fk.M0(self.N, rng)

    def move(self, t: int, xp: Any, rng: np.random.Generator) -> Any:
        return self.fk.M(t, xp, rng)

    def select(self, t: int, rng: np.random.Generator, state: SMCState) -> tuple[np.ndarray | None, np.ndarray]:
        return self.selection(t, rng, state.log_weights, state.W, state.ess, state.done)

    # -- the kernel ---------------------------------------------------------------------
    def init(self, rng: np.random.Generator) -> SMCState:
        """Step t = 0: draw x_0 ~ M0 and weight it by G_0."""
        N = self.N
        empty = np.zeros(N)
        state = SMCState(t=0, particles=None, log_weights=empty, W=None, lse=float(np.log(N)), ess=float(N),
                         log_evidence=0.0, done=np.zeros(N, dtype=bool),
                         history=() if self.store_history else None,
                         log_weights_history=() if self.store_history else None,
                         ancestors=() if self.store_history else None, ledger=Ledger())
        with recording() as spent:
            x = self.initial(rng)
            self._check_size(x, "M0", 0)
            weighed = self._weigh(0, None, x, empty, state.lse, state.done)
        return self._advance(state, None, spent, *weighed)

    def step(self, state: SMCState, rng: np.random.Generator) -> SMCState:
        """Step t = state.t >= 1: select, move with M, weight with G_t."""
        t = state.t
        if t < 1 or t >= self.T:
            raise ValueError(f"step needs 1 <= state.t < T = {self.T}, got t = {t}; start with init(rng)")
        with recording() as spent:
            A, lw = self.select(t, rng, state)
            x, done, lse = state.particles, state.done, state.lse
            if A is not None:
                x, done = take(x, A), done[A]
                lse = float(np.log(self.N)) if not lw.any() else logsumexp(lw)
            xp = x
            x = self.move(t, xp, rng)
            self._check_size(x, "M", t)
            if done.any():
                x = where(done, xp, x)
            weighed = self._weigh(t, xp, x, lw, lse, done)
        return self._advance(state, A, spent, *weighed)

    def _check_size(self, x: Any, what: str, t: int) -> None:
        n = num_particles(x)
        if n is not None and n != self.N:
            raise ValueError(f"{type(self.fk).__name__}.{what} at t={t} returned {n} particles; expected {self.N}")

    def _weigh(self, t: int, xp: Any, x: Any, lw: np.ndarray, lse: float,
               done: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray | None, float, float, float, np.ndarray]:
        """lw += logG_t (0 for finished particles); the increment log Σ W G_t; the new done mask."""
        N, fk = self.N, self.fk
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
        finished = fk.done(t, x) if hasattr(fk, "done") else None
        if finished is not None:
            done = done | as_done_mask(finished, N, t, type(fk).__name__)
        return x, new_lw, W, new_lse, ess_now, increment, done

    def _advance(self, state: SMCState, A: np.ndarray | None, spent: Ledger, x: Any, lw: np.ndarray,
                 W: np.ndarray | None, lse: float, ess_now: float, increment: float, done: np.ndarray) -> SMCState:
        """The state after step ``state.t``."""
        keep = self.store_history
        return SMCState(
            t=state.t + 1, particles=x, log_weights=lw, W=W, lse=lse, ess=ess_now,
            log_evidence=state.log_evidence + increment, done=done,
            ess_trace=state.ess_trace + (ess_now,), resampled=state.resampled + (A is not None,),
            increments=state.increments + (increment,),
            history=state.history + (x,) if keep else None,
            log_weights_history=state.log_weights_history + (lw,) if keep else None,
            ancestors=state.ancestors + (np.arange(self.N) if A is None else A,) if keep else None,
            ledger=state.ledger + spent,
        )

    def finished(self, state: SMCState) -> bool:
        """True when the run is over: T steps done, every particle finished, or ``stop``."""
        return (state.t >= self.T or bool(state.done.all())
                or (self.stop is not None and state.t > 0 and bool(self.stop(state))))

    # -- loops ----------------------------------------------------------------------------
    def states(self, rng: np.random.Generator) -> Iterator[SMCState]:
        """Every state of a run, from ``init`` to the last step."""
        state = self.init(rng)
        yield state
        with tqdm(total=self.T, initial=1, desc="SMC", disable=not self.progress, leave=False) as bar:
            while not self.finished(state):
                state = self.step(state, rng)
                bar.update(1)
                yield state

    def run(self, rng: np.random.Generator) -> SMCResult:
        state = None
        for state in self.states(rng):
            pass
        return self.result(state)

    def stopped_early(self, state: SMCState) -> bool:
        """Whether the ``stop`` rule ended the run before T steps with particles unfinished."""
        return state.t < self.T and not bool(state.done.all())

    def result(self, state: SMCState) -> SMCResult:
        """The ``SMCResult`` of a state (usually the last). A run stopped early
        (``stopped_early``) keeps only its finished particles' weights (the unfinished get
        log-weight -inf: they are not draws of the target; all of them are kept when none
        finished), has no log Z estimate (NaN) and says so in ``info["stopped_early"]``."""
        unbiased = self.selection.unbiased
        increments = np.asarray(state.increments) if unbiased else np.full(state.t, np.nan)
        log_weights, info = state.log_weights, {}
        if self.stopped_early(state):
            unbiased = False
            if state.done.any():
                log_weights = np.where(state.done, log_weights, -np.inf)
            info["stopped_early"] = {"step": state.t, "unfinished": int(np.sum(~state.done))}
        return SMCResult(
            particles=state.particles,
            log_weights=log_weights,
            log_evidence=state.log_evidence if unbiased else float("nan"),
            ess=np.asarray(state.ess_trace),
            resampled=np.asarray(state.resampled, dtype=bool),
            log_evidence_increments=increments,
            done=state.done,
            history=None if state.history is None else list(state.history),
            log_weights_history=None if state.log_weights_history is None else list(state.log_weights_history),
            ancestors=None if state.ancestors is None else list(state.ancestors),
            ledger=state.ledger,
            info={"num_particles": self.N, "selection": self.selection.name, "model": model_name(self.fk),
                  **self._selection_info(), **info},
        )

    def _selection_info(self) -> dict[str, Any]:
        sel = self.selection
        if isinstance(sel, Resample):
            return {"ess_threshold": sel.ess_threshold,
                    "resample_at": None if sel.resample_at is None else sorted(sel.resample_at)}
        return {}


def smc(
    fk: Any,
    num_particles: int,
    *,
    ess_threshold: float = 0.5,
    resampling: str | Scheme = "systematic",
    resample_at: Iterable[int] | None = None,
    selection: Selection | None = None,
    stop: Callable[[SMCState], bool] | None = None,
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
    algo = SMC(fk, num_particles, ess_threshold=ess_threshold, resampling=resampling, resample_at=resample_at,
               selection=selection, stop=stop, store_history=store_history, progress=progress)
    return algo.run(as_generator(seed, rng))
