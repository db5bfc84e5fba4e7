"""Pyro programs as dynamics tilted by their likelihood.

Write a state-space model as a Pyro program with two methods, following Pyro's
``SMCFilter`` convention::

    class RandomWalk:
        def init(self, state):                 # draw the initial latent; no observation
            state["x"] = pyro.sample("x0", dist.Normal(0.0, 1.0))

        def step(self, state, y):              # consume one observation
            state["x"] = pyro.sample("x", dist.Normal(0.9 * state["x"], 1.0))
            pyro.sample("y", dist.Normal(state["x"], 0.5), obs=y)

    result = ppl_scaling.pyro.smc(RandomWalk(), ys, num_particles=1000, seed=0)
    result.log_evidence        # log p(y_1..n), which Pyro's SMCFilter does not give
    result.particles["x"]      # the final state dict, one row per particle

Underneath, each call runs inside ``pyro.plate("particles", N)``, so every site is
batched over particles (the particle dimension is ``-1 - max_plate_nesting``; ``state``
tensors have it leading). The program splits into the two halves of ``Tilted``:

- ``PyroDynamics``: its latent moves. Unobserved sites are drawn from the prior, or from
  ``guide`` (an object with the same ``init`` / ``step`` methods, which may read but not
  write ``state``); the dynamics' own logG is the guide correction
  Σ_guided log p(z) - log q(z) (0 without a guide). Its state (``PyroState``) also carries
  the cumulative log-likelihood ℓ_t = Σ_{s<=t} (Σ_observed log p(y | ...) + Σ_factor f).
- the potential: ℓ_t itself (``LOG_LIKELIHOOD``, the identity on ``view`` = ℓ_t), through the
  ``difference`` shape at lam = 1: G_t = exp(ℓ_t - ℓ_{t-1}), the sites of step t.

So each step's log potential is, as in the program,

    logG_t = Σ_observed log p(y | ...) + Σ_factor f + Σ_guided (log p(z) - log q(z)),

and the target at step t is the filtering posterior p(x_{0:t} | y_{1:t}).

Randomness: Pyro samples from torch's global generator, so each call runs under
``torch.random.fork_rng`` seeded from the run's numpy ``rng``; global state is restored.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Sequence

import numpy as np
import torch

import pyro
from pyro import poutine

from .fk import Dynamics
from .potentials import Potential
from .result import SMCResult
from .rng import as_generator, torch_global_seed
from .smc import SMC
from .state import take, where
from .tilt import Tilted

__all__ = ["PyroState", "PyroDynamics", "LOG_LIKELIHOOD", "feynman_kac", "smc"]

LOG_LIKELIHOOD = Potential.from_callable(np.asarray, name="log-likelihood")
"""The potential of a ``PyroDynamics`` view: its log-value is the cumulative log-likelihood ℓ_t."""


@dataclass(frozen=True, eq=False)
class PyroState:
    """N particles of a Pyro program: its ``state`` dict (tensors with a leading particle
    dimension), the cumulative log-likelihood ℓ_t and the guide correction of the latest move."""

    values: dict[str, Any]
    log_likelihood: np.ndarray   # (N,) ℓ_t: observed and factor sites of steps 0..t
    log_correction: np.ndarray   # (N,) Σ_guided log p(z) - log q(z) of the latest move

    @property
    def num_particles(self) -> int:
        return int(self.log_likelihood.shape[0])

    def take(self, idx: np.ndarray) -> PyroState:
        return PyroState(take(self.values, idx), self.log_likelihood[idx], self.log_correction[idx])

    def where(self, mask: np.ndarray, other: PyroState) -> PyroState:
        return PyroState(where(mask, self.values, other.values), np.where(mask, self.log_likelihood,
                         other.log_likelihood), np.where(mask, self.log_correction, other.log_correction))


class PyroDynamics(Dynamics):
    """The latent moves of a Pyro ``init``/``step`` program over ``observations`` (module
    docstring): M0 runs ``init``, M at step t runs ``step`` on observation t - 1; logG is the
    guide correction; ``view`` is the cumulative log-likelihood ℓ_t."""

    def __init__(self, model: Any, observations: Sequence[Any], guide: Any = None, max_plate_nesting: int = 0) -> None:
        for obj, role in ((model, "model"), (guide, "guide")):
            if obj is not None and not (callable(getattr(obj, "init", None)) and callable(getattr(obj, "step", None))):
                raise TypeError(f"the {role} must have methods init(state) and step(state, y); "
                                f"got {type(obj).__name__}")
        self.model, self.guide = model, guide
        self.observations = observations
        self.particle_dim = -1 - int(max_plate_nesting)
        self.T = len(observations) + 1

    def M0(self, N: int, rng: np.random.Generator) -> PyroState:
        return self._run("init", {}, (), np.zeros(N), rng)

    def M(self, t: int, xp: PyroState, rng: np.random.Generator) -> PyroState:
        return self._run("step", dict(xp.values), (self.observations[t - 1],), xp.log_likelihood, rng)

    def logG(self, t: int, xp: PyroState | None, x: PyroState) -> np.ndarray:
        return x.log_correction

    def view(self, t: int, x: PyroState) -> np.ndarray:
        return x.log_likelihood

    def _plated(self, fn: Callable[..., Any], N: int) -> Callable[..., Any]:
        def in_plate(*args: Any) -> Any:
            with pyro.plate("particles", N, dim=self.particle_dim):
                return fn(*args)

        return in_plate

    def _run(self, method: str, state: dict, args: tuple, log_likelihood: np.ndarray,
             rng: np.random.Generator) -> PyroState:
        N = log_likelihood.shape[0]
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
        lik = torch.zeros(N, dtype=torch.float64)
        correction = torch.zeros(N, dtype=torch.float64)
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                lik = lik + self._per_particle(site["log_prob"], N)
            elif guide_trace is not None and name in guide_trace.nodes:
                correction = correction + self._per_particle(site["log_prob"], N) \
                    - self._per_particle(guide_trace.nodes[name]["log_prob"], N)
        bad = [k for k, v in state.items() if not (torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == N)]
        if bad:
            raise ValueError(f"state entries {bad} written by {method}() are not tensors with a leading particle "
                             f"dimension of size {N}; everything that depends on a particle must live in state")
        return PyroState(state, log_likelihood + lik.detach().numpy(), correction.detach().numpy())

    def _per_particle(self, log_prob: torch.Tensor, N: int) -> torch.Tensor:
        """Reduce a site's log-prob to one value per particle (sum over inner plates)."""
        lp = torch.as_tensor(log_prob, dtype=torch.float64)
        inner = -1 - self.particle_dim
        if inner and lp.dim() >= inner:
            lp = lp.sum(dim=tuple(range(-inner, 0)))
        lp = lp.reshape((-1,) + tuple(lp.shape[-1:])) if lp.dim() else lp.reshape(1, 1)
        return torch.broadcast_to(lp, (lp.shape[0], N)).sum(0)


def feynman_kac(model: Any, observations: Sequence[Any], *, guide: Any = None, max_plate_nesting: int = 0) -> Tilted:
    """The FK model of a Pyro program: its dynamics tilted by its likelihood,
    ``Tilted(PyroDynamics(...), LOG_LIKELIHOOD, shape="difference", lam=1)``."""
    dynamics = PyroDynamics(model, observations, guide=guide, max_plate_nesting=max_plate_nesting)
    return Tilted(dynamics, LOG_LIKELIHOOD, shape="difference", lam=1.0)


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

    Returns an ``SMCResult`` whose ``particles`` (and ``history`` entries) are the program's
    ``state`` dicts and whose ``log_evidence`` estimates log p(observations) without bias.
    """
    fk = feynman_kac(model, observations, guide=guide, max_plate_nesting=max_plate_nesting)
    result = SMC(fk, num_particles, ess_threshold=ess_threshold, resampling=resampling,
                 store_history=store_history, progress=progress).run(as_generator(seed, rng))
    history = None if result.history is None else [h.base.values for h in result.history]
    return dataclasses.replace(result, particles=result.particles.base.values, history=history)
