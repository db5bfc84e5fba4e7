"""A*-decoding ("A*-Decoding: Token-Efficient Inference Scaling", 2025):
best-first search over partial solutions.

A node is a partial generation x (a state of the dynamics, e.g. a ``StepModel`` prefix); its
cost is f(x) = g(x) + h(x), lowest first, with

    g(x) = -alpha log p(x)       the path cost: the model's log-probability of the steps so far
                                 (``log_p`` of the state; 0 for states without one)
    h(x) = -lam r(x)             the heuristic: the potential's log-value of the prefix (a PRM read
                                 as log p: -log P(the prefix is on a correct path)), 0 without one.

The search pops the cheapest frontier node; a finished node is the goal and ends the search;
any other node is expanded by sampling ``num_children`` continuations of one step (duplicates
merged) that join the frontier. The budget is N generations' worth of steps, N T step samples
for T = ``model.T``: at most N T / ``num_children`` expansions (``max_expansions`` overrides).
When it is spent without a goal the answer is the cheapest finished node of the frontier, else
its cheapest node.

With h admissible (never above the cheapest cost-to-go, e.g. h = 0 since -log p only grows) and
every child of each expanded node generated, the goal is the cheapest complete path: with
alpha = 1 and no potential, the most probable generation (uniform-cost search). Sampled
expansion drops the children it never draws, and a PRM heuristic is not admissible in general:
then A* is greedy best-first on f.

The result holds the one path returned, with log-weight -f (``argmax_weight``) and, with a
potential, its reward; ``info``: ``expansions``, ``goal_found``, ``frontier`` (nodes left).

    res = a_star(step_model, 8, potential=prm, num_children=4, seed=0)
"""
from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from typing import Any, NamedTuple

import numpy as np

from ppl_scaling.ledger import recording
from ppl_scaling.potentials import as_potential, subset
from ppl_scaling.result import SMCResult
from ppl_scaling.rng import as_generator
from ppl_scaling.state import num_particles, take

__all__ = ["a_star", "METHODS"]


class Node(NamedTuple):
    """A frontier node: row ``row`` of the batch ``batch`` of children, ``depth`` steps long,
    ordered by cost ``f`` (then ``tie``, the order of generation)."""

    f: float
    tie: int
    depth: int
    batch: Any
    row: int
    done: bool
    reward: float


def _distinct(view: Any, n: int) -> np.ndarray:
    """Indices of the first occurrence of each distinct child (all of them if the view is not hashable)."""
    if not isinstance(view, (list, tuple)) or not all(isinstance(v, Hashable) for v in view):
        return np.arange(n)
    first: dict[Any, int] = {}
    for j, v in enumerate(view):
        first.setdefault(v, j)
    return np.array(sorted(first.values()), dtype=np.int64)


def a_star(model: Any, budget: int, *, potential: Any = None, num_children: int = 4, alpha: float = 1.0,
           lam: float = 1.0, max_expansions: int | None = None, seed: int | None = None,
           rng: np.random.Generator | None = None) -> SMCResult:
    """A* search over ``model``'s partial generations with f = -alpha log p - lam r and a budget
    of N = ``budget`` generations' worth of steps (module docstring)."""
    for name, value in (("budget", budget), ("num_children", num_children)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    K = int(num_children)
    limit = int(max_expansions) if max_expansions is not None else max(1, int(budget) * int(model.T) // K)
    heuristic = None if potential is None else as_potential(potential)
    rng = as_generator(seed, rng)
    tie = itertools.count()
    frontier: list[Node] = []
    node: Node | None = None   # None: the root (the prompt)
    expansions, found = 0, False
    with recording() as spent:
        while expansions < limit:
            depth = 0 if node is None else node.depth
            children = (model.M0(K, rng) if node is None
                        else model.M(depth, take(node.batch, np.full(K, node.row, dtype=np.int64)), rng))
            expansions += 1
            view = model.view(depth, children) if hasattr(model, "view") else children
            done = model.done(depth, children) if hasattr(model, "done") else None
            done = np.zeros(K, dtype=bool) if done is None else np.asarray(done, dtype=bool)
            keep = _distinct(view, num_particles(children) or K)
            log_p = getattr(children, "log_p", None)
            g = np.zeros(K) if log_p is None else -float(alpha) * np.asarray(log_p, dtype=np.float64)
            r = np.zeros(K)
            if heuristic is not None:
                r[keep] = heuristic.score(subset(view, keep), done[keep])
            for j in keep:
                heapq.heappush(frontier, Node(g[j] - float(lam) * r[j], next(tie), depth + 1, children, int(j),
                                              bool(done[j]), r[j]))
            node = heapq.heappop(frontier)
            if node.done:
                found = True
                break
    goal = node
    if not found:   # budget spent: the cheapest finished node, else the cheapest node
        goal = min([n for n in frontier + [node] if n.done] or frontier + [node])
    res = SMCResult(particles=take(goal.batch, np.array([goal.row])), log_weights=np.array([-goal.f]),
                    log_evidence=float("nan"), ess=np.ones(1), resampled=np.zeros(1, dtype=bool),
                    log_evidence_increments=np.full(1, np.nan), done=np.array([goal.done]), ledger=spent,
                    rewards=None if heuristic is None else np.array([goal.reward]),
                    info={"num_particles": 1, "selection": "A*", "model": type(model).__name__})
    return res.for_method("a_star", "argmax_weight", expansions=expansions, goal_found=found,
                          frontier=len(frontier), num_children=K)


METHODS = {"a_star": a_star}
