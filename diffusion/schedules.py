"""FK-Diffusion-Steering's sparse schedules, in the FK steps of ``DiffusionModel``.

A ``DiffusionModel`` with K scheduler steps has T = K + 1 FK steps: t = 0 is the noise, step
t >= 1 is the reverse step from level t - 1 to level t. ``smc(..., resample_at=S)`` resamples
at the *start* of step t in S: the population at level t - 1, weighted by the potentials up
to step t - 1, right before it is denoised. FK-Diffusion-Steering's loop index i (0 = first,
noisiest scheduler step) therefore maps to t = i + 1, and the rewards that feed a resampling
at t are those of step t - 1. FK's evaluation defaults (100 steps, every 5 from 5 to 30) are

    resample_at = fk_schedule(100, every=5, start=5, end=30)   # [6, 11, ..., 31]
    at = potential_steps(resample_at)                          # [5, 10, ..., 30] (+ the final step)
"""
from __future__ import annotations

from collections.abc import Iterable

__all__ = ["fk_schedule", "potential_steps"]


def fk_schedule(num_inference_steps: int, *, every: int = 1, start: int = 0, end: int | None = None) -> list[int]:
    """``resample_at`` steps t = i + 1 for FK's loop indices i = start, start + every, ... <= end
    (``end`` defaults to the last scheduler step K - 1; indices past it are dropped). A schedule
    that would never resample (start > end, or start past the last step) is refused."""
    K = int(num_inference_steps)
    if K < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if int(start) < 0:
        raise ValueError(f"start (t_start) must be a loop index >= 0 (0 = the noisiest step), got {start}")
    if end is not None and int(start) > int(end):
        raise ValueError(f"start (t_start) = {start} is after end (t_end) = {end}: the schedule would never "
                         "resample; FK's loop indices run from start to end, 0 = the noisiest step")
    if int(start) > K - 1:
        raise ValueError(f"start (t_start) = {start} is past the last scheduler step {K - 1} "
                         f"(num_inference_steps = {K}): the schedule would never resample")
    end = K - 1 if end is None else min(int(end), K - 1)
    return [i + 1 for i in range(int(start), end + 1, int(every))]


def potential_steps(resample_at: Iterable[int]) -> list[int]:
    """The reward steps of a sparse schedule: t - 1 for each resampling step t >= 1."""
    return sorted({int(t) - 1 for t in resample_at if int(t) >= 1})
