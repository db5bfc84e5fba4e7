"""Search over the noise of a diffusion sampler (Ma et al. 2025, "Inference-time scaling for
diffusion models beyond scaling denoising steps").

    random_search(model, N)        N independent samples (N initial noises), keep the best by
                                   reward: ``best_of_n`` on the diffusion model
    zero_order_search(model, M)    from a pivot noise n, each round tries M noises
                                   sqrt(1 - s²) n + s ξ (ξ ~ N(0, I), s = ``step_size``), denoises
                                   them, and moves the pivot to the best if it beats the incumbent
    search_over_paths(model, N)    denoise N paths to level ``start``; each round re-noises every
                                   kept path M = ``num_branches`` times from level i to i - ``forward``
                                   (a draw of q(x_j | x_i)), denoises ``backward`` levels (> forward)
                                   and keeps the N best by the reward of the x0 prediction; until
                                   the clean level K. A greedy beam search over denoising paths.

Meant for a deterministic sampler (DDIM with eta = 0; build the model with
``allow_deterministic=True``), where the sample is a function of the noise; any sampler works.

All three run on the SMC engine. The search rounds are the steps of an FK model
(``ZeroOrderDynamics``, ``PathSearchDynamics``) tilted by the potential with the
``difference`` shape at lam = 1, so a slot's score (its log-weight) is its current reward,
and a selection keeps the best: ``Groups`` (zero-order: one group of M + 1 slots, slot 0
holding the incumbent, which wins ties) and ``Beam`` (paths: N * M slots, the best N
expanded M ways). Step 0 (the initial noises or paths) is not scored. There is no evidence
estimate; ``best`` = argmax weight = the highest reward found.

Budgets, with K the model's scheduler steps: random search N * K denoiser evaluations and N
reward calls; zero-order search K (1 + rounds * M) evaluations and rounds * (M + 1) reward
calls (the incumbent is re-scored each round; a potential is deterministic); search over
paths N * start evaluations, then per round at most N * M * (backward + 1) (the + 1: the x0
prediction scored at a level < K) and N * M reward calls.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ppl_scaling.fk import Dynamics
from ppl_scaling.result import SMCResult
from ppl_scaling.rng import as_generator, torch_generator
from ppl_scaling.selection import Beam, Groups, Selection
from ppl_scaling.smc import SMC
from ppl_scaling.state import take, where
from ppl_scaling.tilt import Tilted

from .best_of_n import best_of_n

__all__ = ["random_search", "zero_order_search", "search_over_paths", "ZeroOrderDynamics",
           "PathSearchDynamics", "SearchState", "METHODS"]


@dataclass(frozen=True, eq=False)
class SearchState:
    """Slots of a noise search: the latents ``x`` at the slot's level (None: not denoised yet),
    the x0 prediction ``x0`` at it (the sample itself when clean) and the initial ``noise``."""

    x: Any
    x0: Any = None
    noise: Any = None

    @property
    def num_particles(self) -> int:
        return int((self.noise if self.x is None else self.x).shape[0])

    def take(self, idx: np.ndarray) -> SearchState:
        return SearchState(*(None if v is None else take(v, idx) for v in (self.x, self.x0, self.noise)))


def _check_model(model: Any) -> Any:
    """The model's ``ReverseProcess`` (``model`` must be a ``DiffusionModel`` without ``cond``)."""
    if not hasattr(model, "process") or not hasattr(model, "readable"):
        raise TypeError(f"noise search runs on a ppl_scaling.diffusion.DiffusionModel, got {type(model).__name__}")
    if getattr(model, "cond", None) is not None:
        raise ValueError("noise search does not support per-particle cond; build the model without it")
    return model.process


