"""Compute-optimal allocation (Snell et al. 2024): per difficulty bin, the method and budget that
maximise accuracy at an average compute budget.

From a validation run, every problem gets a difficulty signal from a cheap pilot (the
agreement of a few samples: the share of the most common answer) and falls in one of B
bins (quantiles of the signal). With w_b the share of problems in bin b and, for every
option o = (method, N), acc_b(o) and cost_b(o) the mean accuracy and tokens (generated +
reward) in that bin, the policy solves the multiple-choice knapsack

    max_{o_1..o_B}  Σ_b w_b acc_b(o_b)   subject to   c_pilot + Σ_b w_b cost_b(o_b) <= T,

exactly: bins are combined one at a time keeping only Pareto-optimal (cost, accuracy)
partial sums (a partial allocation dominated in both can never be part of the optimum),
so the search is exact and small (``solve``; ``brute_force`` enumerates every allocation,
for tests). Ties in accuracy go to the cheaper allocation. The pilot always runs (its mean
tokens are c_pilot); choosing the pilot itself in a bin costs nothing more.

    policy = allocate(rows, token_budget=4000)       # rows of `ppl-scaling eval` on validation problems
    policy.choice(signal)                          # (method, N) for a problem whose pilot agreed this much
"""
from __future__ import annotations

import itertools
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Option", "Policy", "agreement", "solve", "brute_force", "bin_edges", "bin_of", "allocate", "PILOT"]

PILOT = ("self_consistency", 4)   # the default pilot: 4 samples, their agreement is the signal


@dataclass(frozen=True)
class Option:
    """One (method, budget) choice in one bin: its mean accuracy and mean tokens there."""

    method: str
    budget: int
    accuracy: float
    tokens: float


def agreement(answers: Sequence[Any], key: Callable[[Any], Hashable] | None = None) -> float:
    """The pilot's signal: the share of ``answers`` equal (by ``key``) to the most common
    non-None answer (a missing answer agrees with nothing; no answers: 0)."""
    if not answers:
        return 0.0
    votes = Counter(a if key is None else key(a) for a in answers if a is not None)
    return max(votes.values(), default=0) / len(answers)


def solve(options: Sequence[Sequence[Option]], weights: Sequence[float], token_budget: float,
          fixed_cost: float = 0.0) -> tuple[list[Option], float, float] | None:
    """The allocation (one option per bin) of the highest weighted accuracy whose weighted
    mean tokens plus ``fixed_cost`` stay within ``token_budget``; returns (options, accuracy,
    tokens), or None when no allocation fits. Exact (Pareto-front dynamic programming)."""
    front: list[tuple[float, float, tuple[Option, ...]]] = [(fixed_cost, 0.0, ())]
    for opts, w in zip(options, weights):
        grown = [(c + w * o.tokens, a + w * o.accuracy, chosen + (o,)) for c, a, chosen in front for o in opts]
        grown = [g for g in grown if g[0] <= token_budget + 1e-9]
        grown.sort(key=lambda g: (g[0], -g[1]))
        front, best = [], -np.inf
        for g in grown:        # cheapest first: keep those strictly more accurate than every cheaper one
            if g[1] > best + 1e-12:
                front.append(g)
                best = g[1]
        if not front:
            return None
    cost, acc, chosen = max(front, key=lambda g: (g[1], -g[0]))
    return list(chosen), acc, cost


def brute_force(options: Sequence[Sequence[Option]], weights: Sequence[float], token_budget: float,
                fixed_cost: float = 0.0) -> tuple[list[Option], float, float] | None:
    """``solve`` by enumerating every allocation (for tests; exponential in the bins)."""
    best = None
    for chosen in itertools.product(*options):
        cost = fixed_cost + sum(w * o.tokens for w, o in zip(weights, chosen))
        acc = sum(w * o.accuracy for w, o in zip(weights, chosen))
        if cost <= token_budget + 1e-9 and (best is None or (acc, -cost) > (best[1], -best[2])):
            best = (list(chosen), acc, cost)
    return best


def bin_edges(signals: Sequence[float], num_bins: int) -> list[float]:
    """Inner edges of at most ``num_bins`` quantile bins of ``signals``, each bin non-empty
    (bin b holds the signals in [edge_{b-1}, edge_b))."""
    values = np.asarray(signals, dtype=float)
    edges: list[float] = []
    for q in np.quantile(values, np.linspace(0, 1, num_bins + 1)[1:-1]):
        lower = edges[-1] if edges else -np.inf
        if np.any((values >= lower) & (values < q)):
            edges.append(float(q))
    return edges


