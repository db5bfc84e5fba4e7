"""A reverse diffusion as dynamics (FK steering, Singhal et al. 2025).

With K = ``num_inference_steps`` scheduler timesteps (levels i = 0..K, see
``diffusion.process``) the dynamics have T = K + 1 steps, noisiest first::

    step t        state                       move                                   NFEs
    t = 0         x ~ N(0, I) at level 0      M0: draw the noise                       N
    1 <= t < K    x at level t                M: one reverse step from level t - 1     N
    t = K         the clean sample x_0        M: the last reverse step                 0

Each state carries the denoiser output at its own level and the x0 prediction x0_hat(x_t)
made from it, so a step costs one denoiser evaluation per particle (recorded as ``nfe``)
and a potential of step t reads the state *at* step t. The dynamics never see a reward:
``ppl_scaling.tilt.Tilted(model, potential, shape, lam, at)`` steers them toward

    pi(x) ∝ p(x) exp(lam r(decode(x))),       r = log-value of the potential,

through intermediate rewards r_t turned into potentials by the FK shape. What the
potential reads (``view``): ``decode(x0_hat(x_t))`` for t < K and ``decode(x_0)`` of the
sample at t = K. The ``intermediate`` option chooses r_t for t < K (``rewards``):

    "x0"       r_t = r(decode(x0_hat(x_t)))                          (FK's default; prefix)
    "many"     r_t = (1/lam) log (1/n) Σ_i exp(lam r(decode(x0_i))),  x0_i = x0_hat + s_t ξ_i,
               ξ_i ~ N(0, I), s_t² = 1 - ᾱ_t by default: a Monte Carlo estimate of the soft
               value (1/lam) log E[exp(lam r(x0)) | x_t] under a Gaussian posterior of x0
               (s_t² = 1 - ᾱ_t is its exact variance for standard-normal data; ``x0_std``
               changes it; the mean of the r(x0_i) at lam = 0). The draws come from a child
               stream of the run's generator, so trajectories do not depend on ``intermediate``.
    callable   r_t = f(x_t, timestep), a learned or hand-made intermediate reward

and r_K = r(decode(x_0)) (the potential's ``complete``), so the final target is the tilted
one for every shape. ``sample(N, rng)`` is the plain base sampler (= the untilted run).

Randomness: each step draws one ``torch.Generator`` from the numpy ``rng``; the noise of all
particles comes from it, so a run is reproducible given (seed, N). A deterministic sampler
(DDIM with eta = 0) is refused unless ``allow_deterministic=True`` (noise search, where the
sample is a function of the initial noise): resampled copies of it would stay identical.

``DenoisingDynamics`` implements all of this for any process with ``ReverseProcess``'s interface:
``DiffusionModel`` puts a diffusers scheduler under it, ``diffusion.flow.FlowMatchingModel`` the
reverse SDE of a flow-matching model (SD3, Flux).

    model = DiffusionModel(unet, DDPMScheduler(...), (3, 32, 32), num_inference_steps=50)
    result = ppl_scaling.smc(Tilted(model, brightness, lam=10.0), num_particles=8, seed=0)
    images = result.particles.x
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ppl_scaling.fk import Dynamics
from ppl_scaling.potentials import Potential
from ppl_scaling.rng import torch_generator
from ppl_scaling.state import num_particles, take

from .process import STOCHASTIC_WITH_ETA, Denoiser, ReverseProcess

__all__ = ["DenoisingDynamics", "DiffusionModel", "DiffusionState", "soft_value"]


@dataclass(frozen=True, eq=False)
class DiffusionState:
    """A batch of N diffusion particles at one step (fields share the particle axis)."""

    x: torch.Tensor                    # x_t, (N, *sample_shape); the clean sample at t = K
    x0: torch.Tensor                   # x0 prediction at x (x itself at t = K)
    model_output: torch.Tensor | None  # denoiser output at x (None at t = K)
    cond: Any = None                   # per-particle conditioning, resampled with x

    @property
    def num_particles(self) -> int:
        return int(self.x.shape[0])

    def take(self, idx: np.ndarray) -> DiffusionState:
        return DiffusionState(take(self.x, idx), take(self.x0, idx),
                              None if self.model_output is None else take(self.model_output, idx),
                              None if self.cond is None else take(self.cond, idx))


class DenoisingDynamics(Dynamics):
    """A chain of denoising steps as dynamics: the states, moves, view and rewards of the module
    docstring, for any ``process`` with the ``ReverseProcess`` interface

        K, timesteps, device         number of steps, the timestep of each level < K, the device
        start(), noise(N, generator) a fresh chain; N initial states at level 0
        predict(x, i, cond)          (model output, x0 prediction) at level i < K; records NFEs
        step(out, i, x, generator)   one step from level i to level i + 1
        alpha_bar(i)                 ᾱ of level i (the default ``x0_std`` is sqrt(1 - ᾱ))

    (``DiffusionModel``: a diffusers scheduler; ``diffusion.flow.FlowMatchingModel``: a flow SDE).
    """

    def __init__(self, process: Any, *, decode: Callable[[Any], Any] | None = None,
                 intermediate: str | Callable[[torch.Tensor, Any], Any] = "x0", num_x0_samples: int = 4,
                 x0_std: float | Callable[[float], float] | None = None, cond: Any = None) -> None:
        if not (intermediate in ("x0", "many") or callable(intermediate)):
            raise ValueError(f"intermediate must be 'x0', 'many' or a callable f(x_t, timestep), got {intermediate!r}")
        if isinstance(num_x0_samples, bool) or not isinstance(num_x0_samples, (int, np.integer)) or num_x0_samples < 1:
            raise ValueError(f"num_x0_samples must be a positive integer, got {num_x0_samples!r}")
        self.process = process
        self.K = process.K
        self.T = self.K + 1
        self.decode = decode
        self.intermediate = intermediate
        self.num_x0_samples = int(num_x0_samples)
        self.x0_std = x0_std
        self.cond = cond

    # -- the dynamics -------------------------------------------------------------------
    def M0(self, N: int, rng: np.random.Generator) -> DiffusionState:
        """N noises at level 0 (fresh scheduler state) and the denoiser's prediction there."""
        self.process.start()
        if self.cond is not None and num_particles(self.cond) != N:
            raise ValueError(f"cond has {num_particles(self.cond)} rows but the run has {N} particles; "
                             "give one row per particle")
        x = self.process.noise(N, torch_generator(rng, self.process.device.type))
        return self._state(0, x, self.cond)

    def M(self, t: int, xp: DiffusionState, rng: np.random.Generator) -> DiffusionState:
        """Reverse step from level t - 1 to level t, then the prediction at t (none at t = K)."""
        x = self.process.step(xp.model_output, t - 1, xp.x, torch_generator(rng, self.process.device.type))
        return self._state(t, x, xp.cond)

    def _state(self, t: int, x: torch.Tensor, cond: Any) -> DiffusionState:
        if t == self.K:
            return DiffusionState(x, x, None, cond)
        out, x0 = self.process.predict(x, t, cond)
        return DiffusionState(x, x0, out, cond)

    def sample(self, N: int, rng: np.random.Generator) -> torch.Tensor:
        """N samples (N, *sample_shape) of the base sampler: the plain reverse process."""
        x = self.M0(N, rng)
        for t in range(1, self.T):
            x = self.M(t, x, rng)
        return x.x

    # -- what a potential reads ---------------------------------------------------------
    def readable(self, x: torch.Tensor) -> Any:
        """``x`` as a potential reads it: ``decode(x)``, or the tensor itself."""
        if self.decode is None:
            return x
        with torch.no_grad():
            return self.decode(x)

    def view(self, t: int, x: DiffusionState) -> Any:
        """The decoded x0 predictions (t < K) or samples (t = K)."""
        return self.readable(x.x0)

    def rewards(self, t: int, x: DiffusionState, rows: np.ndarray, finished: np.ndarray, tilt: Any,
                rng: np.random.Generator) -> np.ndarray:
        """Rewards r_t of particles ``rows``, read with ``tilt.potential`` (and ``tilt.lam`` for
        "many"): of ``view`` for "x0" and samples, else as ``intermediate`` says (module docstring)."""
        if rows.size != x.num_particles:
            x = x.take(rows)
        with torch.no_grad():
            if x.model_output is None or self.intermediate == "x0":
                return tilt.potential.score(self.view(t, x), finished)
            if callable(self.intermediate):
                f, timestep = self.intermediate, self.process.timesteps[t]
                value = Potential.from_callable(lambda xs: f(xs, timestep), name="intermediate reward")
                return value.score(x.x, finished)
            n = self.num_x0_samples
            g = torch_generator(rng.spawn(1)[0], self.process.device.type)
            xi = torch.randn((rows.size * n, *x.x0.shape[1:]), generator=g, device=g.device, dtype=x.x0.dtype)
            draws = x.x0.repeat_interleave(n, dim=0) + self._x0_std(t) * xi.to(x.x0.device)
            r = tilt.potential.score(self.readable(draws), np.repeat(finished, n)).reshape(rows.size, n)
        return soft_value(r, tilt.lam)

    def _x0_std(self, t: int) -> float:
        a = self.process.alpha_bar(t)
        if self.x0_std is None:
            return float(np.sqrt(1.0 - a))
        return float(self.x0_std(a)) if callable(self.x0_std) else float(self.x0_std)