class ZeroOrderDynamics(Dynamics):
    """Zero-order search as dynamics: T = rounds + 1 steps over one group of N = M + 1 slots.
    t = 0: every slot holds the pivot noise (and its sample when there are no rounds); round t >= 1: slot 0 keeps the incumbent (its
    noise and sample; denoised at t = 1), slots 1..M denoise sqrt(1 - s²) n + s ξ_j around the
    incumbent's noise n. What a potential reads: the decoded samples."""

    def __init__(self, model: Any, rounds: int, step_size: float) -> None:
        if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 0:
            raise ValueError(f"rounds must be a non-negative integer, got {rounds!r}")
        if not 0.0 < step_size <= 1.0:
            raise ValueError(f"step_size must be in (0, 1], got {step_size}")
        self.model, self.process = model, _check_model(model)
        self.T = int(rounds) + 1
        self.step_size = float(step_size)

    def M0(self, N: int, rng: np.random.Generator) -> SearchState:
        self.process.start()
        pivot = self.process.noise(1, torch_generator(rng, self.process.device.type))
        copies = np.zeros(N, dtype=np.int64)
        if self.T > 1:
            return SearchState(None, None, take(pivot, copies))
        x = take(self.process.run(pivot, 0, self.process.K, rng), copies)  # no rounds: the pivot's sample
        return SearchState(x, x, take(pivot, copies))

    def M(self, t: int, xp: SearchState, rng: np.random.Generator) -> SearchState:
        N, s = xp.num_particles, self.step_size
        incumbent = np.arange(N) == 0
        xi = self.process.noise(N, torch_generator(rng, self.process.device.type))
        noise = where(incumbent, xp.noise, np.sqrt(1.0 - s * s) * xp.noise + s * xi)
        if xp.x is None:  # round 1 denoises the pivot too
            x = self.process.run(noise, 0, self.process.K, rng)
        else:
            fresh = self.process.run(take(noise, np.arange(1, N)), 0, self.process.K, rng)
            x = where(incumbent, xp.x, take(fresh, np.maximum(np.arange(N) - 1, 0)))
        return SearchState(x, x, noise)

    def view(self, t: int, x: SearchState) -> Any:
        return self.model.readable(x.x)

    def rewards(self, t: int, x: SearchState, rows: np.ndarray, finished: np.ndarray, tilt: Any,
                rng: np.random.Generator) -> np.ndarray:
        """Every round's slots hold finished samples: the potential's ``complete`` log-values."""
        return tilt.potential.score(self.view(t, x.take(rows)), True)


class PathSearchDynamics(Dynamics):
    """Search over paths as dynamics, over N * M slots (module docstring). Step t holds paths at
    level ``levels[t]``: levels[0] = start, levels[t] = min(levels[t-1] - forward + backward, K).
    t = 0: N paths denoised to ``start``, tiled M times (the copies weigh 0, logG = -inf, so the
    first beam keeps the N distinct paths). What a potential reads: the decoded x0 predictions
    (the samples at level K)."""

    def __init__(self, model: Any, num_paths: int, start: int, backward: int, forward: int) -> None:
        self.model, self.process = model, _check_model(model)
        K = self.process.K
        if not 0 <= forward < backward:
            raise ValueError(f"need 0 <= forward < backward, got forward={forward}, backward={backward}")
        if not forward <= start <= K:
            raise ValueError(f"start must be in [forward, K] = [{forward}, {K}], got {start}")
        self.num_paths, self.forward = int(num_paths), int(forward)
        self.levels = [int(start)]
        while self.levels[-1] < K:
            self.levels.append(min(self.levels[-1] - self.forward + int(backward), K))
        self.T = len(self.levels)

    def M0(self, N: int, rng: np.random.Generator) -> SearchState:
        self.process.start()
        x = self.process.noise(self.num_paths, torch_generator(rng, self.process.device.type))
        x = self.process.run(x, 0, self.levels[0], rng)
        return self._state(0, take(x, np.arange(N) % self.num_paths))

    def M(self, t: int, xp: SearchState, rng: np.random.Generator) -> SearchState:
        i, k = self.levels[t - 1], self.levels[t]
        j = i - self.forward
        return self._state(t, self.process.run(self.process.renoise(xp.x, i, j, rng), j, k, rng))

    def _state(self, t: int, x: Any) -> SearchState:
        level = self.levels[t]
        if level == self.process.K:
            return SearchState(x, x)
        return SearchState(x, None if t == 0 else self.process.predict(x, level)[1])

    def logG(self, t: int, xp: SearchState | None, x: SearchState) -> np.ndarray:
        N = x.num_particles
        if t > 0:
            return np.zeros(N)
        return np.where(np.arange(N) < self.num_paths, 0.0, -np.inf)

    def view(self, t: int, x: SearchState) -> Any:
        return self.model.readable(x.x0)


