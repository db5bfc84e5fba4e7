"""The diffusers adapter: one reverse-diffusion chain on a diffusers scheduler.

With K = ``num_inference_steps`` scheduler timesteps tau_0 > tau_1 > ... > tau_{K-1}, *level*
i = 0..K is the state after i reverse steps: x at tau_i (i < K) or the clean sample (i = K),
with ᾱ_i = alphas_cumprod[tau_i] (ᾱ_K = 1, or the scheduler's ``final_alpha_cumprod``).

    predict(x, i)    denoiser output at level i and the x0 prediction x0_hat(x_i) the scheduler
                     makes from it (epsilon: (x - sqrt(1-ᾱ) eps) / sqrt(ᾱ); sample: out;
                     v_prediction: sqrt(ᾱ) x - sqrt(1-ᾱ) v; then clipping or dynamic thresholding)
    step(out, i, x)  one reverse step, level i -> i + 1 (``scheduler.step``)
    run(x, i, j)     denoise from level i to level j > i
    renoise(x, i, j) forward-noise from level i to a noisier level j < i: q(x_j | x_i) =
                     N(sqrt(ᾱ_j / ᾱ_i) x_i, (1 - ᾱ_j / ᾱ_i) I)

Every denoiser evaluation is recorded in the compute ledger (``nfe``, one per sample).
Outputs are checked where they are made: a denoiser output with NaN / inf raises
``DenoiserError`` naming the denoiser, the level and the timestep (not a reward error
several calls later), and so does a reverse step whose result is not finite (the scheduler).
Randomness comes from torch generators derived from a numpy ``rng`` (``torch_generator``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from ppl_scaling.ledger import record
from ppl_scaling.rng import torch_generator

__all__ = ["Denoiser", "DenoiserError", "ReverseProcess", "as_tensor_output", "dynamic_threshold", "denoiser_name",
           "evaluate_denoiser", "first_nonfinite"]

Denoiser = Callable[..., Any]

STOCHASTIC_WITH_ETA = ("DDIMScheduler", "DDIMParallelScheduler")
STOCHASTIC = ("DDPMScheduler", "DDPMParallelScheduler")


class DenoiserError(ValueError):
    """A denoiser (or a reverse step) produced NaN or infinite values."""


def denoiser_name(denoiser: Any) -> str:
    """A readable name: a function's qualified name, else the class name (e.g. UNet2DModel)."""
    fn = getattr(denoiser, "func", denoiser)  # functools.partial
    name = getattr(fn, "__qualname__", None) if callable(fn) and not isinstance(fn, torch.nn.Module) else None
    return name if isinstance(name, str) else type(denoiser).__name__


def first_nonfinite(t: torch.Tensor) -> tuple[int, int] | None:
    """(number of samples with a non-finite value, the first such sample), or None if all finite."""
    if not t.is_floating_point() and not t.is_complex():
        return None
    bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
    if not bool(bad.any()):
        return None
    return int(bad.sum()), int(bad.nonzero()[0, 0])


def evaluate_denoiser(denoiser: Denoiser, x: torch.Tensor, t: Any, cond: Any, *, where: str, name: str,
                      stepper: str, sample_shape: tuple[int, ...], learned_variance: bool = False) -> torch.Tensor:
    """``denoiser(x, t)`` (``denoiser(x, t, cond)`` when ``cond`` is given) as a tensor, without
    gradients; records N NFEs. Checks the output's shape (the input's; twice its channels with
    ``learned_variance``) and finiteness, naming the denoiser ``name``, the level ``where`` and
    the ``stepper`` whose steps made x."""
    with torch.no_grad():
        out = as_tensor_output(denoiser(x, t) if cond is None else denoiser(x, t, cond))
    record(nfe=int(x.shape[0]))
    doubled = learned_variance and out.ndim == x.ndim > 1 and out.shape[0] == x.shape[0] \
        and out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]
    if out.shape != x.shape and not doubled:
        raise ValueError(f"denoiser returned shape {tuple(out.shape)} for input of shape {tuple(x.shape)}; "
                         f"sample_shape={sample_shape} must be the denoiser's input shape "
                         "(without the batch axis)")
    bad = first_nonfinite(out)
    if bad is not None:
        if first_nonfinite(x) is not None:
            raise DenoiserError(f"the state fed to denoiser {name} {where} already holds NaN/inf "
                                f"({first_nonfinite(x)[0]} of {x.shape[0]} samples): an earlier {stepper} step "
                                "or the initial noise produced it")
        raise DenoiserError(f"denoiser {name} returned NaN/inf {where} for {bad[0]} of "
                            f"{out.shape[0]} samples (first: sample {bad[1]}), from finite inputs; check the "
                            "model's weights, dtype (float16 overflow?) and conditioning")
    return out


def as_tensor_output(out: Any) -> torch.Tensor:
    """A denoiser's output as a tensor: a tensor, a diffusers output (``.sample``) or a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"denoiser returned {type(out).__name__}; expected a torch.Tensor (or an object with .sample)")


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Saharia et al. 2022): per sample, s = clamp(q_ratio(|x0|), 1, max_value),
    the ``ratio`` quantile of |x0|; returns clip(x0, -s, s) / s."""
    flat = x0.reshape(x0.shape[0], -1)
    flat = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(1.0, max_value)[:, None]
    return (torch.maximum(torch.minimum(flat, s), -s) / s).reshape(x0.shape).to(x0.dtype)


