"""Samplers built on the SMC engine. Each returns an ``SMCResult`` (or a
collection of them), so evaluation code treats them alike.

- ``importance_sampling``: no resampling (best-of-N with weights).
- ``particle_gibbs`` / ``ConditionalSMC``: conditional SMC with a reference path.
- ``parallel_tempering``: conditional SMC chains at several potential temperatures, swapping paths.
- ``beam_search`` / ``dvts``: deterministic top-k selection (the mode-seeking baselines).
"""
from .beam import beam_search, dvts
from .importance import importance_sampling
from .parallel_tempering import ParallelTemperingResult, TemperedFK, parallel_tempering
from .particle_gibbs import ConditionalSMC, ParticleGibbsResult, draw_trajectory, particle_gibbs

__all__ = ["importance_sampling", "particle_gibbs", "ConditionalSMC", "ParticleGibbsResult", "draw_trajectory",
           "parallel_tempering", "ParallelTemperingResult", "TemperedFK", "beam_search", "dvts"]
