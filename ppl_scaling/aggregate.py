"""Final answer selection from a weighted population of generations.

Each function takes the particles' extracted ``answers`` (``None`` = no answer)
and, where it uses them, their log-weights or scores; answers are grouped by
``key(answer)`` (default: the stripped string), e.g. a math-equivalence
canonical form.

- ``argmax_weight``: the answer of the highest-weight particle.
- ``weighted_majority``: the answer whose particles carry the most total weight
  (the posterior mode of the answer under the SMC approximation).
- ``majority_vote``: the most frequent answer (self-consistency; weights ignored).
- ``best_of_majority``: among answers at least ``min_share`` of the votes, the
  one whose best particle scores highest.
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


def best_of_majority(answers: Sequence[Any], scores: Sequence[float], min_share: float = 0.2,
                     key: Key = _default_key) -> Any:
    s = np.asarray(scores, dtype=np.float64)
    groups = _groups(answers, key)
    if not groups:
        return None
    total = sum(len(idx) for idx in groups.values())
    frequent = [idx for idx in groups.values() if len(idx) >= min_share * total] or [max(groups.values(), key=len)]
    best = max(frequent, key=lambda idx: s[idx].max())
    return answers[best[int(np.argmax(s[best]))]]


SELECTORS = {
    "argmax_weight": argmax_weight,
    "weighted_majority": weighted_majority,
    "majority_vote": majority_vote,
    "best_of_majority": best_of_majority,
}
