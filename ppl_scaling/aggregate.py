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

Group rule: ``group_vote`` (the multi-temperature vote of "On the Role of Temperature Sampling in
Test-Time Scaling"): a majority vote within each group of samples (those drawn at one
temperature), then across groups, each group voting for its winner; ties go to the answer with
the most samples overall, then to the first position.

Path rules (they read each candidate's model log-probability log p(x) and its token path,
so that duplicate paths count once):

- ``perplexity_consistency``: Perplexity Consistency ("A Theoretical Study on Bridging Internal
  Probability and Self-Consistency for LLM Reasoning", NeurIPS 2025): the answer a with the
  largest Σ p(x) over the *distinct* sampled paths x with answer a. With N draws from q,
  E[score(a)] = Σ_{x -> a} p(x) (1 - (1 - q(x))^N), which tends to p(a) exponentially fast in N.
- ``rpc``: the same after Reasoning Pruning (``reasoning_pruning``): a two-component Weibull
  mixture is fitted to the N path probabilities and a path is dropped when it belongs more to
  the low-mean component and its probability is below the mean (the paper's rule).

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


def _weibull_mixture_memberships(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-likelihood fit of w Weib(k1, l1) + (1 - w) Weib(k2, l2) to ``x`` > 0 (L-BFGS-B from
    the paper's start (0.5, 1, 1, 1.5, 2), w in [0.2, 0.8], shapes and scales >= 0.01); returns the
    posterior memberships (high-mean component, low-mean component) of each point."""
    from scipy.optimize import minimize   # scipy comes with arviz; only this rule needs it
    from scipy.special import gamma

    def pdf(k: float, lam: float) -> np.ndarray:
        return (k / lam) * (x / lam) ** (k - 1) * np.exp(-((x / lam) ** k))

    def nll(theta: np.ndarray) -> float:
        w, k1, l1, k2, l2 = theta
        with np.errstate(all="ignore"):
            dens = w * pdf(k1, l1) + (1 - w) * pdf(k2, l2)
        return float(-np.sum(np.log(np.maximum(np.nan_to_num(dens), 1e-300))))

    bounds = [(0.2, 0.8), (0.01, None), (0.01, None), (0.01, None), (0.01, None)]
    w, k1, l1, k2, l2 = minimize(nll, np.array([0.5, 1.0, 1.0, 1.5, 2.0]), bounds=bounds, method="L-BFGS-B").x
    if l1 * gamma(1 + 1 / k1) < l2 * gamma(1 + 1 / k2):   # component 1: the high-mean one
        w, k1, l1, k2, l2 = 1 - w, k2, l2, k1, l1
    with np.errstate(all="ignore"):
        a, b = w * pdf(k1, l1), (1 - w) * pdf(k2, l2)
    total = np.where(a + b > 0, a + b, 1.0)
    return a / total, b / total


def reasoning_pruning(log_probs: Sequence[float]) -> np.ndarray:
    """RPC's Reasoning Pruning: a keep-mask over paths of log-probabilities ``log_probs``. The
    probabilities p_i, divided by their maximum (the Weibull mixture is a scale family, so the
    memberships do not depend on the unit), are fitted by a two-component Weibull mixture; path
    i is pruned when its membership of the low-mean component exceeds that of the high-mean one
    and p_i < mean(p). The most probable path is never pruned; fewer than 3 paths, or paths of
    equal probability, are all kept."""
    lp = np.asarray(log_probs, dtype=np.float64)
    if lp.size < 3 or not np.isfinite(lp.max()) or np.all(lp == lp.max()):
        return np.ones(lp.shape, dtype=bool)
    p = np.exp(lp - lp.max())
    high, low = _weibull_mixture_memberships(np.maximum(p, 1e-300))
    return ~((low > high) & (p < p.mean()))


def perplexity_consistency_scores(answers: Sequence[Any], log_probs: Sequence[float], paths: Sequence[Hashable],
                                  *, prune: bool = False, key: Key = _default_key) -> dict[Hashable, float]:
    """{answer key: Σ p(x) over the distinct paths x (by ``paths[i]``) with that answer} (module
    docstring), after ``reasoning_pruning`` when ``prune``; paths without an answer are left out."""
    lp = np.asarray(log_probs, dtype=np.float64)
    if lp.shape != (len(answers),) or len(paths) != len(answers):
        raise ValueError(f"got {lp.size} log-probabilities and {len(paths)} paths for {len(answers)} answers")
    keep = reasoning_pruning(lp) if prune else np.ones(lp.shape, dtype=bool)
    seen: dict[Hashable, float] = {}
    for a, path, logp, kept in zip(answers, paths, lp, keep):
        if a is not None and kept:
            seen[(key(a), path)] = float(np.exp(logp))
    scores: dict[Hashable, float] = {}
    for (k, _), p in seen.items():
        scores[k] = scores.get(k, 0.0) + p
    return scores


def perplexity_consistency(answers: Sequence[Any], log_probs: Sequence[float], paths: Sequence[Hashable], *,
                           prune: bool = False, key: Key = _default_key) -> Any:
    """The answer of largest ``perplexity_consistency_scores`` (ties: the most samples, then the
    first position), shown by its first sample; None when no path has an answer. ``prune=True``
    is RPC."""
    scores = perplexity_consistency_scores(answers, log_probs, paths, prune=prune, key=key)
    groups = _groups(answers, key)
    if not scores:
        return None
    best = max(scores, key=lambda k: (scores[k], len(groups[k]), -groups[k][0]))
    return answers[groups[best][0]]


def rpc(answers: Sequence[Any], log_probs: Sequence[float], paths: Sequence[Hashable],
        key: Key = _default_key) -> Any:
    """RPC: Perplexity Consistency over the paths kept by Reasoning Pruning."""
    return perplexity_consistency(answers, log_probs, paths, prune=True, key=key)


PATH_RULES = ("perplexity_consistency", "rpc")


def group_vote(answers: Sequence[Any], groups: Sequence[Hashable], key: Key = _default_key) -> Any:
    """Majority vote within each group (``groups[i]``: the group of sample i), then across the
    groups' winners (module docstring); None when no sample has an answer."""
    if len(groups) != len(answers):
        raise ValueError(f"got {len(groups)} group labels for {len(answers)} answers")
    everyone = _groups(answers, key)
    wins: dict[Hashable, int] = defaultdict(int)
    for g in dict.fromkeys(groups):
        mine = [i for i, h in enumerate(groups) if h == g]
        winner = majority_vote([answers[i] for i in mine], key=key)
        if winner is not None:
            wins[key(winner)] += 1
    if not wins:
        return None
    best = max(wins, key=lambda k: (wins[k], len(everyone[k]), -everyone[k][0]))
    return answers[everyone[best][0]]


SELECTORS = {
    "argmax_weight": argmax_weight,
    "weighted_majority": weighted_majority,
    "majority_vote": majority_vote,
    "best_of_majority": best_of_majority,
}
