"""Baselines for reward steering on the same interface as ``fk_steering``.

Every function takes ``(denoiser, scheduler, sample_shape, reward)`` plus keyword
options, and returns a ``SamplingResult`` whose ``compute`` counts NFEs (per-sample
denoiser evaluations) and reward evaluations, so methods compare at equal compute.

    best_of_n            n independent chains, keep the best by reward (FK's ``bon``);
                         with a deterministic sampler (DDIM eta=0) it is Ma et al.'s
                         random search over initial noise (alias ``random_search``)
    importance_sampling  n chains weighted by exp(lam r(x)): FK steering without resampling
    svdd                 SVDD-PM (Li et al. 2024): at each step draw ``num_candidates`` next
                         states per particle, keep the best by r(x0_hat) (argmax, alpha=0)
                         or draw one ∝ exp(r / alpha); no interaction between particles
    zero_order_search    Ma et al. 2025: from a pivot noise, try ``num_candidates`` noises
                         sqrt(1 - s²) pivot + s ξ, move to the best, repeat ``rounds`` times
    search_over_paths    Ma et al. 2025: denoise N paths to a level; per round re-noise each
                         ``num_branches`` times by ``forward`` steps, denoise ``backward``
                         steps (> forward), keep the N best by r(x0_hat); a greedy beam search

Only ``importance_sampling`` returns non-uniform weights; the others are search methods
without a target distribution (their ``best`` is the sample of highest reward).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from ppl_scaling.rng import as_generator, torch_generator
from ppl_scaling.smc import smc
from ppl_scaling.state import take

from .model import CountedReward, Denoiser, DiffusionModel, Reward, ReverseProcess
from .steering import SamplingResult, from_smc


class _Chains:
    """A ``ReverseProcess`` plus a counted reward: the engine of the search baselines."""

    def __init__(self, denoiser: Denoiser, scheduler: Any, sample_shape: Any, reward: Reward, *,
                 num_inference_steps: int, eta: float, decode: Callable[[Any], Any] | None,
                 device: str | torch.device, dtype: torch.dtype) -> None:
        self.process = ReverseProcess(denoiser, scheduler, sample_shape, num_inference_steps=num_inference_steps,
                                      eta=eta, device=device, dtype=dtype)
        self.reward = CountedReward(reward, decode)
        self.K = self.process.K

    def noise(self, n: int, rng: np.random.Generator) -> torch.Tensor:
        return self.process.noise(n, torch_generator(rng, self.process.device.type))

    def score(self, x: torch.Tensor, i: int) -> np.ndarray:
        """Reward of the sample (i = K) or of the x0 prediction at level i (one NFE each)."""
        if i == self.K:
            return self.reward(x)
        return self.reward(self.process.predict(x, i)[1], "reward of the x0 prediction")

    def renoise(self, x: torch.Tensor, i: int, j: int, rng: np.random.Generator) -> torch.Tensor:
        """Forward-noise x from level i back to the noisier level j < i: q(x_j | x_i)."""
        ratio = self.process.alpha_bar(j) / self.process.alpha_bar(i)
        g = torch_generator(rng, self.process.device.type)
        xi = torch.randn(x.shape, generator=g, device=g.device, dtype=x.dtype).to(x.device)
        return np.sqrt(ratio) * x + np.sqrt(1.0 - ratio) * xi

    def compute(self) -> dict[str, int]:
        return {"nfe": self.process.nfe, "denoiser_calls": self.process.calls,
                "reward_evals": self.reward.evals, "reward_calls": self.reward.calls}

    def result(self, samples: torch.Tensor, rewards: np.ndarray, **info: Any) -> SamplingResult:
        return SamplingResult(samples=samples, rewards=rewards, log_weights=np.zeros(len(rewards)),
                              compute=self.compute(), info=info)


def best_of_n(denoiser: Denoiser, scheduler: Any, sample_shape: Any, reward: Reward, *, n: int,
              num_inference_steps: int = 50, eta: float = 1.0, decode: Callable[[Any], Any] | None = None,
              seed: int | None = None, rng: np.random.Generator | None = None,
              device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> SamplingResult:
    """``n`` independent samples and their rewards; ``best`` is the highest-reward one."""
    rng = as_generator(seed, rng)
    ch = _Chains(denoiser, scheduler, sample_shape, reward, num_inference_steps=num_inference_steps, eta=eta,
                 decode=decode, device=device, dtype=dtype)
    x = ch.process.run(ch.noise(n, rng), 0, ch.K, rng)
    return ch.result(x, ch.score(x, ch.K), method="best_of_n")


random_search = best_of_n


def importance_sampling(denoiser: Denoiser, scheduler: Any, sample_shape: Any, reward: Reward, *, n: int,
                        lam: float = 1.0, num_inference_steps: int = 50, eta: float = 1.0,
                        decode: Callable[[Any], Any] | None = None, seed: int | None = None,
                        rng: np.random.Generator | None = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> SamplingResult:
    """``n`` base samples with self-normalised weights ∝ exp(lam r(x)) (reward at the end only)."""
    model = DiffusionModel(denoiser, scheduler, sample_shape, reward=reward, lam=lam,
                           num_inference_steps=num_inference_steps, eta=eta, decode=decode,
                           potential_at=[], device=device, dtype=dtype)
    res = smc(model, n, ess_threshold=0.0, seed=seed, rng=rng)
    return from_smc(res, method="importance_sampling", lam=lam)


def svdd(denoiser: Denoiser, scheduler: Any, sample_shape: Any, reward: Reward, *, num_particles: int,
         num_candidates: int = 4, alpha: float = 0.0, num_inference_steps: int = 50, eta: float = 1.0,
         decode: Callable[[Any], Any] | None = None, seed: int | None = None,
         rng: np.random.Generator | None = None, device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float32) -> SamplingResult:
    """SVDD-PM local value search: per step and particle, ``num_candidates`` proposals scored by
    r(x0_hat) at their level; keep the argmax (``alpha=0``) or draw one ∝ exp(r / alpha)."""
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0 (0 = argmax), got {alpha}")
    rng = as_generator(seed, rng)
    model = DiffusionModel(denoiser, scheduler, sample_shape, reward=reward, lam=1.0 / alpha if alpha > 0 else 1.0,
                           num_inference_steps=num_inference_steps, eta=eta, decode=decode,
                           potential_at=range(1, num_inference_steps + 1), device=device, dtype=dtype)
    N, M = int(num_particles), int(num_candidates)
    state = model.M0(N, rng)
    for t in range(1, model.T):
        cand = model.M(t, take(state, np.repeat(np.arange(N), M)), rng)
        v = cand.reward.reshape(N, M)
        if alpha == 0.0:
            pick = np.argmax(v, axis=1)
        else:
            z = (v - v.max(axis=1, keepdims=True)) / alpha
            p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
            pick = np.array([rng.choice(M, p=row) for row in p])
        state = take(cand, np.arange(N) * M + pick)
    compute = {k: v for k, v in model.counters().items() if k != "intermediate_calls"}
    return SamplingResult(samples=state.x, rewards=state.reward, log_weights=np.zeros(N), compute=compute,
                          info={"method": "svdd", "num_candidates": M, "alpha": alpha})


def zero_order_search(denoiser: Denoiser, scheduler: Any, sample_shape: Any, reward: Reward, *,
                      num_candidates: int = 4, rounds: int = 4, step_size: float = 0.5,
                      num_inference_steps: int = 50, eta: float = 0.0, decode: Callable[[Any], Any] | None = None,
                      seed: int | None = None, rng: np.random.Generator | None = None,
                      device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> SamplingResult:
    """Zero-order search over the initial noise (Ma et al. 2025). Returns the best sample after
    each round (``rounds + 1`` samples, the first from the initial pivot). Meant for a
    deterministic sampler (DDIM, ``eta=0``), where the sample is a function of the noise."""
    if not 0.0 < step_size <= 1.0:
        raise ValueError(f"step_size must be in (0, 1], got {step_size}")
    rng = as_generator(seed, rng)
    ch = _Chains(denoiser, scheduler, sample_shape, reward, num_inference_steps=num_inference_steps, eta=eta,
                 decode=decode, device=device, dtype=dtype)
    pivot = ch.noise(1, rng)
    x = ch.process.run(pivot, 0, ch.K, rng)
    best_x, best_r = x, ch.score(x, ch.K)
    samples, rewards = [best_x], [best_r[0]]
    for _ in range(rounds):
        cand = np.sqrt(1.0 - step_size**2) * pivot + step_size * ch.noise(num_candidates, rng)
        x = ch.process.run(cand, 0, ch.K, rng)
        r = ch.score(x, ch.K)
        j = int(np.argmax(r))
        if r[j] > best_r[0]:
            pivot, best_x, best_r = cand[j: j + 1], x[j: j + 1], r[j: j + 1]
        samples.append(best_x)
        rewards.append(best_r[0])
    return ch.result(torch.cat(samples), np.asarray(rewards), method="zero_order_search")


def search_over_paths(denoiser: Denoiser, scheduler: Any, sample_shape: Any, reward: Reward, *,
                      num_paths: int = 4, num_branches: int = 4, start: int | None = None,
                      backward: int | None = None, forward: int | None = None, num_inference_steps: int = 50,
                      eta: float = 0.0, decode: Callable[[Any], Any] | None = None, seed: int | None = None,
                      rng: np.random.Generator | None = None, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> SamplingResult:
    """Search over paths (Ma et al. 2025), in level-index units (0 = pure noise, K = clean).

    Denoise ``num_paths`` noises to level ``start`` (default K // 5); then repeatedly re-noise
    each path ``num_branches`` times from level i to i - ``forward``, denoise to
    i - forward + ``backward`` (default backward = K // 10, forward = backward // 2), and keep
    the ``num_paths`` best by the reward of the x0 prediction, until the clean level.
    """
    K = int(num_inference_steps)
    start = K // 5 if start is None else int(start)
    backward = max(K // 10, 2) if backward is None else int(backward)
    forward = backward // 2 if forward is None else int(forward)
    if not 0 <= forward < backward:
        raise ValueError(f"need 0 <= forward < backward, got forward={forward}, backward={backward}")
    if not forward <= start <= K:
        raise ValueError(f"start must be in [forward, K] = [{forward}, {K}], got {start}")
    rng = as_generator(seed, rng)
    ch = _Chains(denoiser, scheduler, sample_shape, reward, num_inference_steps=K, eta=eta,
                 decode=decode, device=device, dtype=dtype)
    N, M = int(num_paths), int(num_branches)
    x, i = ch.process.run(ch.noise(N, rng), 0, start, rng), start
    scores = ch.score(x, i)
    while i < K:
        j = i - forward
        k = min(j + backward, K)
        branches = ch.renoise(x.repeat_interleave(M, dim=0), i, j, rng)
        branches = ch.process.run(branches, j, k, rng)
        r = ch.score(branches, k)
        keep = np.argsort(-r, kind="stable")[:N]
        x, scores, i = branches[torch.as_tensor(keep, device=branches.device)], r[keep], k
    return ch.result(x, scores, method="search_over_paths", start=start, backward=backward, forward=forward)