def bin_of(signal: float, edges: Sequence[float]) -> int:
    """The bin of ``signal``: the number of edges at or below it (bin 0 = lowest signal)."""
    return int(np.searchsorted(np.asarray(edges), signal, side="right"))


@dataclass(frozen=True)
class Policy:
    """A compute-optimal policy: the pilot, the bin edges of its signal, a (method, budget)
    per bin, and what the validation run predicts (accuracy, mean tokens)."""

    pilot: tuple[str, int]
    edges: tuple[float, ...]
    choices: tuple[tuple[str, int], ...]
    token_budget: float
    expected_accuracy: float
    expected_tokens: float
    bin_shares: tuple[float, ...] = field(default=())

    def choice(self, signal: float) -> tuple[str, int]:
        return self.choices[bin_of(signal, self.edges)]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Policy:
        try:
            return cls(pilot=(str(data["pilot"][0]), int(data["pilot"][1])),
                       edges=tuple(float(e) for e in data["edges"]),
                       choices=tuple((str(m), int(n)) for m, n in data["choices"]),
                       token_budget=float(data["token_budget"]), expected_accuracy=float(data["expected_accuracy"]),
                       expected_tokens=float(data["expected_tokens"]),
                       bin_shares=tuple(float(s) for s in data.get("bin_shares", ())))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"not a compute-optimal policy ({e!r}); write one with `ppl-scaling allocate`") from None

    @classmethod
    def read(cls, path: str | Path) -> Policy:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"policy file {str(path)!r} does not exist; write one with "
                                    "`ppl-scaling allocate`") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"policy file {str(path)!r} is not JSON ({e.msg})") from None
        policy = cls.from_json(data)
        if len(policy.choices) != len(policy.edges) + 1:
            raise ValueError(f"policy file {str(path)!r} has {len(policy.choices)} choices for "
                             f"{len(policy.edges) + 1} bins")
        return policy


def _cost(row: dict[str, Any]) -> float:
    return float(row.get("tokens", 0)) + float(row.get("reward_tokens", 0))


def allocate(rows: Iterable[dict[str, Any]], token_budget: float, *, pilot: tuple[str, int] = PILOT,
             num_bins: int = 3) -> Policy:
    """The compute-optimal policy from the rows of a validation evaluation (module docstring):
    the ``pilot`` rows (method, budget) give each problem's signal (their ``agreement``),
    every other (method, budget) with a graded row for every problem is an option. Raises
    ``ValueError`` when the pilot is missing or no allocation fits the budget."""
    rows = [r for r in rows if r.get("correct") is not None]
    signal = {r["problem_id"]: float(r["agreement"]) for r in rows
              if (r["method"], int(r["budget"])) == tuple(pilot) and r.get("agreement") is not None}
    if not signal:
        raise ValueError(f"no graded rows of the pilot {pilot[0]} at budget {pilot[1]} with an agreement column; "
                         f"include it in the validation run (--methods {pilot[0]} --budgets {pilot[1]})")
    edges = bin_edges(list(signal.values()), num_bins)
    problems = sorted(signal)
    bins = {p: bin_of(signal[p], edges) for p in problems}
    B = len(edges) + 1
    weights = [sum(1 for p in problems if bins[p] == b) / len(problems) for b in range(B)]
    by_option: dict[tuple[str, int], dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        by_option[(r["method"], int(r["budget"]))][r["problem_id"]] = r
    pilot_cost = float(np.mean([_cost(by_option[tuple(pilot)][p]) for p in problems]))
    options: list[list[Option]] = [[] for _ in range(B)]
    for (method, budget), got in sorted(by_option.items()):
        if not all(p in got for p in problems):
            continue       # an option must be measured on every problem
        for b in range(B):
            members = [got[p] for p in problems if bins[p] == b]
            # choosing the pilot itself costs nothing more: its answer is used as it is
            tokens = 0.0 if (method, budget) == tuple(pilot) else float(np.mean([_cost(m) for m in members]))
            options[b].append(Option(method, budget, float(np.mean([m["correct"] for m in members])), tokens))
    best = solve(options, weights, token_budget, fixed_cost=pilot_cost)
    if best is None:
        cheapest = pilot_cost + sum(w * min(x.tokens for x in o) for o, w in zip(options, weights))
        raise ValueError(f"no allocation fits {token_budget:g} tokens per problem: the cheapest needs "
                         f"{cheapest:.0f} (the pilot alone {pilot_cost:.0f})")
    chosen, acc, cost = best
    return Policy(tuple(pilot), tuple(edges), tuple((o.method, o.budget) for o in chosen), float(token_budget),
                  acc, cost, tuple(weights))
