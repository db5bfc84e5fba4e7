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
                  copies of it). A budget N that is not a multiple of M is rounded down.

The width is M = min(beam_width, N): a budget smaller than the width is one beam of N.

Both spend the same budget as SMC with N particles (N moves per step) and return an
``SMCResult`` whose ``log_weights`` are the final scores, so the answer selection of
``ppl_scaling.aggregate`` (argmax weight, weighted vote) treats them like any sampler.
Both are the SMC engine with another selection (``ppl_scaling.selection``: ``Beam``,
``Groups``). There is no evidence estimate (``log_evidence`` is NaN); ``ess`` records the ESS the
scores would have as log-weights, ``resampled`` the selection steps.

    res = beam_search(fk, num_beams=16, beam_width=4, seed=0)
    res.particles, res.log_weights     # final paths and their scores
    beam_search(step_model, 16, potential=prm)   # dynamics tilted by a PRM (difference shape, lam 1)
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ppl_scaling.result import SMCResult
from ppl_scaling.rng import as_generator
from ppl_scaling.selection import Beam, Groups, Selection
from ppl_scaling.smc import SMC
from ppl_scaling.tilt import Tilted

__all__ = ["beam_search", "dvts", "METHODS"]


def _search(method: str, selection: Selection, fk: Any, num_beams: int, potential: Any, seed: int | None,
            rng: np.random.Generator | None, store_history: bool, progress: bool) -> SMCResult:
    if potential is not None:
        fk = Tilted(fk, potential, shape="difference", lam=1.0)
    algo = SMC(fk, num_beams, selection=selection, store_history=store_history, progress=progress)
    return algo.run(as_generator(seed, rng)).for_method(method, "argmax_weight")


def _width(num_beams: int, beam_width: int) -> int:
    for name, value in (("num_beams", num_beams), ("beam_width", beam_width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return min(int(beam_width), int(num_beams))


def beam_search(fk: Any, num_beams: int, beam_width: int = 4, *, potential: Any = None, seed: int | None = None,
                rng: np.random.Generator | None = None, store_history: bool = False,
                progress: bool = False) -> SMCResult:
    """Beam search with ``num_beams`` slots (N), each kept path expanded M = min(``beam_width``, N) ways."""
    width = _width(num_beams, beam_width)
    return _search("beam_search", Beam(width), fk, num_beams, potential, seed, rng, store_history, progress)


def dvts(fk: Any, num_beams: int, beam_width: int = 4, *, potential: Any = None, seed: int | None = None,
         rng: np.random.Generator | None = None, store_history: bool = False, progress: bool = False) -> SMCResult:
    """Diverse verifier tree search: floor(N / M) greedy subtrees of width M = min(``beam_width``, N),
    N = ``num_beams`` (N - N mod M slots are used)."""
    width = _width(num_beams, beam_width)
    return _search("dvts", Groups(width, name="DVTS"), fk, num_beams - num_beams % width, potential, seed, rng,
                   store_history, progress)


METHODS = {"beam_search": beam_search, "dvts": dvts}
