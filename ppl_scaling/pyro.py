"""Pyro programs as Feynman-Kac models.

Write a state-space model as a Pyro program with two methods, following Pyro's
``SMCFilter`` convention::

    class RandomWalk:
        def init(self, state):                 # draw the initial latent; no observation
            state["x"] = pyro.sample("x0", dist.Normal(0.0, 1.0))

        def step(self, state, y):              # consume one observation
            state["x"] = pyro.sample("x", dist.Normal(0.9 * state["x"], 1.0))
            pyro.sample("y", dist.Normal(state["x"], 0.5), obs=y)

    result = ppl_scaling.pyro.smc(RandomWalk(), ys, num_particles=1000, seed=0)
    result.log_evidence        # log p(y_1..y_n), which Pyro's SMCFilter does not give
    result.particles["x"]      # the final state dict, one row per particle

Underneath, each call runs inside ``pyro.plate("particles", N)``, so every site
is batched over particles (the particle dimension is ``-1 - max_plate_nesting``;
``state`` tensors have it leading). Unobserved sites are proposed from the prior,
or from ``guide`` (an object with the same ``init`` / ``step`` methods, which may
read but not write ``state``); the step's log potential is

    logG = Σ_observed log p(y | ...) + Σ_factor f + Σ_guided (log p(z) - log q(z)).

Randomness: Pyro samples from torch's global generator, so each call runs under
``torch.random.fork_rng`` seeded from the run's numpy ``rng``; global state is restored.
"""
from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any, Sequence

import numpy as np
import torch

import pyro
from pyro import poutine

from .fk import FeynmanKac
from .result import SMCResult
from .rng import as_generator, torch_global_seed
from .smc import SMC


class PyroFeynmanKac(FeynmanKac):
    """The FK model of a Pyro ``init``/``step`` program. State: ``(state_dict, logG)``."""

    def __init__(self, model: Any, observations: Sequence[Any], guide: Any = None, max_plate_nesting: int = 0) -> None:
        for obj, role in ((model, "model"), (guide, "guide")):
            if obj is not None and not (callable(getattr(obj, "init", None)) and callable(getattr(obj, "step", None))):
                raise TypeError(f"the {role} must have methods init(state) and step(state, y); got {type(obj).__name__}")
        self.model, self.guide = model, guide
        self.observations = observations
        self.particle_dim = -1 - int(max_plate_nesting)
        self.T = len(observations) + 1

    def M0(self, N: int, rng: np.random.Generator):
        return self._run("init", {}, (), N, rng)

    def M(self, t: int, xp, rng: np.random.Generator):
        return self._run("step", dict(xp[0]), (self.observations[t - 1],), int(xp[1].shape[0]), rng)

    def logG(self, t: int, xp, x):
        return x[1]

    def _plated(self, fn, N: int):
        def in_plate(*args):
            with pyro.plate("particles", N, dim=self.particle_dim):
                return fn(*args)

        return in_plate

    def _run(self, method: str, state: dict, args: tuple, N: int, rng: np.random.Generator):
        guide_trace = None
        with torch_global_seed(rng):
            model_fn = self._plated(getattr(self.model, method), N)
            if self.guide is not None:
                guide_fn = self._plated(getattr(self.guide, method), N)
                guide_trace = poutine.trace(guide_fn).get_trace(MappingProxyType(state), *args)
                model_fn = poutine.replay(model_fn, trace=guide_trace)
            model_trace = poutine.trace(model_fn).get_trace(state, *args)
        model_trace.compute_log_prob()
        if guide_trace is not None:
            guide_trace.compute_log_prob()
        logw = torch.zeros(N, dtype=torch.float64)
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                logw = logw + self._per_particle(site["log_prob"], N)
            elif guide_trace is not None and name in guide_trace.nodes:
                logw = logw + self._per_particle(site["log_prob"], N) \
                    - self._per_particle(guide_trace.nodes[name]["log_prob"], N)
        bad = [k for k, v in state.items() if not (torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == N)]
        if bad:
            raise ValueError(f"state entries {bad} written by {method}() are not tensors with a leading particle "
                             f"dimension of size {N}; everything that depends on a particle must live in state")
        return state, logw.detach()

    def _per_particle(self, log_prob: torch.Tensor, N: int) -> torch.Tensor:
        """Reduce a site's log-prob to one value per particle (sum over inner plates)."""
        lp = torch.as_tensor(log_prob, dtype=torch.float64)
        inner = -1 - self.particle_dim
        if inner and lp.dim() >= inner:
            lp = lp.sum(dim=tuple(range(-inner, 0)))
        lp = lp.reshape((-1,) + tuple(lp.shape[-1:])) if lp.dim() else lp.reshape(1, 1)
        return torch.broadcast_to(lp, (lp.shape[0], N)).sum(0)


def smc(
    model: Any,
    observations: Sequence[Any],
    num_particles: int,
    *,
    guide: Any = None,
    ess_threshold: float = 0.5,
    resampling: str = "systematic",
    seed: int | None = None,
    rng: np.random.Generator | None = None,
    max_plate_nesting: int = 0,
    store_history: bool = False,
    progress: bool = False,
) -> SMCResult:
    """Filter a Pyro ``init``/``step`` program over ``observations`` with SMC.

    Returns an ``SMCResult`` whose ``particles`` is the final ``state`` dict and
    whose ``log_evidence`` estimates log p(observations) without bias.
    """
    fk = PyroFeynmanKac(model, observations, guide=guide, max_plate_nesting=max_plate_nesting)
    result = SMC(fk, num_particles, ess_threshold=ess_threshold, resampling=resampling,
                 store_history=store_history, progress=progress).run(as_generator(seed, rng))
    history = None if result.history is None else [h[0] for h in result.history]
    return dataclasses.replace(result, particles=result.particles[0], history=history)
