"""Final answer selection from a weighted population of generations.

Each function takes the particles' extracted ``answers`` (``None`` = no answer)
and, where it uses them, their log-weights or scores; answers are grouped by
``key(answer)`` (default: the stripped string), e.g. a math-equivalence
canonical form.

- ``argmax_weight``: the answer of the highest-weight particle.
- ``weighted_majority``: the answer whose particles carry the most total weight
  (the posterior mode of the answer under the SMC approximation).
- ``majority_vote``: the most frequent answer (self-consistency; weights ignored).
- ``best_of_majority``: Best-of-Majority (Di et al. 2025, "Best-of-Majority:
  Minimax-Optimal Strategy for Pass@k Inference Scaling"): keep the answers whose
  frequency among the N samples is at least the threshold ``min_share`` (the paper's
  alpha: count >= min_share * N, N counting the samples with an answer), then submit
  the ``k`` of them whose best sample has the highest reward. If no answer reaches the
  threshold, the most frequent one is the only candidate; if fewer than ``k`` reach it,
  fewer are submitted (the paper's rule). ``k = 1`` (the default) returns the answer
  itself; ``k = None`` or an integer through ``top_k`` returns the list of submissions.

Pass@k rules: ``top_k(rule, answers, scores, k)`` lists up to ``k`` distinct answers
(by ``key``), best first: ``argmax_reward`` (Best-of-N: distinct answers by their
best sample's reward), ``majority_vote`` (by frequency), ``best_of_majority`` (above).
Ties are broken by the first sample's position. ``pass_at_k_rules`` applies them to
candidates with known correctness, for pass@k of every rule.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Hashable, Sequence

import numpy as np

from .weights import normalise

Key = Callable[[Any], Hashable]


def _default_key(answer: Any) -> Hashable:
    return str(answer).strip()


def _groups(answers: Sequence[Any], key: Key) -> dict[Hashable, list[int]]:
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for i, a in enumerate(answers):
        if a is not None:
            groups[key(a)].append(i)
    return groups


def argmax_weight(answers: Sequence[Any], log_weights: Sequence[float]) -> Any:
    lw = np.asarray(log_weights, dtype=np.float64)
    valid = [i for i, a in enumerate(answers) if a is not None]
    return answers[max(valid, key=lambda i: lw[i])] if valid else None


def weighted_majority(answers: Sequence[Any], log_weights: Sequence[float], key: Key = _default_key) -> Any:
    lw = np.asarray(log_weights, dtype=np.float64)
    groups = _groups(answers, key)
    if not groups:
        return None
    W = normalise(lw) if np.isfinite(lw.max()) else np.ones_like(lw) / len(lw)
    best = max(groups.values(), key=lambda idx: (W[idx].sum(), len(idx)))
    return answers[best[0]]


def majority_vote(answers: Sequence[Any], key: Key = _default_key) -> Any:
    groups = _groups(answers, key)
    if not groups:
        return None
    return answers[max(groups.values(), key=len)[0]]


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (the number of submissions) must be a positive integer, got {k!r}")
    return int(k)


def _by_reward(groups: list[list[int]], s: np.ndarray) -> list[list[int]]:
    """Groups by their best sample's score, highest first (ties: first position first)."""
    return sorted(groups, key=lambda idx: (-float(s[idx].max()), idx[0]))


def _representative(answers: Sequence[Any], idx: list[int], s: np.ndarray | None) -> Any:
    return answers[idx[0] if s is None else idx[int(np.argmax(s[idx]))]]


def best_of_majority_k(answers: Sequence[Any], scores: Sequence[float], k: int, min_share: float = 0.2,
                       key: Key = _default_key) -> list[Any]:
    """Best-of-Majority with ``k`` submissions (module docstring): up to ``k`` distinct
    answers, best first, each shown by its highest-scoring sample."""
    k = _check_k(k)
    if not 0.0 <= float(min_share) <= 1.0:
        raise ValueError(f"min_share (the frequency threshold) must be in [0, 1], got {min_share!r}")
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (len(answers),):
        raise ValueError(f"got {s.size} scores for {len(answers)} answers")
    groups = _groups(answers, key)
    if not groups:
        return []
    total = sum(len(idx) for idx in groups.values())
    frequent = [idx for idx in groups.values() if len(idx) >= min_share * total]
    if not frequent:
        frequent = [max(groups.values(), key=len)]
    return [_representative(answers, idx, s) for idx in _by_reward(frequent, s)[:k]]


def best_of_majority(answers: Sequence[Any], scores: Sequence[float], min_share: float = 0.2,
                     key: Key = _default_key) -> Any:
    """Best-of-Majority with one submission: among the answers with at least ``min_share``
    of the votes, the one whose best sample scores highest (None: no answer)."""
    picked = best_of_majority_k(answers, scores, 1, min_share, key)
    return picked[0] if picked else None


def top_k(rule: str, answers: Sequence[Any], scores: Sequence[float] | None, k: int, *,
          min_share: float = 0.2, key: Key = _default_key) -> list[Any]:
    """Up to ``k`` distinct answers submitted by ``rule`` (``argmax_reward``, ``majority_vote``,
    ``best_of_majority``), best first; ``scores`` are the rewards (unused by the majority vote)."""
    k = _check_k(k)
    if rule == "best_of_majority":
        return best_of_majority_k(answers, scores, k, min_share, key)
    groups = list(_groups(answers, key).values())
    if rule == "majority_vote":
        ranked = sorted(groups, key=lambda idx: (-len(idx), idx[0]))
        return [answers[idx[0]] for idx in ranked[:k]]
    if rule == "argmax_reward":
        s = np.asarray(scores, dtype=np.float64)
        if s.shape != (len(answers),):
            raise ValueError(f"got {s.size} scores for {len(answers)} answers")
        return [_representative(answers, idx, s) for idx in _by_reward(groups, s)[:k]]
    raise ValueError(f"top_k knows the rules {sorted(TOP_K_RULES)}, got {rule!r}")


TOP_K_RULES = ("argmax_reward", "majority_vote", "best_of_majority")


def pass_at_k_rules(answers: Sequence[Any], correct: Sequence[bool], scores: Sequence[float] | None,
                    ks: Sequence[int], *, min_share: float = 0.2, key: Key = _default_key,
                    rules: Sequence[str] = TOP_K_RULES) -> dict[str, dict[int, bool | None]]:
    """{rule: {k: whether one of the rule's top-k submissions is correct}} from candidates
    whose correctness is known (``correct[i]`` of ``answers[i]``; equivalent answers, by
    ``key``, must agree). Rules that read rewards get None without ``scores``."""
    if len(correct) != len(answers):
        raise ValueError(f"got {len(correct)} correctness flags for {len(answers)} answers")
    hit = {key(a): bool(c) for a, c in zip(answers, correct) if a is not None}
    out: dict[str, dict[int, bool | None]] = {}
    for rule in rules:
        if rule != "majority_vote" and scores is None:
            out[rule] = {int(k): None for k in ks}
            continue
        out[rule] = {int(k): any(hit[key(a)] for a in top_k(rule, answers, scores, k, min_share=min_share, key=key))
                     for k in ks}
    return out


SELECTORS = {
    "argmax_weight": argmax_weight,
    "weighted_majority": weighted_majority,
    "majority_vote": majority_vote,
    "best_of_majority": best_of_majority,
}
