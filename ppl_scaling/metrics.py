"""Evaluation metrics.

- ``pass_at_k(n, c, k)``: the unbiased estimator 1 - C(n-c, k) / C(n, k) of the
  probability that at least one of k samples is correct, from n samples with c correct
  (Chen et al. 2021), computed as a stable product.
- ``coverage_curve``: mean pass@k over problems for several k.

Compute is accounted by ``ppl_scaling.ledger``.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


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
