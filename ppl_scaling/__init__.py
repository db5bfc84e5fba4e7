"""ppl-scaling: inference-time scaling as posterior sampling.

Generation is a state-space model; Sequential Monte Carlo over it replaces ad-hoc
search. The core pieces::

    import ppl_scaling as pps
    result = pps.smc(fk, num_particles=256, seed=0)   # fk: a pps.FeynmanKac
    result.log_evidence, result.weights, result.to_arviz()

Subpackages: ``ppl_scaling.samplers`` (importance sampling, particle Gibbs, ...),
``ppl_scaling.models`` (LLM token streams), ``ppl_scaling.diffusion``
(diffusion steering), ``ppl_scaling.pyro`` (Pyro programs as FK models).
"""
from . import resampling, weights
from .arviz_export import to_arviz
from .errors import DegenerateWeightsError, PotentialError
from .fk import FeynmanKac
from .potentials import Potential, PyroPotential, check_potential
from .result import SMCResult
from .rng import as_generator, jax_key, torch_generator
from .smc import SMC, smc
from .state import take, where

__version__ = "0.1.0"

__all__ = [
    "FeynmanKac", "SMC", "SMCResult", "smc", "resampling", "weights", "take", "where", "to_arviz",
    "Potential", "PyroPotential", "check_potential", "DegenerateWeightsError", "PotentialError", "as_generator", "torch_generator", "jax_key",
]
