"""Every inference method, one file per family, each returning an ``SMCResult``.

``METHODS`` maps a name to a method ``f(model, budget, *, potential=..., rng=..., **options)``:
``model`` is dynamics (``ppl_scaling.models.StepModel``, ``ppl_scaling.diffusion``
models, any ``Dynamics``) or an FK model, ``potential`` the reward (a ``Potential`` or a
function; the method tilts the model by it), ``budget`` the number of particles /
samples / beams (N generations' worth of work).

    file                     methods
    particle_filtering.py    particle_filtering (PF-paper preset), particle_filtering_adaptive
    best_of_n.py             best_of_n, weighted_best_of_n, self_consistency, best_of_majority
    beam.py                  beam_search, dvts
    importance.py            importance_sampling (any FK model)
    particle_gibbs.py        particle_gibbs (PF-paper preset pg_paper; conditional SMC)
    parallel_tempering.py    parallel_tempering (PF-paper preset pt_paper)
    fk_steering.py           fk_steering (particle filtering of diffusion with FK's schedules)
    svdd.py                  svdd (soft value-based decoding: per-group selection)
    noise_search.py          random_search, zero_order_search, search_over_paths
    rpc.py                   rpc (Reasoning-pruning Perplexity Consistency: self-consistency samples,
                             answers scored by the model probability of their distinct paths)
    first_finish.py          first_finish (First Finish Search: the first of N generations to finish)
    multi_temperature.py     multi_temperature (N split across temperatures, balance-heuristic weights
                             towards the model)
    a_star.py                a_star (A*-decoding: best-first search on -log p and a PRM heuristic)
    rejection_sampling.py    rejection_sampling (Inference Scaling fLaws: attempts until an imperfect
                             verifier accepts)
    verify_cascade.py        verify_cascade (Solve-Detect-Verify: a cheap verifier, escalation to an
                             expensive one when unsure)
    deep_prune.py            deep_prune (DeepPrune: self-consistency with redundant traces pruned by a judge)
    verifier_scaling.py      verifier_scaling (sampled verdicts voted; solutions vs verifications at a
                             fixed compute)
    compute_optimal.py       compute_optimal (Snell et al.: a pilot's agreement picks method and budget
                             from a policy, ppl_scaling.allocation)
"""
from . import a_star as _a_star
from . import beam as _beam
from . import best_of_n as _best_of_n
from . import compute_optimal as _compute_optimal
from . import deep_prune as _deep_prune
from . import first_finish as _first_finish
from . import fk_steering as _fk_steering
from . import multi_temperature as _multi_temperature
from . import noise_search as _noise_search
from . import svdd as _svdd
from . import importance as _importance
from . import parallel_tempering as _parallel_tempering
from . import particle_filtering as _particle_filtering
from . import particle_gibbs as _particle_gibbs
from . import rejection_sampling as _rejection_sampling
from . import rpc as _rpc
from . import verifier_scaling as _verifier_scaling
from . import verify_cascade as _verify_cascade
from .a_star import a_star
from .beam import beam_search, dvts
from .best_of_n import best_of_majority, best_of_n, self_consistency, weighted_best_of_n
from .compute_optimal import compute_optimal
from .deep_prune import Pruning, deep_prune
from .first_finish import first_finish
from .fk_steering import fk_steering
from .importance import importance_sampling
from .multi_temperature import multi_temperature
from .noise_search import random_search, search_over_paths, zero_order_search
from .parallel_tempering import TemperedFK, parallel_tempering, path_log_potential, pt_paper
from .particle_filtering import paper_tilt, particle_filtering, pf_paper
from .particle_gibbs import ConditionalSMC, draw_trajectory, particle_gibbs, pg_paper, stack_paths
from .rejection_sampling import rejection_sampling
from .rpc import rpc
from .svdd import svdd
from .verifier_scaling import verifier_scaling
from .verify_cascade import Cascade, verify_cascade

METHODS = {**_particle_filtering.METHODS, **_best_of_n.METHODS, **_beam.METHODS, **_importance.METHODS,
           **_particle_gibbs.METHODS, **_parallel_tempering.METHODS, **_fk_steering.METHODS, **_svdd.METHODS,
           **_noise_search.METHODS, **_rpc.METHODS, **_first_finish.METHODS, **_multi_temperature.METHODS,
           **_a_star.METHODS, **_rejection_sampling.METHODS, **_verify_cascade.METHODS, **_deep_prune.METHODS,
           **_verifier_scaling.METHODS, **_compute_optimal.METHODS}
# Methods written for diffusion models (their budgets count chains or noise candidates; the
# noise searches need a DiffusionModel); the LLM evaluation harness offers the others.
DIFFUSION_METHODS = frozenset({**_fk_steering.METHODS, **_svdd.METHODS, **_noise_search.METHODS})

__all__ = ["METHODS", "DIFFUSION_METHODS", "importance_sampling", "particle_filtering", "pf_paper", "paper_tilt", "best_of_n",
           "best_of_majority", "weighted_best_of_n", "self_consistency", "beam_search", "dvts", "particle_gibbs", "pg_paper",
           "ConditionalSMC", "draw_trajectory", "stack_paths", "parallel_tempering", "pt_paper", "TemperedFK",
           "path_log_potential", "fk_steering", "svdd", "random_search", "zero_order_search", "search_over_paths",
           "rpc", "first_finish", "multi_temperature", "a_star", "rejection_sampling", "verify_cascade", "Cascade",
           "deep_prune", "Pruning", "verifier_scaling", "compute_optimal"]
