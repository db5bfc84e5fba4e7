"""FK potential shapes: how intermediate rewards r_t become potentials G_t.

Target: p(x) exp(lam * r(x)) for the final state x. Intermediate rewards r_t
(of a partial LLM output, or of a diffusion model's x0 prediction) guide the
particles on the way. A *shape* fixes the intermediate potentials
(Singhal et al. 2025, "FK steering"; names of their code in brackets):

    difference [diff]  G_t = exp(lam (r_t - r_{t-1}))          (r_{-1} = 0)
    max        [max]   G_t = exp(lam max_{s<=t} r_s)
    sum        [add]   G_t = exp(lam Σ_{s<=t} r_s)
    last       [rt]    G_t = exp(lam r_t)

and every shape ends with the terminal correction G_final = exp(lam r_final) / Π_{s<final} G_s,
so the product of all potentials is exactly exp(lam r_final) and the final target
is the tilted one. ``lam = 0`` keeps the support and nothing else: G_t = 1 where the
reward is finite and 0 where it is -inf (the same rule as ``Potential.tempered(0)``; pass
no potential at all for the untilted base). ``difference`` telescopes: its intermediate target at every step
is p(x_{0:t}) exp(lam r_t), so it is exact for any N. ``max``, ``sum`` and ``last``
over-tilt the intermediate targets and rely on the final correction: consistent
as N -> inf, biased at finite N.

Per-particle bookkeeping lives in a dict of arrays carried in the particle state
(so that resampling reindexes it); ``ppl_scaling.tilt.Tilted`` does this for any
dynamics. Rewards reach ``step`` already validated (``Potential.score``)::

    shape = FKShape("difference", lam=2.0)
    acc = shape.init(N)
    logG, acc = shape.step(acc, rewards, final=done_mask)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("difference", "max", "sum", "last")


@dataclass(frozen=True)
class FKShape:
    name: str = "difference"
    lam: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in SHAPES:
            raise ValueError(f"unknown potential shape {self.name!r}; choose one of {SHAPES}")
        if not (np.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"lam must be finite and >= 0, got {self.lam}")

    def init(self, N: int) -> dict[str, np.ndarray]:
        """Accumulators: ``stat`` (previous reward, running max or running sum) and
        ``log_prod`` (log of the product of the potentials so far)."""
        stat = np.full(N, -np.inf) if self.name == "max" else np.zeros(N)
        return {"stat": stat, "log_prod": np.zeros(N)}

    def step(self, acc: dict[str, np.ndarray], r: np.ndarray,
             final: np.ndarray | bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Potential of this step for rewards ``r`` (N,); ``final`` marks particles
        whose reward is the final one (terminal correction)."""
        final = np.broadcast_to(np.asarray(final, dtype=bool), r.shape)
        stat, log_prod = acc["stat"], acc["log_prod"]
        if self.name == "difference":
            new_stat = r
        elif self.name == "max":
            new_stat = np.maximum(stat, r)
        elif self.name == "sum":
            new_stat = stat + r
        else:  # last
            new_stat = r
        if self.lam == 0.0:  # the support only: a rejection (-inf) is final
            logG = np.where(np.isneginf(r) & ~np.isneginf(log_prod), -np.inf, 0.0)
        else:
            with np.errstate(invalid="ignore"):
                if self.name == "difference":
                    inter = self.lam * (r - stat)
                else:
                    inter = self.lam * new_stat
                logG = np.where(final, self.lam * r - log_prod, inter)
            # A particle rejected once (-inf) stays rejected; never -inf + inf = NaN.
            logG = np.where(np.isneginf(log_prod) | np.isnan(logG), -np.inf, logG)
        return logG, {"stat": new_stat, "log_prod": log_prod + logG}
