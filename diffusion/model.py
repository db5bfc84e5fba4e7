"""The Feynman-Kac model of a reverse diffusion (FK steering, Singhal et al. 2025).

Target: the base sampler's distribution p(x) tilted by a reward,

    pi(x) ∝ p(x) exp(lam * r(decode(x))),

reached by SMC over the denoising chain. With K = ``num_inference_steps`` scheduler
timesteps tau_0 > tau_1 > ... > tau_{K-1} the FK model has T = K + 1 steps, noisiest first::

    FK step t      state                      transition                     NFEs
    t = 0          x ~ N(0, I) at tau_0       M0: draw the noise              1
    1 <= t < K     x at level tau_t           M: one reverse step from tau_{t-1}  1
    t = K (final)  the clean sample x_0       M: last reverse step             0

Each state carries the denoiser output at its own level and the x0 prediction
x0_hat(x_t) computed from it, so a step costs one denoiser evaluation and the
potential of step t scores the state *at* step t. The potential is an FK shape
(``ppl_scaling.shapes``: difference / max / sum / last, with the terminal
correction) applied to the intermediate reward r_t:

    intermediate="x0"     r_t = r(decode(x0_hat(x_t)))                  (FK's default)
    intermediate="many"   r_t = (1/lam) log (1/n) Σ_i exp(lam r(decode(x0_i))),
                          x0_i = x0_hat + s_t ξ_i,  ξ_i ~ N(0, I),  s_t² = 1 - ᾱ_t by default
                          (a Monte Carlo estimate of the soft value (1/lam) log E[exp(lam r(x0)) | x_t]
                          under a Gaussian posterior of x0; s_t² = 1 - ᾱ_t is the exact posterior
                          variance for standard-normal data; pass ``x0_std`` to change it)
    a callable f(x_t, timestep) -> (N,)   a learned or hand-made intermediate reward

and at the final step r = r(decode(x_0)) of the sample itself. The product of all
potentials is exp(lam r(x_0)) for every shape, so the final target is the tilted one.

Resampling. ``smc(..., resample_at=S)`` resamples at the *start* of step t in S, that is
the population at level tau_{t-1}, weighted by potentials up to step t-1, right before it
is denoised from tau_{t-1}. FK-Diffusion-Steering's loop index i (0 = first, noisiest
scheduler step) therefore maps to t = i + 1: ``fk_schedule`` builds such schedules, and
``potential_at`` restricts reward evaluations to the steps that feed a resampling
(FK's sparse schedules), the final step always included. Example: FK's evaluation defaults
(100 steps, every 5 from 5 to 30) are ``resample_at = fk_schedule(100, every=5, start=5, end=30)``
= [6, 11, ..., 31] with ``potential_at = potential_steps(resample_at)`` = [5, 10, ..., 30] (+ 100).

Randomness: every step draws one ``torch.Generator`` from the numpy ``rng``; the noise of
all particles comes from it, so a run is reproducible given (seed, N) but particle i's
noise depends on N. A deterministic sampler (DDIM with eta = 0) is refused: resampled
copies would stay identical.

    model = DiffusionModel(lambda x, t: unet(x, t).sample, DDPMScheduler(...), (3, 32, 32),
                           reward=brightness, lam=10.0, num_inference_steps=50)
    result = ppl_scaling.smc(model, num_particles=8, seed=0)
    images = result.particles.x
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

import numpy as np
import torch

from ppl_scaling.errors import PotentialError
from ppl_scaling.fk import FeynmanKac
from ppl_scaling.rng import torch_generator
from ppl_scaling.shapes import FKShape
from ppl_scaling.state import num_particles, take

Denoiser = Callable[..., Any]
Reward = Callable[[Any], Any]

_STOCHASTIC_WITH_ETA = ("DDIMScheduler", "DDIMParallelScheduler")
_STOCHASTIC = ("DDPMScheduler", "DDPMParallelScheduler")


def _as_tensor_output(out: Any) -> torch.Tensor:
    """A denoiser may return a tensor, a diffusers output (``.sample``) or a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"denoiser returned {type(out).__name__}; expected a torch.Tensor (or an object with .sample)")


def as_rewards(values: Any, n: int, what: str = "reward") -> np.ndarray:
    """Validate a reward's output: float64 numpy array of shape (n,), no NaN or +inf."""
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu").double().numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != (n,):
        raise PotentialError(f"{what} returned shape {arr.shape} for a batch of {n} samples; "
                             f"it must return one float per sample, shape ({n},)")
    if np.isnan(arr).any():
        raise PotentialError(f"{what} returned NaN for {int(np.isnan(arr).sum())} of {n} samples; "
                             "return -inf to reject a sample, or fix the reward")
    if np.isposinf(arr).any():
        raise PotentialError(f"{what} returned +inf; rewards must be finite or -inf")
    return arr


