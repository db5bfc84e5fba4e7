"""Flow matching (rectified flow: SD3, Flux) as stochastic dynamics for SMC.

Convention of diffusers' ``FlowMatchEulerDiscreteScheduler``: x_t = (1 - t) x0 + t ε,
ε ~ N(0, I), flow time t from 1 (noise) to 0 (data), and the model's velocity

    v(x, t) = E[ε - x0 | x_t = x],   x0_hat = x - t v,   ε_hat = x + (1 - t) v,
    ∇log p_t(x) = -ε_hat / t                                  (Tweedie: E[ε | x_t] = -t ∇log p_t).

The flow ODE dx = v dt is deterministic, so resampled copies of a particle would stay equal.
For any diffusion coefficient g(t) >= 0 the reverse-time SDE

    dx = [v - (g²/2) ∇log p_t(x)] dt + g dW = [v + g² / (2t) (x + (1 - t) v)] dt + g dW,   dt < 0,

(dW of variance |dt|) has the ODE's marginals p_t: in its Fokker-Planck equation the score drift
-∇·(p g²/2 ∇log p) = -g²/2 Δp and the diffusion g²/2 Δp cancel. g = 0 is the ODE. One Euler-Maruyama step on the grid
1 = t_0 > t_1 > ... > t_{K-1} > t_K = 0, level i -> i + 1 with h = t_i - t_{i+1} > 0, is the
Gaussian transition

    x_{i+1} ~ N(m_i, s_i² I),   m_i = x - h [v + g² / (2t) (x + (1 - t) v)],   s_i = g(t) sqrt(h),   t = t_i,

whose log-density ``FlowMatchingModel.logpt`` gives (ancestor / backward sampling, proposal
corrections). The default coefficient is Flow-GRPO's (Liu et al. 2025), scaled by ``noise_level`` η:

    g(t)² = η² t / max(1 - t, 1 - t_1)

(the clip acts at the first step only, where t / (1 - t) diverges if t_0 = 1; g² h = η² there then).
η = 0 is the Euler ODE sampler, ``scheduler.step`` of ``FlowMatchEulerDiscreteScheduler``,
refused unless ``allow_deterministic=True``. Kim et al. 2025 (inference-time scaling for flow
models) sample particles with SDEs of this family; their best variant also converts the linear
interpolant to a variance-preserving one, which is not done here.

The grid is the scheduler's ``sigmas`` after ``set_timesteps(K)`` (its ``shift``, or a dynamic
shift ``mu`` for Flux, included; custom base ``sigmas`` such as Flux's linspace(1, 1/K, K) go
through the same shift); M0 draws x ~ N(0, I) at t_0, as diffusers' pipelines do.
``FlowMatchingModel`` is a ``DenoisingDynamics``: states, steps (T = K + 1), ``view`` (the x0
predictions x0_hat = x - t v, decoded), ``rewards`` ("x0", "many", callable) and
``sample`` are those of ``DiffusionModel``; its ᾱ_t, which sets the default ``x0_std``, is that
of the equivalent variance-preserving process x_t / sqrt((1 - t)² + t²):
ᾱ_t = (1 - t)² / ((1 - t)² + t²), so s_t² = 1 - ᾱ_t = Var(x0 | x_t) for standard-normal data.

    gmm = GaussianMixture.isotropic([0.5, 0.5], [[-1.5], [1.5]], std=0.5)
    model = FlowMatchingModel(gmm.velocity, (1,), num_inference_steps=100, noise_level=0.7)
    result = ppl_scaling.smc(Tilted(model, LinearReward([1.0]), lam=0.6), num_particles=64, seed=0)
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from .model import DenoisingDynamics, DiffusionState
from .process import DenoiserError, Denoiser, denoiser_name, evaluate_denoiser, first_nonfinite

__all__ = ["FlowProcess", "FlowMatchingModel"]

_LOG_2PI = float(np.log(2 * np.pi))


class FlowProcess:
    """One reverse SDE chain of a flow-matching ``velocity`` on a scheduler's grid (module docstring).

    Levels i = 0..K are the grid times t_i (``sigmas``; ``timesteps`` = t_0..t_{K-1}).
    ``velocity(x, t)`` (``velocity(x, t, cond)`` with ``cond``) is called with the flow time t
    as a float in (0, 1], not diffusers' ``timestep`` t * num_train_timesteps; each call is
    recorded as N NFEs.
    """

    def __init__(self, velocity: Denoiser, scheduler: Any, sample_shape: Iterable[int], *,
                 num_inference_steps: int = 28, noise_level: float = 0.7, mu: float | None = None,
                 sigmas: Iterable[float] | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if not callable(velocity):
            raise TypeError(f"velocity must be callable as velocity(x_t, t), got {type(velocity).__name__}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if not (np.isfinite(noise_level) and noise_level >= 0):
            raise ValueError(f"noise_level must be finite and >= 0, got {noise_level!r}")
        self.velocity = velocity
        self.velocity_name = denoiser_name(velocity)
        self.name = type(scheduler).__name__
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.K = int(num_inference_steps)
        self.noise_level = float(noise_level)
        self.device = torch.device(device)
        self.dtype = dtype
        scheduler = type(scheduler).from_config(scheduler.config)
        options = {} if mu is None else {"mu": float(mu)}
        if sigmas is not None:
            options["sigmas"] = [float(s) for s in sigmas]
        scheduler.set_timesteps(self.K, **options)
        sigmas = scheduler.sigmas.double().cpu().numpy()
        if sigmas.shape != (self.K + 1,) or sigmas[-1] != 0.0 or not (np.diff(sigmas) < 0).all() or sigmas[0] > 1:
            raise ValueError(f"{self.name}.sigmas must fall from at most 1 to 0 in {self.K} steps "
                             f"(rectified flow, invert_sigmas=False), got {sigmas}")
        self.sigmas = sigmas
        self.timesteps = sigmas[:-1]

    @property
    def stochastic(self) -> bool:
        """Whether a step draws fresh noise (noise_level > 0)."""
        return self.noise_level > 0

    def start(self) -> None:
        """A new chain: nothing to reset (the grid is fixed and the steps are computed here)."""

    def g2(self, i: int) -> float:
        """g(t_i)² = η² t / max(1 - t, 1 - t_1) (module docstring)."""
        t = self.sigmas[i]
        return float(self.noise_level**2 * t / max(1.0 - t, 1.0 - self.sigmas[1]))

    def alpha_bar(self, i: int) -> float:
        """ᾱ of the equivalent variance-preserving process at level i: (1 - t)² / ((1 - t)² + t²)."""
        t = self.sigmas[i]
        return float((1 - t) ** 2 / ((1 - t) ** 2 + t**2))

    def noise(self, N: int, generator: torch.Generator) -> torch.Tensor:
        """N initial states at level 0: x ~ N(0, I)."""
        x = torch.randn((N, *self.sample_shape), generator=generator, device=generator.device, dtype=self.dtype)
        return x.to(self.device)

    def predict(self, x: torch.Tensor, i: int, cond: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The velocity v at level i < K and the x0 prediction x - t_i v; records N NFEs."""
        t = float(self.sigmas[i])
        where = f"at level {i} of {self.K} (flow time t = {t:.4g}, step {i} -> {i + 1})"
        v = evaluate_denoiser(self.velocity, x, t, cond, where=where, name=self.velocity_name,
                              stepper=f"{self.name} SDE", sample_shape=self.sample_shape)
        return v, x - t * v

    def transition(self, v: torch.Tensor, i: int, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(m_i, s_i): the Gaussian N(m_i, s_i² I) of the step from level i to i + 1 at x with velocity v."""
        t, h = float(self.sigmas[i]), float(self.sigmas[i] - self.sigmas[i + 1])
        g2 = self.g2(i)
        # m = x - h [v + g² / (2t) (x + (1 - t) v)] = a x + b v, in one fused pass
        a, b = 1.0 - h * g2 / (2 * t), -h * (1.0 + g2 * (1 - t) / (2 * t))
        return torch.add(x * a, v, alpha=b), float(np.sqrt(g2 * h))

    def step(self, v: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One Euler-Maruyama step from level i to level i + 1: a draw of N(m_i, s_i² I)."""
        mean, std = self.transition(v, i, x)
        if std > 0:
            device = x.device if generator is None else generator.device
            mean = mean.add_(torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device),
                             alpha=std)
        bad = first_nonfinite(mean)
        if bad is not None:
            raise DenoiserError(f"the {self.name} SDE step from level {i} to {i + 1} of {self.K} (flow time "
                                f"{self.sigmas[i]:.4g}) returned NaN/inf for {bad[0]} of {x.shape[0]} samples "
                                f"(first: sample {bad[1]})")
        return mean


