"""Feynman-Kac steering of diffusion models (Singhal et al. 2025) and its baselines.

- ``DiffusionModel``: a reverse diffusion as an FK model (state x_t, one stochastic
  reverse step per SMC step, potentials from rewards of x0 predictions), for
  ``ppl_scaling.smc``; ``fk_steering`` wraps it; ``fk_schedule`` builds FK's sparse
  resampling schedules.
- ``baselines``: best-of-N, importance sampling, SVDD, noise search.
- ``rewards``: classifier, JPEG compressibility, brightness, lazy CLIP / aesthetic loaders.
- ``gmm``: an analytic Gaussian-mixture diffusion with closed-form tilted targets.
- ``pipelines`` (import explicitly): steering a diffusers Stable Diffusion pipeline.
- ``toy`` / ``text``: the bundled digits DDPM and the masked text diffusion model.
"""
from . import baselines, rewards
from .gmm import GaussianMixture, LinearReward, QuadraticReward
from .model import DiffusionModel, DiffusionState, fk_schedule, potential_steps
from .steering import SamplingResult, fk_steering
from .text import MaskedDiffusionModel

__all__ = ["DiffusionModel", "DiffusionState", "fk_schedule", "potential_steps", "fk_steering", "SamplingResult",
           "MaskedDiffusionModel", "GaussianMixture", "LinearReward", "QuadraticReward", "baselines", "rewards"]
