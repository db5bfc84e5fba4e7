"""Evaluation metrics.

- ``pass_at_k(n, c, k)``: the unbiased estimator 1 - C(n-c, k) / C(n, k) of the
  probability that at least one of k samples is correct, from n samples with c correct
  (Chen et al. 2021), computed as a stable product.
- ``coverage_curve``: mean pass@k over problems for several k.
- ``rejection_sampling_accuracy``, ``rejection_sampling_attempts``: closed forms of sampling
  until an imperfect verifier accepts (Stroebl et al. 2024, "Inference Scaling fLaws"), for
  ``samplers/rejection_sampling.py``; ``cascade_rates``: the TPR / FPR and escalation rate of
  a two-tier verification cascade (``samplers/verify_cascade.py``); ``majority_verdict_rate``:
  the acceptance rate of a majority of k sampled verdicts (``samplers/verifier_scaling.py``).

Compute is accounted by ``ppl_scaling.ledger``.
"""
from __future__ import annotations

from math import comb
from typing import Iterable, Sequence

import numpy as np
from numpy.typing import ArrayLike


def pass_at_k(n: int, c: int, k: int) -> float:
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def coverage_curve(num_samples: Sequence[int], num_correct: Sequence[int], ks: Iterable[int]) -> dict[int, float]:
    """Mean pass@k over problems, for each k in ``ks``."""
    return {k: float(np.mean([pass_at_k(n, c, k) for n, c in zip(num_samples, num_correct)])) for k in ks}


def _attempt_rates(p: ArrayLike, tpr: ArrayLike, fpr: ArrayLike) -> tuple[np.ndarray, ...]:
    """a = p TPR (accepted, correct), b = (1 - p) FPR (accepted, wrong), r = 1 - a - b (rejected)."""
    p, tpr, fpr = (np.asarray(v, dtype=np.float64) for v in (p, tpr, fpr))
    for name, v in (("p", p), ("tpr", tpr), ("fpr", fpr)):
        if np.any((v < 0) | (v > 1)) or np.any(np.isnan(v)):
            raise ValueError(f"{name} must be a probability in [0, 1], got {v}")
    a, b = p * tpr, (1 - p) * fpr
    return p, tpr, fpr, a, b, 1 - a - b


def _geometric(r: np.ndarray, k: int) -> np.ndarray:
    """S_k = Σ_{i<k} r^i, the expected number of attempts made, exactly (also at r = 1)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (the number of attempts) must be a positive integer, got {k!r}")
    return np.sum(np.asarray(r)[..., None] ** np.arange(int(k)), axis=-1)


def rejection_sampling_accuracy(p: ArrayLike, tpr: ArrayLike, fpr: ArrayLike, k: int, *,
                                fallback: str = "last", penalty: float = 0.0) -> np.ndarray:
    """Expected utility of sampling until the verifier accepts, at most ``k`` attempts.

    Attempt i is correct w.p. ``p`` and accepted w.p. ``tpr`` if correct, ``fpr`` if not,
    independently across attempts: a = p TPR, b = (1-p) FPR, r = 1 - a - b, S_k = Σ_{i<k} r^i.
    The first accepted attempt is submitted: correct w.p. a S_k, a false positive w.p. b S_k.
    If none is accepted (w.p. r^k), ``fallback`` "abstain" submits nothing and "last" the
    k-th attempt, correct w.p. r^(k-1) p (1 - TPR). Returns P(correct) - ``penalty`` *
    P(wrong answer submitted) (penalty 0: the accuracy). As k -> inf the accuracy tends to
    a / (a + b), below 1 whenever FPR > 0: resampling cannot remove false positives.
    Vectorised over ``p``, ``tpr``, ``fpr`` (e.g. per problem; average for a task).
    """
    if fallback not in ("last", "abstain"):
        raise ValueError(f"fallback must be 'last' or 'abstain', got {fallback!r}")
    p, tpr, fpr, a, b, r = _attempt_rates(p, tpr, fpr)
    S = _geometric(r, k)
    correct, wrong = a * S, b * S
    if fallback == "last":
        tail = r ** (k - 1)
        correct, wrong = correct + tail * p * (1 - tpr), wrong + tail * (1 - p) * (1 - fpr)
    return correct - penalty * wrong


def rejection_sampling_attempts(p: ArrayLike, tpr: ArrayLike, fpr: ArrayLike, k: int) -> np.ndarray:
    """Expected number of attempts (generations, verifications) of that procedure: S_k = Σ_{i<k} r^i."""
    return _geometric(_attempt_rates(p, tpr, fpr)[-1], k)


def cascade_rates(p: ArrayLike, accept: tuple[float, float], unsure: tuple[float, float],
                  expensive: tuple[float, float]) -> dict[str, np.ndarray]:
    """A two-tier verification cascade as one verifier.

    The cheap tier accepts outright w.p. ``accept`` = (for a correct, for a wrong attempt),
    is unsure w.p. ``unsure`` (same order) and then defers to the expensive tier with
    (TPR_e, FPR_e) = ``expensive``, else rejects. So TPR = accept_1 + unsure_1 TPR_e,
    FPR = accept_0 + unsure_0 FPR_e, and the share of verifications escalated is
    P(unsure) = p unsure_1 + (1 - p) unsure_0 (per attempt; by Wald's identity also the
    ratio of expected escalations to expected verifications when sampling stops at the
    first acceptance). Returns {"tpr", "fpr", "escalation"}.
    """
    p = np.asarray(p, dtype=np.float64)
    (h1, h0), (u1, u0), (te, fe) = accept, unsure, expensive
    if h1 + u1 > 1 or h0 + u0 > 1:
        raise ValueError(f"accept + unsure must be at most 1 for correct and wrong attempts, got {accept}, {unsure}")
    return {"tpr": np.asarray(h1 + u1 * te), "fpr": np.asarray(h0 + u0 * fe),
            "escalation": p * u1 + (1 - p) * u0}


def majority_verdict_rate(rate: ArrayLike, k: int) -> np.ndarray:
    """P(a strict majority of ``k`` independent verdicts, each "yes" w.p. ``rate``, says yes)
    = P(Binomial(k, rate) > k / 2): with ``rate`` the per-verdict TPR (FPR) of a sampled
    verifier, the TPR (FPR) of its k-vote (ties reject)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (the number of verdicts) must be a positive integer, got {k!r}")
    q = np.asarray(rate, dtype=np.float64)
    return sum(comb(k, j) * q ** j * (1 - q) ** (k - j) for j in range(k // 2 + 1, k + 1))
