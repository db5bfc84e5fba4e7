"""ppl-scaling: inference-time scaling as posterior sampling.

Generation is a state-space model; Sequential Monte Carlo over it replaces ad-hoc
search. The core pieces::

    import ppl_scaling as pps
    result = pps.smc(fk, num_particles=256, seed=0)   # fk: a pps.FeynmanKac
    result.log_evidence, result.weights, result.ledger, result.to_arviz()

    fk = pps.Tilted(dynamics, potential, shape="difference", lam=1.0)   # steer any dynamics

Subpackages: ``ppl_scaling.samplers`` (importance sampling, particle Gibbs, ...),
``ppl_scaling.models`` (LLM token streams), ``ppl_scaling.diffusion``
(diffusion steering), ``ppl_scaling.pyro`` (Pyro programs as FK models).
"""
from . import resampling, selection, weights
from .arviz_export import to_arviz
from .errors import DegenerateWeightsError, PotentialError
from .fk import Dynamics, FeynmanKac
from .ledger import Ledger, record, recording
from .potentials import Potential, PyroPotential, as_potential, check_potential
from .result import SMCResult
from .rng import as_generator, jax_key, torch_generator
from .smc import SMC, SMCState, smc
from .state import take, where
from .tilt import Tilted, TiltedState

__version__ = "0.1.0"

__all__ = [
    "FeynmanKac", "Dynamics", "Tilted", "TiltedState", "SMC", "SMCState", "SMCResult", "smc", "resampling",
    "selection", "weights", "take", "where", "to_arviz", "Ledger", "record", "recording",
    "Potential", "PyroPotential", "as_potential", "check_potential", "DegenerateWeightsError", "PotentialError",
    "as_generator", "torch_generator", "jax_key",
]