class FlowMatchingModel(DenoisingDynamics):
    """The reverse SDE of a flow-matching ``velocity`` as dynamics (module docstring).

    ``velocity(x_t, t)`` (``velocity(x_t, t, cond)`` when ``cond`` is given) returns
    v = E[ε - x0 | x_t] at flow time t (a float; a diffusers transformer wants
    ``timestep = t * 1000`` for SD3, t for Flux). ``scheduler``: a ``FlowMatchEulerDiscreteScheduler``
    (or one with its ``set_timesteps`` / ``sigmas``), default ``FlowMatchEulerDiscreteScheduler()``;
    ``shift`` overrides its shift, ``mu`` is the dynamic shift of schedulers with
    ``use_dynamic_shifting``, ``sigmas`` the K base sigmas it shifts (default: the scheduler's).
    ``noise_level`` η scales g; ``decode``, ``intermediate``, ``num_x0_samples``, ``x0_std`` and
    ``cond`` are those of ``DiffusionModel``.
    """

    def __init__(self, velocity: Denoiser, sample_shape: Iterable[int], *, scheduler: Any = None,
                 num_inference_steps: int = 28, shift: float | None = None, mu: float | None = None,
                 sigmas: Iterable[float] | None = None, noise_level: float = 0.7,
                 decode: Callable[[Any], Any] | None = None,
                 intermediate: str | Callable[[torch.Tensor, Any], Any] = "x0", num_x0_samples: int = 4,
                 x0_std: float | Callable[[float], float] | None = None, cond: Any = None,
                 allow_deterministic: bool = False, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if scheduler is None:
            from diffusers import FlowMatchEulerDiscreteScheduler

            scheduler = FlowMatchEulerDiscreteScheduler()
        if shift is not None:
            scheduler = type(scheduler).from_config(scheduler.config, shift=float(shift))
        process = FlowProcess(velocity, scheduler, sample_shape, num_inference_steps=num_inference_steps,
                              noise_level=noise_level, mu=mu, sigmas=sigmas, device=device, dtype=dtype)
        if not (process.stochastic or allow_deterministic):
            raise ValueError("noise_level=0 is the deterministic flow ODE: resampled copies would stay identical. "
                             "Use noise_level > 0 (0.7 is Flow-GRPO's), or allow_deterministic=True")
        super().__init__(process, decode=decode, intermediate=intermediate, num_x0_samples=num_x0_samples,
                         x0_std=x0_std, cond=cond)

    def logpt(self, t: int, xp: DiffusionState, x: DiffusionState) -> np.ndarray:
        """log N(x_t; m, s² I) of the step t - 1 -> t from each particle of ``xp`` (a 1-particle
        ``x`` is broadcast against them): the transition density of M, (N,) float64."""
        mean, std = self.process.transition(xp.model_output, t - 1, xp.x)
        if std == 0:
            raise ValueError(f"step {t} is deterministic (noise_level={self.process.noise_level:g}): the flow "
                             "ODE has no transition density")
        d = (x.x - mean).reshape(mean.shape[0], -1).to(torch.float64)
        D = d.shape[1]
        return (-0.5 * (d**2).sum(1) / std**2 - D * (np.log(std) + 0.5 * _LOG_2PI)).cpu().numpy()
