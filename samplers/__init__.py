"""Samplers built on the SMC engine. Each returns an ``SMCResult`` (or a
collection of them), so evaluation code treats them alike.

- ``importance_sampling``: no resampling (best-of-N with weights).
- ``particle_gibbs`` / ``ConditionalSMC``: conditional SMC with a reference path.
"""
from .importance import importance_sampling
from .particle_gibbs import ConditionalSMC, ParticleGibbsResult, draw_trajectory, particle_gibbs

__all__ = ["importance_sampling", "particle_gibbs", "ConditionalSMC", "ParticleGibbsResult", "draw_trajectory"]