def _search(method: str, dynamics: Dynamics, num_slots: int, selection: Selection, potential: Any,
            seed: int | None, rng: np.random.Generator | None, store_history: bool, progress: bool,
            **info: Any) -> SMCResult:
    """Run ``dynamics`` tilted by ``potential`` (difference, lam = 1; step 0 unscored) with ``selection``."""
    fk = Tilted(dynamics, potential, shape="difference", lam=1.0, at=range(1, dynamics.T))
    algo = SMC(fk, num_slots, selection=selection, store_history=store_history, progress=progress)
    return algo.run(as_generator(seed, rng)).for_method(method, "argmax_weight", **info)


def random_search(model: Any, num_samples: int, *, potential: Any = None, seed: int | None = None,
                  rng: np.random.Generator | None = None, store_history: bool = False,
                  progress: bool = False) -> SMCResult:
    """Random search over initial noises: ``num_samples`` independent samples, the best by reward."""
    res = best_of_n(model, num_samples, potential=potential, seed=seed, rng=rng, store_history=store_history,
                    progress=progress)
    return res.for_method("random_search", "argmax_weight")


def zero_order_search(model: Any, num_candidates: int, *, potential: Any = None, rounds: int = 4, step_size: float = 0.5,
                      seed: int | None = None, rng: np.random.Generator | None = None,
                      store_history: bool = False, progress: bool = False) -> SMCResult:
    """Zero-order search with ``num_candidates`` noises per round for ``rounds`` rounds (module
    docstring). The result holds the last round's M + 1 slots (slot 0: the incumbent before it);
    with ``store_history`` the best after round t is ``history[t]`` at ``argmax(log_weights_history[t])``."""
    if isinstance(num_candidates, bool) or not isinstance(num_candidates, (int, np.integer)) or num_candidates < 1:
        raise ValueError(f"num_candidates must be a positive integer, got {num_candidates!r}")
    N = int(num_candidates) + 1
    return _search("zero_order_search", ZeroOrderDynamics(model, rounds, step_size), N,
                   Groups(N, 0.0, name="zero-order search"), potential, seed, rng, store_history, progress,
                   num_candidates=int(num_candidates), rounds=int(rounds), step_size=float(step_size))


def search_over_paths(model: Any, num_paths: int, *, potential: Any = None, num_branches: int = 4, start: int | None = None,
                      backward: int | None = None, forward: int | None = None, seed: int | None = None,
                      rng: np.random.Generator | None = None, store_history: bool = False,
                      progress: bool = False) -> SMCResult:
    """Search over paths with ``num_paths`` kept paths of ``num_branches`` branches (module docstring), in
    level units (0 = noise, K = clean): ``start`` defaults to K // 5, ``backward`` to max(K // 10, 2),
    ``forward`` to backward // 2. The result holds the last round's N * M samples."""
    for name, value in (("num_paths", num_paths), ("num_branches", num_branches)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    K = _check_model(model).K
    start = K // 5 if start is None else int(start)
    backward = max(K // 10, 2) if backward is None else int(backward)
    forward = backward // 2 if forward is None else int(forward)
    M = int(num_branches)
    dynamics = PathSearchDynamics(model, num_paths, start, backward, forward)
    return _search("search_over_paths", dynamics, int(num_paths) * M, Beam(M), potential, seed, rng, store_history,
                   progress, num_paths=int(num_paths), num_branches=M, start=start, backward=backward,
                   forward=forward)


METHODS = {"random_search": random_search, "zero_order_search": zero_order_search,
           "search_over_paths": search_over_paths}