class CountedReward:
    """``reward(decode(x))`` on a batch, validated and counted (``evals`` samples, ``calls`` batches)."""

    def __init__(self, reward: Reward, decode: Callable[[Any], Any] | None = None) -> None:
        if not callable(reward):
            raise TypeError(f"reward must be callable (batch of samples -> (N,) rewards), got {type(reward).__name__}")
        self.reward = reward
        self.decode = decode
        self.evals = 0
        self.calls = 0

    def __call__(self, x0: torch.Tensor, what: str = "reward") -> np.ndarray:
        n = int(x0.shape[0])
        with torch.no_grad():
            values = self.reward(x0 if self.decode is None else self.decode(x0))
        self.evals += n
        self.calls += 1
        return as_rewards(values, n, what)


class ReverseProcess:
    """One reverse-diffusion chain on a diffusers scheduler, with a counted denoiser.

    Owns a private copy of the scheduler (diffusers schedulers are stateful);
    ``start()`` resets it. Level index i = 0..K: the state after i reverse steps,
    at timestep ``timesteps[i]`` (i < K) or clean (i = K).
    """

    def __init__(self, denoiser: Denoiser, scheduler: Any, sample_shape: Iterable[int], *,
                 num_inference_steps: int = 50, eta: float = 1.0, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if not callable(denoiser):
            raise TypeError(f"denoiser must be callable as denoiser(x_t, t), got {type(denoiser).__name__}")
        if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if not hasattr(scheduler, "step") or not hasattr(scheduler, "set_timesteps"):
            raise TypeError(f"scheduler must be a diffusers scheduler (step, set_timesteps), got {type(scheduler).__name__}")
        self.denoiser = denoiser
        self.scheduler = type(scheduler).from_config(scheduler.config)
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.K = int(num_inference_steps)
        self.eta = float(eta)
        self.device = torch.device(device)
        self.dtype = dtype
        self._eta_kw = {"eta": self.eta} if type(scheduler).__name__ in _STOCHASTIC_WITH_ETA else {}
        self.nfe = 0
        self.calls = 0
        self.start()

    @property
    def stochastic(self) -> bool:
        name = type(self.scheduler).__name__
        return name in _STOCHASTIC or (name in _STOCHASTIC_WITH_ETA and self.eta > 0)

    def start(self) -> None:
        """Fresh scheduler state for a new chain."""
        self.scheduler.set_timesteps(self.K, device=self.device)
        self.timesteps = self.scheduler.timesteps

    def alpha_bar(self, i: int) -> float:
        """ᾱ at level index i (1 or the scheduler's final value at i = K)."""
        if i < self.K:
            return float(self.scheduler.alphas_cumprod[int(self.timesteps[i])])
        return float(getattr(self.scheduler, "final_alpha_cumprod", 1.0))

    def noise(self, N: int, generator: torch.Generator) -> torch.Tensor:
        x = torch.randn((N, *self.sample_shape), generator=generator, device=generator.device, dtype=self.dtype)
        return x.to(self.device) * self.scheduler.init_noise_sigma

    def predict(self, x: torch.Tensor, i: int, cond: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Denoiser output at level i and the x0 prediction the scheduler would make from it."""
        t = self.timesteps[i]
        inp = self.scheduler.scale_model_input(x, t)
        with torch.no_grad():
            out = _as_tensor_output(self.denoiser(inp, t) if cond is None else self.denoiser(inp, t, cond))
        self.nfe += int(x.shape[0])
        self.calls += 1
        if out.shape[0] != x.shape[0] or out.shape[2:] != x.shape[2:] or out.shape[1] not in (x.shape[1], 2 * x.shape[1]):
            raise ValueError(f"denoiser returned shape {tuple(out.shape)} for input of shape {tuple(x.shape)}; "
                             f"sample_shape={self.sample_shape} must be the denoiser's input shape (without the batch axis)")
        return out, self.predict_x0(out, i, x)

    def predict_x0(self, out: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """x0_hat from the model output, as ``scheduler.step`` computes it (clip / threshold included)."""
        cfg = self.scheduler.config
        if out.shape[1] == 2 * x.shape[1]:  # learned variance: first half is the prediction
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
            return self.scheduler._threshold_sample(x0)
        if getattr(cfg, "clip_sample", False):
            return x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        return x0

    def step(self, out: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One reverse step from level i to level i + 1."""
        res = self.scheduler.step(out, self.timesteps[i], x, generator=generator, return_dict=True, **self._eta_kw)
        return res.prev_sample

    def run(self, x: torch.Tensor, i_from: int, i_to: int, rng: np.random.Generator, cond: Any = None) -> torch.Tensor:
        """Denoise x from level ``i_from`` to level ``i_to`` (plain sampling, no potentials)."""
        for i in range(i_from, i_to):
            out, _ = self.predict(x, i, cond)
            x = self.step(out, i, x, torch_generator(rng, self.device.type))
        return x


@dataclass
class DiffusionState:
    """A batch of N diffusion particles at one FK step (fields share the particle axis)."""

    x: torch.Tensor                        # x_t, (N, *sample_shape); the clean sample at the final step
    x0: torch.Tensor                       # x0 prediction at x (x itself at the final step)
    model_output: torch.Tensor | None      # denoiser output at x (None at the final step)
    reward: np.ndarray                     # latest evaluated intermediate reward (nan before the first)
    acc: dict[str, np.ndarray]             # FK shape accumulators
    log_potential: np.ndarray              # logG of this step
    cond: Any = None                       # per-particle conditioning, resampled with x

    @property
    def num_particles(self) -> int:
        return int(self.x.shape[0])

    def take(self, idx: np.ndarray) -> "DiffusionState":
        i = torch.as_tensor(idx, device=self.x.device)
        return DiffusionState(
            x=self.x[i], x0=self.x0[i], model_output=None if self.model_output is None else self.model_output[i],
            reward=self.reward[idx], acc=take(self.acc, idx), log_potential=self.log_potential[idx],
            cond=None if self.cond is None else take(self.cond, idx))


class DiffusionModel(FeynmanKac):
    """FK model of a stochastic reverse diffusion steered by ``reward``; see the module docstring.

    ``denoiser(x_t, timestep)`` (or ``denoiser(x_t, timestep, cond)`` when ``cond`` is given)
    returns the scheduler's ``prediction_type`` output. ``cond``: optional per-particle
    conditioning with N rows (tensor, dict or tuple of tensors), reindexed together with the
    latents on resampling. ``reward=None`` or ``lam=0`` gives the base sampler with equal weights.
    ``potential_at``: FK steps at which the intermediate reward is evaluated (default: all);
    the final step T-1 = K is always added.
    """

    def __init__(self, denoiser: Denoiser, scheduler: Any, sample_shape: Iterable[int], *,
                 reward: Reward | None = None, potential: str = "difference", lam: float = 1.0,
                 num_inference_steps: int = 50, eta: float = 1.0, decode: Callable[[Any], Any] | None = None,
                 intermediate: str | Callable[[torch.Tensor, Any], Any] = "x0", num_x0_samples: int = 4,
                 x0_std: float | Callable[[float], float] | None = None,
                 potential_at: Iterable[int] | None = None, cond: Any = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.process = ReverseProcess(denoiser, scheduler, sample_shape, num_inference_steps=num_inference_steps,
                                      eta=eta, device=device, dtype=dtype)
        if not self.process.stochastic:
            name = type(scheduler).__name__
            if name in _STOCHASTIC_WITH_ETA:
                raise ValueError(f"{name} with eta={eta} is deterministic: resampled copies would stay identical. "
                                 "Use eta > 0 (eta=1.0 is DDPM-like), or a DDPMScheduler")
            raise ValueError(f"{name} is not supported as a stochastic sampler: resampling needs a stochastic "
                             "reverse step. Use DDPMScheduler.from_config(scheduler.config) or "
                             "DDIMScheduler.from_config(scheduler.config) with eta > 0")
        if intermediate not in ("x0", "many") and not callable(intermediate):
            raise ValueError(f"intermediate must be 'x0', 'many' or a callable f(x_t, timestep), got {intermediate!r}")
        if intermediate == "many" and (not isinstance(num_x0_samples, (int, np.integer)) or num_x0_samples < 1):
            raise ValueError(f"num_x0_samples must be a positive integer, got {num_x0_samples!r}")
        self.K = self.process.K
        self.T = self.K + 1
        self.shape = FKShape(potential, float(lam))
        self.lam = float(lam)
        self.reward = None if reward is None else CountedReward(reward, decode)
        self.intermediate = intermediate
        self.num_x0_samples = int(num_x0_samples)
        self.x0_std = x0_std
        if potential_at is None:
            self.potential_at = frozenset(range(self.T))
        else:
            steps = frozenset(int(t) for t in potential_at)
            bad = sorted(t for t in steps if not 0 <= t < self.T)
            if bad:
                raise ValueError(f"potential_at steps {bad} are outside 0..{self.T - 1} (T = num_inference_steps + 1)")
            self.potential_at = steps | {self.K}
        self.cond = cond
        self.intermediate_calls = 0

    # -- FK interface -------------------------------------------------------------------
    def M0(self, N: int, rng: np.random.Generator) -> DiffusionState:
        self.process.start()
        if self.cond is not None:
            n = num_particles(self.cond)
            if n != N:
                raise ValueError(f"cond has {n} rows but the run has {N} particles; give one row per particle")
        x = self.process.noise(N, torch_generator(rng, self.process.device.type))
        return self._state(0, x, self.cond, self.shape.init(N), np.full(N, np.nan), rng)

    def M(self, t: int, xp: DiffusionState, rng: np.random.Generator) -> DiffusionState:
        x = self.process.step(xp.model_output, t - 1, xp.x, torch_generator(rng, self.process.device.type))
        return self._state(t, x, xp.cond, xp.acc, xp.reward, rng)

    def logG(self, t: int, xp: DiffusionState | None, x: DiffusionState) -> np.ndarray:
        return x.log_potential

    def counters(self) -> dict[str, int]:
        return {"nfe": self.process.nfe, "denoiser_calls": self.process.calls,
                "reward_evals": 0 if self.reward is None else self.reward.evals,
                "reward_calls": 0 if self.reward is None else self.reward.calls,
                "intermediate_calls": self.intermediate_calls}

    # -- pieces -------------------------------------------------------------------------
    def _state(self, t: int, x: torch.Tensor, cond: Any, acc: dict, reward: np.ndarray,
               rng: np.random.Generator) -> DiffusionState:
        final = t == self.K
        if final:
            out, x0 = None, x
        else:
            out, x0 = self.process.predict(x, t, cond)
        state = DiffusionState(x=x, x0=x0, model_output=out, reward=reward, acc=acc,
                               log_potential=np.zeros(x.shape[0]), cond=cond)
        if self.reward is None or t not in self.potential_at or (self.lam == 0.0 and not final):
            return state
        r = self.reward(x, "reward") if final else self._intermediate(t, x, x0, rng)
        logG, acc = self.shape.step(acc, r, final=final)
        return replace(state, reward=r, acc=acc, log_potential=logG)

    def _intermediate(self, t: int, x: torch.Tensor, x0: torch.Tensor, rng: np.random.Generator) -> np.ndarray:
        if callable(self.intermediate):
            self.intermediate_calls += 1
            with torch.no_grad():
                return as_rewards(self.intermediate(x, self.process.timesteps[t]), x.shape[0], "intermediate reward")
        if self.intermediate == "x0":
            return self.reward(x0, "reward of the x0 prediction")
        N, n = x0.shape[0], self.num_x0_samples
        a = self.process.alpha_bar(t)
        std = (np.sqrt(1.0 - a) if self.x0_std is None
               else self.x0_std(a) if callable(self.x0_std) else float(self.x0_std))
        g = torch_generator(rng, self.process.device.type)
        xi = torch.randn((N * n, *x0.shape[1:]), generator=g, device=g.device, dtype=x0.dtype).to(x0.device)
        draws = x0.repeat_interleave(n, dim=0) + std * xi
        r = self.reward(draws, "reward of the x0 draws").reshape(N, n)
        return soft_value(r, self.lam)


def soft_value(r: np.ndarray, lam: float) -> np.ndarray:
    """(1/lam) log mean_j exp(lam r[:, j]) row-wise (the mean when lam = 0)."""
    if lam == 0.0:
        return r.mean(axis=1)
    z = lam * r
    m = np.max(z, axis=1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return (m[:, 0] + np.log(np.mean(np.exp(z - m), axis=1))) / lam


def fk_schedule(num_inference_steps: int, *, every: int = 1, start: int = 0, end: int | None = None) -> list[int]:
    """``resample_at`` steps for FK-Diffusion-Steering's (t_start, t_end, frequency) schedule.

    FK's loop indices i = start, start + every, ..., <= end (0 = noisiest scheduler step,
    ``end`` defaults to the last) map to FK steps t = i + 1 of ``DiffusionModel``: the
    population at level tau_i is resampled right before it is denoised. Indices past the
    last scheduler step are dropped; the final weights stay in the result.
    """
    K = int(num_inference_steps)
    if K < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    end = K - 1 if end is None else min(int(end), K - 1)
    return [i + 1 for i in range(max(int(start), 0), end + 1, int(every))]


def potential_steps(resample_at: Iterable[int]) -> list[int]:
    """Sparse potential schedule: the steps t - 1 whose weights feed a resampling at t."""
    return sorted({int(t) - 1 for t in resample_at if int(t) >= 1})
