"""Stop rules: end a run early, so that the particles still generating cost nothing more.

A stop rule is a function of the engine's state, ``stop(state: SMCState) -> bool``, checked
after every step (``SMC(..., stop=rule)``, and the ``stop=`` option of the samplers that
take one); once it holds, no further step runs: unfinished particles stay as they are
(their answers are usually None) and the tokens they would have spent are saved.

    FinishedCount(k)                  k particles have finished (first-finish search: k = 1)
    AnswerSettled(extract)            the majority answer of the finished particles can no longer
                                      change, whatever the unfinished ones answer (exact)
    AnswerSettled(extract, confidence=0.95)
                                      Adaptive-Consistency's Beta criterion (Aggarwal et al. 2023):
                                      P(p_lead > p_second | votes) >= 0.95
    TokenBudget(4096)                 generated + reward tokens spent reach the budget
    any_of(rule, ...)                 the first rule that holds

**The exact vote rule.** With v_1 >= v_2 the votes of the two leading answers among the
finished particles and u unfinished particles, the final majority vote is the current
leader whatever the u particles answer iff v_1 - v_2 > u (a tie is not settled: the
majority rule's tie-break could change). Stopping then returns the answer the full run
would have returned, with fewer tokens.

**The Beta rule.** Under a uniform prior on the two leading answers' shares, the posterior
probability that the leader is ahead is P(X > 1/2), X ~ Beta(v_1 + 1, v_2 + 1), which for
integer counts is the binomial tail P(Bin(v_1 + v_2 + 1, 1/2) <= v_1) (Aggarwal et al.'s
stopping criterion; no guarantee, fewer samples).
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np

__all__ = ["FinishedCount", "AnswerSettled", "TokenBudget", "any_of", "beta_lead_probability"]


class FinishedCount:
    """Stop once at least ``k`` particles have finished."""

    def __init__(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        self.k = int(k)

    def __call__(self, state: Any) -> bool:
        return int(np.sum(state.done)) >= self.k

    def __repr__(self) -> str:
        return f"FinishedCount({self.k})"


def beta_lead_probability(v1: int, v2: int) -> float:
    """P(X > 1/2) for X ~ Beta(v1 + 1, v2 + 1) = P(Bin(v1 + v2 + 1, 1/2) <= v1)."""
    n = v1 + v2 + 1
    return sum(math.comb(n, j) for j in range(v1 + 1)) / 2.0 ** n


class AnswerSettled:
    """Stop once the finished particles' majority answer is settled (module docstring).

    ``extract(completion) -> answer or None`` reads the answer of a finished particle
    (``state.particles.partials()``); ``key`` groups equivalent answers (default: the
    answer itself). ``confidence``: None for the exact rule, else the Beta criterion's
    threshold in (0.5, 1). ``min_votes``: answers needed before stopping at all.
    """

    def __init__(self, extract: Callable[[str], Any], *, key: Callable[[Any], Hashable] | None = None,
                 confidence: float | None = None, min_votes: int = 1) -> None:
        if confidence is not None and not 0.5 < confidence < 1.0:
            raise ValueError(f"confidence must be in (0.5, 1) (or None: the exact rule), got {confidence!r}")
        self.extract, self.key, self.confidence, self.min_votes = extract, key, confidence, int(min_votes)
        self._answers: dict[str, Any] = {}   # completion -> answer: a finished particle is read once

    def votes(self, state: Any) -> tuple[Counter, int]:
        """Votes per answer key among the finished particles, and the number unfinished."""
        votes: Counter = Counter()
        unfinished = 0
        for p in state.particles.partials():
            if not p.finished:
                unfinished += 1
                continue
            if p.completion not in self._answers:
                self._answers[p.completion] = self.extract(p.completion)
            answer = self._answers[p.completion]
            if answer is not None:
                votes[answer if self.key is None else self.key(answer)] += 1
        return votes, unfinished

    def __call__(self, state: Any) -> bool:
        votes, unfinished = self.votes(state)
        if sum(votes.values()) < self.min_votes:
            return False
        top = votes.most_common(2) + [(None, 0)]
        v1, v2 = top[0][1], top[1][1]
        if self.confidence is None:
            return v1 - v2 > unfinished
        return beta_lead_probability(v1, v2) >= self.confidence

    def __repr__(self) -> str:
        return f"AnswerSettled(confidence={self.confidence})"


class TokenBudget:
    """Stop once the run has spent ``tokens`` tokens: generated plus, with
    ``count_reward``, the reward model's (the ledger's ``tokens + reward_tokens``)."""

    def __init__(self, tokens: int, *, count_reward: bool = True) -> None:
        if isinstance(tokens, bool) or not isinstance(tokens, (int, np.integer)) or tokens < 1:
            raise ValueError(f"the token budget must be a positive integer, got {tokens!r}")
        self.tokens, self.count_reward = int(tokens), count_reward

    def spent(self, state: Any) -> int:
        ledger = state.ledger
        return int(ledger.tokens + (ledger.reward_tokens if self.count_reward else 0))

    def __call__(self, state: Any) -> bool:
        return self.spent(state) >= self.tokens

    def __repr__(self) -> str:
        return f"TokenBudget({self.tokens})"


def any_of(*rules: Callable[[Any], bool] | None) -> Callable[[Any], bool] | None:
    """A rule that holds when any of ``rules`` does (None entries are ignored; no rule: None)."""
    rules = tuple(r for r in rules if r is not None)
    if not rules:
        return None
    if len(rules) == 1:
        return rules[0]
    return lambda state: any(rule(state) for rule in rules)
