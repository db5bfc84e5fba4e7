"""Evaluation metrics and compute accounting.

- ``pass_at_k(n, c, k)``: the unbiased estimator 1 - C(n-c, k) / C(n, k) of the
  probability that at least one of k samples is correct, from n samples with c correct
  (Chen et al. 2021), computed as a stable product.
- ``coverage_curve``: mean pass@k over problems for several k.
- ``Compute``: additive counters (generated tokens, forward passes, reward calls,
  denoiser evaluations, wall time) so methods are compared at equal cost.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
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


@dataclass
class Compute:
    tokens: int = 0
    forward_passes: int = 0
    reward_calls: int = 0
    nfe: int = 0
    wall_s: float = 0.0

    def __add__(self, other: "Compute") -> "Compute":
        return Compute(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    @classmethod
    def from_counters(cls, counters: dict) -> "Compute":
        """Pick the known counters out of a ``result.compute`` dict (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in counters.items() if k in names})

    def as_dict(self) -> dict:
        return asdict(self)
