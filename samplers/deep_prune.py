"""DeepPrune: self-consistency without inter-trace redundancy ("DeepPrune: Parallel Scaling
without Inter-trace Redundancy", 2025).

N traces are generated in parallel, as in self-consistency. Before every step t >= ``min_step``
a judge compares the partial traces and an online greedy clustering prunes the redundant ones:
in particle order, each unpruned trace joins the first earlier representative that the judge
says will reach the same final answer, judge(rep, x) >= ``threshold``, and then stops
generating (a finished trace stays, only the unfinished are pruned); the others become
representatives. A pruned trace is a vote for its representative (followed to the end of the
chain when the representative is pruned later), so the answer is the majority of the votes:

    votes(i) = #{j : root(j) = i},    answer = argmax_a Σ_{i kept, answer(i) = a} votes(i)

(``log_weights`` = log votes for kept traces, -inf for pruned ones; rule ``weighted_majority``).
With a perfect judge every pruned trace would have ended with its representative's answer, so
the vote is self-consistency's on the same samples, at the cost of the tokens the pruned
traces never generate (the ledger's ``tokens``).

Pruning lives in the dynamics: ``Pruning(dynamics, judge)`` moves only the unpruned particles
and marks pruned ones done, so the engine freezes them and nothing is generated for them.
The judge is pluggable: ``judge(a, b) -> bool | probability`` on two values of the dynamics'
view (``Partial`` for LLM steps); each call counts as one ``reward_calls``. The default,
``same_last_step``, calls two traces redundant when they have made the same number of steps
and the latest is the same text (on the toy arithmetic task: the same running total).

    res = deep_prune(StepModel(lm, prompt, ...), 16, judge=my_judge, seed=0)
    res.info["pruned"], res.info["judge_calls"], res.select(answers)
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ppl_scaling.fk import Dynamics
from ppl_scaling.ledger import record
from ppl_scaling.potentials import subset
from ppl_scaling.result import SMCResult
from ppl_scaling.smc import smc
from ppl_scaling.state import take, where

__all__ = ["Pruning", "PrunedState", "deep_prune", "same_last_step", "METHODS"]

Judge = Callable[[Any, Any], Any]


def same_last_step(a: Any, b: Any) -> bool:
    """The default judge on ``Partial`` values: as many steps, and the same latest step."""
    return len(a.steps) == len(b.steps) and a.steps[-1:] == b.steps[-1:]


@dataclass(frozen=True, eq=False)
class PrunedState:
    """The dynamics' state ``base`` plus, per particle, its id (0..N-1 at the start) and the
    id of the representative it votes for (its own while it is kept). Attributes it does not
    have are read from ``base`` (``state.partials()``, ``state.num_tokens``)."""

    base: Any
    ids: np.ndarray
    rep: np.ndarray

    @property
    def num_particles(self) -> int:
        return int(self.ids.shape[0])

    @property
    def pruned(self) -> np.ndarray:
        return self.rep != self.ids

    def take(self, idx: np.ndarray) -> PrunedState:
        return PrunedState(take(self.base, idx), self.ids[idx], self.rep[idx])

    def where(self, mask: np.ndarray, other: PrunedState) -> PrunedState:
        return PrunedState(where(mask, self.base, other.base), np.where(mask, self.ids, other.ids),
                           np.where(mask, self.rep, other.rep))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)


class Pruning(Dynamics):
    """``dynamics`` whose redundant traces are pruned before each step t >= ``min_step``
    (module docstring); pruned particles are done and never moved again."""

    def __init__(self, dynamics: Any, judge: Judge = same_last_step, *, threshold: float = 0.5,
                 min_step: int = 1) -> None:
        if not callable(judge):
            raise TypeError(f"judge must be a function judge(a, b) -> bool or probability, got {type(judge).__name__}")
        if isinstance(min_step, bool) or not isinstance(min_step, (int, np.integer)) or min_step < 1:
            raise ValueError(f"min_step must be a positive integer (pruning happens before a move), got {min_step!r}")
        self.dynamics, self.judge, self.threshold, self.min_step = dynamics, judge, float(threshold), int(min_step)
        self.T = dynamics.T

    def M0(self, N: int, rng: np.random.Generator) -> PrunedState:
        return PrunedState(self.dynamics.M0(N, rng), np.arange(N), np.arange(N))

    def M(self, t: int, xp: PrunedState, rng: np.random.Generator) -> PrunedState:
        if t >= self.min_step:
            xp = self._prune(t, xp)
        kept = np.flatnonzero(~xp.pruned)
        if kept.size == xp.num_particles:
            return PrunedState(self.dynamics.M(t, xp.base, rng), xp.ids, xp.rep)
        if kept.size == 0:
            return xp
        moved = self.dynamics.M(t, take(xp.base, kept), rng)
        pos = np.zeros(xp.num_particles, dtype=np.int64)
        pos[kept] = np.arange(kept.size)
        return PrunedState(where(~xp.pruned, take(moved, pos), xp.base), xp.ids, xp.rep)

    def logG(self, t: int, xp: PrunedState | None, x: PrunedState) -> np.ndarray:
        own = np.asarray(self.dynamics.logG(t, None if xp is None else xp.base, x.base), dtype=np.float64)
        return np.where(x.pruned, 0.0, own)

    def done(self, t: int, x: PrunedState) -> np.ndarray:
        finished = self.dynamics.done(t, x.base) if hasattr(self.dynamics, "done") else None
        finished = np.zeros(x.num_particles, dtype=bool) if finished is None else np.asarray(finished, dtype=bool)
        return finished | x.pruned

    def view(self, t: int, x: PrunedState) -> Any:
        return self.dynamics.view(t, x.base) if hasattr(self.dynamics, "view") else x.base

    def _prune(self, t: int, xp: PrunedState) -> PrunedState:
        """Online greedy clustering of the unpruned traces (in id order) by the judge."""
        view = self.view(t - 1, xp)
        n = xp.num_particles
        values = view if isinstance(view, list) else [subset(view, np.array([i])) for i in range(n)]
        finished = self.done(t - 1, xp) & ~xp.pruned
        rep, reps, calls = xp.rep.copy(), [], 0
        for i in np.flatnonzero(~xp.pruned)[np.argsort(xp.ids[~xp.pruned], kind="stable")]:
            match = None
            for j in reps:
                calls += 1
                if float(self.judge(values[j], values[i])) >= self.threshold:
                    match = j
                    break
            if match is None:
                reps.append(i)
            elif not finished[i]:
                rep[i] = xp.ids[match]
        record(reward_calls=calls)
        return PrunedState(xp.base, xp.ids, rep)


def _votes(ids: np.ndarray, rep: np.ndarray) -> np.ndarray:
    """Votes of each particle: itself and every trace whose chain of representatives ends at it."""
    root = dict(zip(ids.tolist(), rep.tolist()))
    position = {int(i): k for k, i in enumerate(ids)}
    votes = np.zeros(ids.size, dtype=np.int64)
    for i in ids.tolist():
        while root[i] != i:
            i = root[i]
        votes[position[i]] += 1
    return votes


def deep_prune(model: Any, budget: int, *, potential: Any = None, judge: Judge = same_last_step,
               threshold: float = 0.5, min_step: int = 1, seed: int | None = None,
               rng: np.random.Generator | None = None, progress: bool = False) -> SMCResult:
    """``budget`` traces of ``model`` with redundant ones pruned by ``judge`` (module docstring);
    ``potential`` is ignored (no reward model, as self-consistency); ``info["judge_calls"]``
    counts the judgements (the run's ``reward_calls``)."""
    fk = Pruning(model, judge, threshold=threshold, min_step=min_step)
    res = smc(fk, budget, ess_threshold=0.0, seed=seed, rng=rng, progress=progress)
    x = res.particles
    votes = _votes(x.ids, x.rep)
    with np.errstate(divide="ignore"):
        log_weights = np.where(x.pruned, -np.inf, np.log(votes))
    pruned = int(x.pruned.sum())
    out = SMCResult(particles=x, log_weights=log_weights, log_evidence=float("nan"), ess=res.ess,
                    resampled=res.resampled, log_evidence_increments=np.full(len(res.ess), np.nan), done=res.done,
                    ledger=res.ledger, info={**res.info, "selection": "pruning"})
    return out.for_method("deep_prune", "weighted_majority", pruned=pruned, judge_calls=res.ledger.reward_calls,
                          threshold=fk.threshold, min_step=fk.min_step)


METHODS = {"deep_prune": deep_prune}
