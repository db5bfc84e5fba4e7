"""Diffusion models as dynamics, steered by potentials (FK steering, Singhal et al. 2025).

- ``DiffusionModel`` (``model``): a stochastic reverse diffusion as ``ppl_scaling.fk.Dynamics``
  (state x_t, one reverse step per FK step, ``view`` = decoded x0 predictions / samples);
  ``ppl_scaling.Tilted`` steers it by a reward. Methods (FK steering, SVDD, noise search,
  best-of-N) live in ``ppl_scaling.samplers``.
- ``FlowMatchingModel`` (``flow``): rectified-flow models (SD3, Flux style) sampled by the SDE with
  the flow ODE's marginals, so resampled copies diverge and FK steering targets p(x) exp(lam r(x));
  ``DenoisingDynamics`` is what both share (state, moves, views, soft values).
- ``process``: the diffusers scheduler adapter (``ReverseProcess``); ``schedules``: FK's sparse
  resampling schedules (``fk_schedule``, ``potential_steps``).
- ``rewards``: image rewards as potentials (products, tempering): classifier, JPEG
  compressibility, brightness, and ``load_reward`` for CLIP score, PickScore, HPSv2, LAION
  aesthetic and ImageReward checkpoints (lazy).
- ``gmm``: an analytic Gaussian-mixture diffusion with closed-form tilted targets.
- ``pipelines`` (import explicitly): ``steer(pipe, prompt, reward, ...)`` for diffusers' Stable
  Diffusion 1.x/2.x, SDXL, SD3 and Flux pipelines (``.images`` and the SMC record).
- ``toy`` / ``masked``: the bundled digits DDPM and the masked text diffusion model;
  ``masked_lm.HFDenoiser``: Hugging Face masked diffusion LMs (LLaDA, MDLM, BERT-style) as its
  denoiser (``MaskedDiffusionModel.from_pretrained``).
"""
from . import rewards
from .gmm import GaussianMixture, LinearReward, QuadraticReward
from .masked import MaskedDiffusionModel
from .masked_lm import HFDenoiser
from .flow import FlowMatchingModel, FlowProcess
from .model import DenoisingDynamics, DiffusionModel, DiffusionState, soft_value
from .process import ReverseProcess
from .schedules import fk_schedule, potential_steps

__all__ = ["DiffusionModel", "DenoisingDynamics", "FlowMatchingModel", "FlowProcess", "DiffusionState", "ReverseProcess", "fk_schedule", "potential_steps", "soft_value",
           "MaskedDiffusionModel", "HFDenoiser", "GaussianMixture", "LinearReward", "QuadraticReward", "rewards"]
