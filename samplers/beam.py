"""Beam search and diverse verifier tree search (DVTS): deterministic top-k selection.

The mode-seeking baselines of inference-time scaling, on any Feynman-Kac model.
A path's *score* is its cumulative log potential Σ_s logG_s; for an LLM
``StepModel`` with the ``difference`` shape (lam = 1) that is the reward of the
current prefix r_t, e.g. the PRM's score of the steps so far. Where SMC resamples
at random in proportion to the weights, these keep the best paths outright
(search-and-learn, Beeching et al. 2024)::

    beam_search   N slots; at every step the top ceil(n/M) unfinished paths (n = unfinished
                  slots) are kept and each is expanded into M children. A path that
                  finishes keeps its slot for good (the search's "completed" pool).
    dvts          N/M independent subtrees of M slots; at every step each subtree keeps
                  its single best candidate (greedy) and expands it M ways; a subtree
                  stops when its best candidate has finished (its M slots then hold
                  copies of it).

Both spend the same budget as SMC with N particles (N moves per step) and return an
``SMCResult`` whose ``log_weights`` are the final scores, so the answer selection of
``ppl_scaling.aggregate`` (argmax weight, weighted vote) treats them like any sampler.
There is no evidence estimate (``log_evidence`` is NaN); ``ess`` records the ESS the
scores would have as log-weights, ``resampled`` the selection steps.

    res = beam_search(fk, num_beams=16, beam_width=4, seed=0)
    res.particles, res.log_weights     # final paths and their scores
"""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from ppl_scaling.result import SMCResult
from ppl_scaling.rng import as_generator
from ppl_scaling.smc import _counter_delta, _counters, as_log_potential
from ppl_scaling.state import num_particles as _num_particles
from ppl_scaling.state import take, where
from ppl_scaling.weights import ess

Selector = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _check_budget(num_beams: int, beam_width: int, *, divisible: bool) -> None:
    for name, v in (("num_beams", num_beams), ("beam_width", beam_width)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if divisible and num_beams % beam_width:
        raise ValueError(f"DVTS splits num_beams={num_beams} into subtrees of beam_width={beam_width}; "
                         "num_beams must be a multiple of beam_width")


def beam_selector(beam_width: int) -> Selector:
    """Parents for beam search: finished slots keep their path; the unfinished slots
    are refilled with M children each of the top ceil(n/M) unfinished paths."""
    def select(score: np.ndarray, done: np.ndarray) -> np.ndarray:
        A = np.arange(score.size)
        active = np.flatnonzero(~done)
        if active.size:
            keep = -(-active.size // beam_width)
            order = active[np.argsort(-score[active], kind="stable")]
            A[active] = np.repeat(order[:keep], beam_width)[: active.size]
        return A
    return select


def dvts_selector(beam_width: int) -> Selector:
    """Parents for DVTS: every subtree of ``beam_width`` consecutive slots continues
    from its best slot (a finished best ends the subtree: its slots become copies)."""
    def select(score: np.ndarray, done: np.ndarray) -> np.ndarray:
        groups = score.reshape(-1, beam_width)
        best = np.argmax(groups, axis=1) + np.arange(groups.shape[0]) * beam_width
        A = np.repeat(best, beam_width)
        return np.where(done.reshape(-1, beam_width).all(axis=1).repeat(beam_width), np.arange(score.size), A)
    return select


def tree_search(fk: Any, num_beams: int, select: Selector, *, rng: np.random.Generator,
                store_history: bool = False, progress: bool = False, name: str = "tree search") -> SMCResult:
    """The loop shared by beam search and DVTS: move, score, and before each later
    step replace every slot by the parent ``select(scores, done)`` names."""
    N, T = int(num_beams), getattr(fk, "T", None)
    if T is None or int(T) < 1:
        raise ValueError(f"{type(fk).__name__}.T must be a positive number of steps, got {T!r}")
    counters0, start = _counters(fk), time.perf_counter()
    history, lw_history, ancestry, ess_trace, selected = [], [], [], [], []
    score, done = np.zeros(N), np.zeros(N, dtype=bool)
    x: Any = None
    for t in tqdm(range(int(T)), desc=name, disable=not progress, leave=False):
        A = np.arange(N)
        if t == 0:
            xp, x = None, fk.M0(N, rng)
            n = _num_particles(x)
            if n is not None and n != N:
                raise ValueError(f"{type(fk).__name__}.M0 returned {n} particles; expected {N}")
        else:
            if done.all():
                break
            A = select(score, done)
            x, score, done = take(x, A), score[A], done[A]
            xp = x
            x = fk.M(t, xp, rng)
            if done.any():
                x = where(done, xp, x)
        lG = as_log_potential(fk.logG(t, xp, x), N, t)
        score = score + np.where(done, 0.0, lG)
        finished = fk.done(t, x) if hasattr(fk, "done") else None
        if finished is not None:
            done = done | np.asarray(finished, dtype=bool)
        ess_trace.append(ess(score) if np.isfinite(score).any() else 0.0)
        selected.append(t > 0)
        if store_history:
            history.append(x)
            lw_history.append(score.copy())
            ancestry.append(A)
    compute = {"wall_s": time.perf_counter() - start, "steps": len(ess_trace), "resamples": int(sum(selected))}
    compute.update(_counter_delta(counters0, _counters(fk)))
    steps = len(ess_trace)
    return SMCResult(
        particles=x, log_weights=score, log_evidence=float("nan"), ess=np.asarray(ess_trace),
        resampled=np.asarray(selected, dtype=bool), log_evidence_increments=np.full(steps, np.nan), done=done,
        history=history if store_history else None, log_weights_history=lw_history if store_history else None,
        ancestors=ancestry if store_history else None, compute=compute,
        info={"num_particles": N, "resampling": name, "model": type(fk).__name__},
    )


def beam_search(fk: Any, num_beams: int, beam_width: int = 4, *, seed: int | None = None,
                rng: np.random.Generator | None = None, store_history: bool = False,
                progress: bool = False) -> SMCResult:
    """Beam search with ``num_beams`` slots (N), each kept path expanded ``beam_width`` (M) ways."""
    _check_budget(num_beams, beam_width, divisible=False)
    return tree_search(fk, num_beams, beam_selector(int(beam_width)), rng=as_generator(seed, rng),
                       store_history=store_history, progress=progress, name="beam search")


def dvts(fk: Any, num_beams: int, beam_width: int = 4, *, seed: int | None = None,
         rng: np.random.Generator | None = None, store_history: bool = False, progress: bool = False) -> SMCResult:
    """Diverse verifier tree search: ``num_beams / beam_width`` greedy subtrees of width ``beam_width``
    (``num_beams`` must be a multiple of ``beam_width``)."""
    _check_budget(num_beams, beam_width, divisible=True)
    return tree_search(fk, num_beams, dvts_selector(int(beam_width)), rng=as_generator(seed, rng),
                       store_history=store_history, progress=progress, name="DVTS")
