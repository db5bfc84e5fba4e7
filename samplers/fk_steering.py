"""FK steering (Singhal et al. 2025): particle filtering on a diffusion model, with the
schedules of FK-Diffusion-Steering's code.

    fk_steering(model, N, potential=reward, shape="difference", lam=10.0)
        adaptive resampling (ESS < ess_threshold * N), rewards at every step
    fk_steering(model, N, potential=reward, lam=10.0, resample_every=5, t_start=5, t_end=30)
        FK's fixed schedule: resample at loop indices i = t_start, t_start + every, ... <= t_end
        (0 = the noisiest scheduler step; ``diffusion.schedules.fk_schedule``), with the reward
        evaluated only at the steps that feed a resampling (and at the end), as in FK's code,
        unless ``reward_every_step=True``

``model`` has T = K + 1 steps for K scheduler steps (``ppl_scaling.diffusion.DiffusionModel``).
It is ``particle_filtering`` on ``Tilted(model, potential, shape, lam, at)``: the target is
p(x) exp(lam r(x)) for every shape, exactly at every step with ``difference``. Returns an
``SMCResult``: samples ``result.particles.x``, final rewards ``result.rewards``, weights
``result.weights``; the default answer is the particle of largest weight (``argmax_weight``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ppl_scaling.result import SMCResult

from .particle_filtering import particle_filtering

__all__ = ["fk_steering", "METHODS"]


def fk_steering(model: Any, num_particles: int, *, potential: Any = None, shape: str = "difference",
                lam: float = 1.0, resample_every: int | None = None, t_start: int = 0, t_end: int | None = None,
                reward_every_step: bool = False, ess_threshold: float = 0.5, resampling: str = "systematic",
                selection_rule: str = "argmax_weight", seed: int | None = None,
                rng: np.random.Generator | None = None, store_history: bool = False,
                progress: bool = False) -> SMCResult:
    """Steer ``model`` toward p(x) exp(lam r(x)) with ``num_particles`` particles (module docstring).
    ``resample_every=None``: adaptive resampling with ``ess_threshold``; an int: FK's schedule."""
    from ppl_scaling.diffusion.schedules import fk_schedule, potential_steps

    if resample_every is None:
        resample_at, at = None, None
    else:
        resample_at = fk_schedule(int(model.T) - 1, every=resample_every, start=t_start, end=t_end)
        at = None if reward_every_step else potential_steps(resample_at)
    res = particle_filtering(model, num_particles, potential=potential, shape=shape, lam=lam, at=at,
                             ess_threshold=ess_threshold, resampling=resampling, resample_at=resample_at,
                             selection_rule=selection_rule, seed=seed, rng=rng, store_history=store_history,
                             progress=progress)
    return res.for_method("fk_steering", selection_rule, resample_every=resample_every, t_start=t_start,
                          t_end=t_end)


METHODS = {"fk_steering": fk_steering}
