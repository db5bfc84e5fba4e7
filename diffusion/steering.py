"""FK steering in one call, and the result type shared with the baselines.

``fk_steering`` builds a ``DiffusionModel`` and runs ``ppl_scaling.smc`` on it with
either adaptive resampling (ESS below ``ess_threshold * N``) or FK-Diffusion-Steering's
fixed schedule (``resample_every`` between ``t_start`` and ``t_end``, in FK's loop-index
units, 0 = noisiest step; see ``model.fk_schedule``). With a fixed schedule the reward is
evaluated only at the steps that feed a resampling (and at the end), as in FK's code,
unless ``reward_every_step=True``.

    out = fk_steering(denoiser, scheduler, (3, 32, 32), reward, num_particles=8, lam=10.0,
                      num_inference_steps=50, resample_every=5, t_start=5, t_end=30, seed=0)
    out.samples, out.rewards, out.weights, out.best, out.smc.summary()
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ppl_scaling.result import SMCResult
from ppl_scaling.smc import smc
from ppl_scaling.weights import normalise

from .model import Denoiser, DiffusionModel, Reward, fk_schedule, potential_steps


@dataclass
class SamplingResult:
    """Samples of a steering or search method, with their rewards and compute.

    ``weights`` are normalised importance weights of ``samples`` (uniform for methods
    without weights); ``best`` is the sample with the largest weight, ties broken by
    reward; ``top`` the one with the largest reward. ``compute`` counts NFEs (per-sample
    denoiser evaluations) and reward evaluations. ``smc`` is the full SMCResult when
    the method is an SMC run.
    """

    samples: torch.Tensor
    rewards: np.ndarray
    log_weights: np.ndarray
    compute: dict[str, float] = field(default_factory=dict)
    smc: SMCResult | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def weights(self) -> np.ndarray:
        return normalise(self.log_weights)

    @property
    def best_index(self) -> int:
        return int(np.lexsort((self.rewards, self.log_weights))[-1])

    @property
    def best(self) -> torch.Tensor:
        return self.samples[self.best_index]

    @property
    def top(self) -> torch.Tensor:
        return self.samples[int(np.argmax(self.rewards))]

    def mean_reward(self) -> float:
        """Weighted mean reward Σ W_i r_i (the plain mean for uniform weights)."""
        return float(np.sum(self.weights * self.rewards))


def fk_steering(denoiser: Denoiser, scheduler: Any, sample_shape: Any, reward: Reward, *,
                num_particles: int, lam: float = 1.0, potential: str = "difference",
                num_inference_steps: int = 50, eta: float = 1.0, decode: Callable[[Any], Any] | None = None,
                intermediate: str | Callable[..., Any] = "x0", num_x0_samples: int = 4,
                resample_every: int | None = None, t_start: int = 0, t_end: int | None = None,
                ess_threshold: float = 0.5, reward_every_step: bool = False, resampling: str = "systematic",
                cond: Any = None, seed: int | None = None, rng: np.random.Generator | None = None,
                device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                store_history: bool = False, progress: bool = False) -> SamplingResult:
    """Steer a diffusion sampler toward p(x) exp(lam r(x)) with ``num_particles`` particles.

    ``resample_every=None``: adaptive resampling with ``ess_threshold``; an int: FK's schedule
    ``fk_schedule(num_inference_steps, every=resample_every, start=t_start, end=t_end)``.
    Returns a ``SamplingResult`` whose ``smc`` holds the diagnostics (ESS, evidence, genealogy).
    """
    if resample_every is None:
        resample_at, potential_at = None, None
    else:
        resample_at = fk_schedule(num_inference_steps, every=resample_every, start=t_start, end=t_end)
        potential_at = None if reward_every_step else potential_steps(resample_at)
    model = DiffusionModel(denoiser, scheduler, sample_shape, reward=reward, potential=potential, lam=lam,
                           num_inference_steps=num_inference_steps, eta=eta, decode=decode,
                           intermediate=intermediate, num_x0_samples=num_x0_samples, potential_at=potential_at,
                           cond=cond, device=device, dtype=dtype)
    res = smc(model, num_particles, ess_threshold=ess_threshold, resampling=resampling, resample_at=resample_at,
              seed=seed, rng=rng, store_history=store_history, progress=progress)
    return from_smc(res, method="fk_steering", potential=potential, lam=lam)


def from_smc(res: SMCResult, **info: Any) -> SamplingResult:
    """A ``SamplingResult`` view of an SMC run of a ``DiffusionModel``."""
    state = res.particles
    return SamplingResult(samples=state.x, rewards=np.asarray(state.reward, dtype=np.float64),
                          log_weights=res.log_weights, compute=dict(res.compute), smc=res, info=info)