class ReverseProcess:
    """One reverse-diffusion chain (module docstring). Owns a private copy of the scheduler
    (diffusers schedulers are stateful); ``start()`` resets it for a new chain."""

    def __init__(self, denoiser: Denoiser, scheduler: Any, sample_shape: Iterable[int], *,
                 num_inference_steps: int = 50, eta: float = 1.0, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if not callable(denoiser):
            raise TypeError(f"denoiser must be callable as denoiser(x_t, t), got {type(denoiser).__name__}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if not hasattr(scheduler, "step") or not hasattr(scheduler, "set_timesteps"):
            raise TypeError(f"scheduler must be a diffusers scheduler (step, set_timesteps), "
                            f"got {type(scheduler).__name__}")
        self.denoiser = denoiser
        self.denoiser_name = denoiser_name(denoiser)
        self.scheduler = type(scheduler).from_config(scheduler.config)
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.K = int(num_inference_steps)
        self.eta = float(eta)
        self.device = torch.device(device)
        self.dtype = dtype
        self._eta_kw = {"eta": self.eta} if type(scheduler).__name__ in STOCHASTIC_WITH_ETA else {}
        self.start()

    @property
    def name(self) -> str:
        return type(self.scheduler).__name__

    @property
    def stochastic(self) -> bool:
        """Whether a reverse step draws fresh noise (DDPM; DDIM with eta > 0)."""
        return self.name in STOCHASTIC or (self.name in STOCHASTIC_WITH_ETA and self.eta > 0)

    def start(self) -> None:
        """Fresh scheduler state for a new chain."""
        self.scheduler.set_timesteps(self.K, device=self.device)
        self.timesteps = self.scheduler.timesteps

    def alpha_bar(self, i: int) -> float:
        """ᾱ at level i (the scheduler's final value at i = K, 1 by default)."""
        if i < self.K:
            return float(self.scheduler.alphas_cumprod[int(self.timesteps[i])])
        return float(getattr(self.scheduler, "final_alpha_cumprod", 1.0))

    def noise(self, N: int, generator: torch.Generator) -> torch.Tensor:
        """N initial states at level 0: standard normal noise times ``init_noise_sigma``."""
        x = torch.randn((N, *self.sample_shape), generator=generator, device=generator.device, dtype=self.dtype)
        return x.to(self.device) * self.scheduler.init_noise_sigma

    def predict(self, x: torch.Tensor, i: int, cond: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Denoiser output at level i < K and the x0 prediction made from it; records N NFEs."""
        t = self.timesteps[i]
        where = f"at level {i} of {self.K} (scheduler timestep {int(t)}, reverse step {i} -> {i + 1})"
        out = evaluate_denoiser(self.denoiser, self.scheduler.scale_model_input(x, t), t, cond,
                                where=where, name=self.denoiser_name, stepper=self.name,
                                sample_shape=self.sample_shape, learned_variance=True)
        return out, self.predict_x0(out, i, x)

    def predict_x0(self, out: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """x0_hat from the model output at level i, as ``scheduler.step`` computes it
        (clipping to ±``clip_sample_range`` or dynamic thresholding included)."""
        cfg = self.scheduler.config
        if out.shape[1] == 2 * x.shape[1]:  # learned variance: the first half is the prediction
            out = out[:, : x.shape[1]]
        a = self.scheduler.alphas_cumprod[int(self.timesteps[i])].to(x.device)
        b = 1 - a
        kind = cfg.prediction_type
        if kind == "epsilon":
            x0 = (x - b.sqrt() * out) / a.sqrt()
        elif kind == "sample":
            x0 = out
        elif kind == "v_prediction":
            x0 = a.sqrt() * x - b.sqrt() * out
        else:
            raise ValueError(f"unsupported prediction_type {kind!r}; use epsilon, sample or v_prediction")
        if getattr(cfg, "thresholding", False):
            return dynamic_threshold(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        if getattr(cfg, "clip_sample", False):
            return x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        return x0

    def step(self, out: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One reverse step from level i to level i + 1, given the denoiser output ``out`` at x."""
        res = self.scheduler.step(out, self.timesteps[i], x, generator=generator, return_dict=True, **self._eta_kw)
        bad = first_nonfinite(res.prev_sample)
        if bad is not None:
            finite = first_nonfinite(out) is None and first_nonfinite(x) is None
            raise DenoiserError(f"{self.name}.step from level {i} to {i + 1} of {self.K} (scheduler timestep "
                                f"{int(self.timesteps[i])}) returned NaN/inf for {bad[0]} of {x.shape[0]} samples "
                                f"(first: sample {bad[1]}); its inputs were {'finite' if finite else 'not finite'}")
        return res.prev_sample

    def run(self, x: torch.Tensor, i_from: int, i_to: int, rng: np.random.Generator,
            cond: Any = None) -> torch.Tensor:
        """Denoise x from level ``i_from`` to level ``i_to`` (one torch generator per step from ``rng``)."""
        for i in range(i_from, i_to):
            out, _ = self.predict(x, i, cond)
            x = self.step(out, i, x, torch_generator(rng, self.device.type))
        return x

    def renoise(self, x: torch.Tensor, i: int, j: int, rng: np.random.Generator) -> torch.Tensor:
        """Forward-noise x from level i to the noisier level j <= i: a draw of q(x_j | x_i)."""
        if not 0 <= j <= i <= self.K:
            raise ValueError(f"renoise goes from level i to a noisier level j <= i, got i={i}, j={j}")
        ratio = self.alpha_bar(j) / self.alpha_bar(i)
        g = torch_generator(rng, self.device.type)
        xi = torch.randn(x.shape, generator=g, device=g.device, dtype=x.dtype).to(x.device)
        return np.sqrt(ratio) * x + np.sqrt(1.0 - ratio) * xi
