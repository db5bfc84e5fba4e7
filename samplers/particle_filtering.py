"""Particle filtering: SMC over dynamics tilted by a potential.

The general method and the presets of the LLM literature::

    particle_filtering(model, N, potential=prm, shape="difference", lam=1.0, ess_threshold=0.5)
        Tilted(model, potential, shape, lam) run by SMC with adaptive resampling; the exact
        intermediate targets p(x_{1:t}) exp(lam r_t) with the ``difference`` shape. Answer rule:
        weighted majority. The potential is used as it is: a PRM read as log p (its default
        transform, ``prm.configured(transform="log")``; ``ppl_scaling.models.harness`` passes
        it so) gives the target p_LM(x) p(x)^lam — METHODS["particle_filtering_adaptive"].
        On a diffusion model this is FK steering (``fk_steering`` adds FK-Diffusion-Steering's
        schedules).

    pf_paper(model, N, potential=prm, softmax_temperature=1.0)
        The particle filter of Puri et al. (2025), "A Probabilistic Inference Approach to
        Inference-Time Scaling of LLMs using Particle-Based Monte Carlo Methods": reward
        r_t = logit(p_t) of the PRM's score of the prefix, shape ``last`` with
        lam = 1 / softmax_temperature, multinomial resampling at every step, so particles are
        selected at step t with probabilities softmax(logit(p_t) / temperature) — the paper's
        rule. The terminal correction of ``last`` makes the weighted final particles target
        p_LM(x) (p(x) / (1 - p(x)))^(1/temperature) exactly (the paper's code omits it).
        Answer rule: the highest final reward (the paper's pick). A PRM is re-read as
        logit(p) here, whatever its transform — METHODS["particle_filtering"].

Both return an ``SMCResult`` whose ``rewards`` are the final rewards of the particles.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from ppl_scaling.potentials import as_potential
from ppl_scaling.result import SMCResult
from ppl_scaling.smc import SMCState, smc
from ppl_scaling.tilt import Tilted

__all__ = ["particle_filtering", "pf_paper", "paper_tilt", "pf_paper_instead", "METHODS"]


def particle_filtering(model: Any, num_particles: int, *, potential: Any = None, shape: str = "difference",
                       lam: float = 1.0, at: Iterable[int] | None = None, ess_threshold: float = 0.5,
                       resampling: str = "systematic", resample_at: Iterable[int] | None = None,
                       selection_rule: str = "weighted_majority", stop: Callable[[SMCState], bool] | None = None,
                       seed: int | None = None, rng: np.random.Generator | None = None,
                       store_history: bool = False, progress: bool = False) -> SMCResult:
    """SMC on ``Tilted(model, potential, shape, lam, at)`` (``model`` as it is without a potential)."""
    fk = model if potential is None else Tilted(model, potential, shape=shape, lam=lam, at=at)
    res = smc(fk, num_particles, ess_threshold=ess_threshold, resampling=resampling, resample_at=resample_at,
              stop=stop, seed=seed, rng=rng, store_history=store_history, progress=progress)
    return res.for_method("particle_filtering", selection_rule, shape=shape, lam=lam)


def paper_tilt(model: Any, potential: Any, softmax_temperature: float = 1.0, *,
               aggregation: str | None = None) -> Tilted:
    """The PF paper's weighting of ``model``: logit of the PRM score, shape ``last``, lam = 1/temperature.
    A PRM (anything with ``configured(transform=...)``) is re-read as logit(p); another
    potential is used as it is (its log-values are the rewards)."""
    if not (np.isfinite(softmax_temperature) and softmax_temperature > 0):
        raise ValueError(f"softmax temperature must be positive and finite, got {softmax_temperature}")
    if hasattr(potential, "configured"):
        potential = potential.configured(aggregation=aggregation, transform="logit")
    elif aggregation is not None:
        raise TypeError(f"aggregation={aggregation!r} needs a ProcessRewardModel, got {type(potential).__name__}")
    return Tilted(model, as_potential(potential), shape="last", lam=1.0 / softmax_temperature)


def pf_paper(model: Any, num_particles: int, *, potential: Any, softmax_temperature: float = 1.0,
             aggregation: str | None = None, selection_rule: str = "argmax_reward", seed: int | None = None,
             rng: np.random.Generator | None = None, store_history: bool = False,
             progress: bool = False, stop: Callable[[SMCState], bool] | None = None) -> SMCResult:
    """The PF paper's particle filter (module docstring); ``stop``: a stop rule
    (``ppl_scaling.stopping``, e.g. a token budget)."""
    fk = paper_tilt(model, potential, softmax_temperature, aggregation=aggregation)
    res = smc(fk, num_particles, ess_threshold=1.0, resampling="multinomial", seed=seed, rng=rng,
              store_history=store_history, progress=progress, stop=stop)
    return res.for_method("particle_filtering", selection_rule, preset="pf_paper",
                          softmax_temperature=softmax_temperature)


def pf_paper_instead(method: str, why: str, model: Any, budget: int, *, allow_fallback: bool, potential: Any,
                     softmax_temperature: float, aggregation: str | None, selection_rule: str, seed: int | None,
                     rng: np.random.Generator | None, progress: bool) -> SMCResult:
    """For a preset that cannot run at this budget (``why``): refuse, or with ``allow_fallback`` run the
    PF paper's filter with all ``budget`` particles in its place, recorded in ``info["fallback"]``."""
    if not allow_fallback:
        raise ValueError(f"{why}; use the method 'particle_filtering' (pf_paper) for this budget, or pass "
                         f"allow_fallback=True to run it in place of {method} (recorded in info['fallback'])")
    res = pf_paper(model, budget, potential=potential, softmax_temperature=softmax_temperature,
                   aggregation=aggregation, selection_rule=selection_rule, seed=seed, rng=rng, progress=progress)
    return res.for_method(method, selection_rule, fallback="particle_filtering", sweeps=1)


METHODS = {"particle_filtering": pf_paper, "particle_filtering_adaptive": particle_filtering}