class DiffusionModel(DenoisingDynamics):
    """The reverse diffusion of ``denoiser`` on ``scheduler``, as dynamics (module docstring).

    ``denoiser(x_t, timestep)`` (``denoiser(x_t, timestep, cond)`` when ``cond`` is given)
    returns the scheduler's ``prediction_type`` output. ``decode`` maps x0 predictions and
    samples to what a potential reads (e.g. a VAE decoder; default: the tensors). ``cond``:
    optional per-particle conditioning with N rows (tensor, dict or tuple of tensors),
    reindexed with the latents on resampling.
    """

    def __init__(self, denoiser: Denoiser, scheduler: Any, sample_shape: Iterable[int], *,
                 num_inference_steps: int = 50, eta: float = 1.0, decode: Callable[[Any], Any] | None = None,
                 intermediate: str | Callable[[torch.Tensor, Any], Any] = "x0", num_x0_samples: int = 4,
                 x0_std: float | Callable[[float], float] | None = None, cond: Any = None,
                 allow_deterministic: bool = False, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        process = ReverseProcess(denoiser, scheduler, sample_shape, num_inference_steps=num_inference_steps,
                                 eta=eta, device=device, dtype=dtype)
        if not (process.stochastic or allow_deterministic):
            name = process.name
            if name in STOCHASTIC_WITH_ETA:
                raise ValueError(f"{name} with eta={eta} is deterministic: resampled copies would stay identical. "
                                 "Use eta > 0 (eta=1.0 is DDPM-like), or a DDPMScheduler "
                                 "(allow_deterministic=True for noise search)")
            raise ValueError(f"{name} is not supported as a stochastic sampler: resampling needs a stochastic "
                             "reverse step. Use DDPMScheduler.from_config(scheduler.config) or "
                             "DDIMScheduler.from_config(scheduler.config) with eta > 0")
        super().__init__(process, decode=decode, intermediate=intermediate, num_x0_samples=num_x0_samples,
                         x0_std=x0_std, cond=cond)


def soft_value(r: np.ndarray, lam: float) -> np.ndarray:
    """(1/lam) log mean_j exp(lam r[:, j]) row-wise (the mean when lam = 0)."""
    if lam == 0.0:
        return r.mean(axis=1)
    z = lam * r
    m = np.max(z, axis=1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return (m[:, 0] + np.log(np.mean(np.exp(z - m), axis=1))) / lam
