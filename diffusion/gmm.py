"""An analytic Gaussian-mixture diffusion: exact denoiser and exact tilted targets.

Data: x0 ~ Σ_k π_k N(μ_k, Σ_k) in d dimensions. Under the forward process
x_t = a x0 + b ε (a² = ᾱ_t, b² = 1 - ᾱ_t) everything is closed form:

    x_t | k            ~ N(a μ_k, S_k),   S_k = a² Σ_k + b² I
    w_k(x_t)           = π_k N(x_t; a μ_k, S_k) / Σ_j π_j N(x_t; a μ_j, S_j)
    E[x0 | x_t]        = Σ_k w_k(x_t) [μ_k + a Σ_k S_k⁻¹ (x_t - a μ_k)]
    ε_hat = (x_t - a x0_hat) / b,     v_hat = a ε_hat - b x0_hat

and E[ε | x_t] = Σ_k w_k(x_t) b S_k⁻¹ (x_t - a μ_k) (``posterior``, any a, b). Under the
rectified flow x_t = (1 - t) x0 + t ε (a = 1 - t, b = t; t from 1, noise, to 0, data) the
flow-matching velocity is v(x_t, t) = E[ε - x0 | x_t] = (x_t - E[x0 | x_t]) / t
(``GaussianMixture.velocity``, for ``diffusion.flow.FlowMatchingModel``).

``GaussianMixture.denoiser(scheduler)`` is the Bayes-optimal denoiser for any
diffusers scheduler and ``prediction_type`` (build the scheduler with ``clip_sample=False``:
the default clips x0 predictions to [-1, 1]). Tilts by linear and quadratic rewards
stay in the family (``GaussianMixture.tilt``):

    r(x) = w·x:                     μ_k' = μ_k + lam Σ_k w,   Σ_k' = Σ_k,
                                    log c_k = lam w·μ_k + lam² wᵀΣ_k w / 2
    r(x) = -(x - m)ᵀ P (x - m) / 2: Σ_k' = (Σ_k⁻¹ + lam P)⁻¹,  μ_k' = Σ_k'(Σ_k⁻¹ μ_k + lam P m),
                                    log c_k = -log det(I + lam Σ_k P)/2 - lam δᵀ(I + lam P Σ_k)⁻¹ P δ / 2,  δ = μ_k - m

with π_k' ∝ π_k c_k and log E_p[exp(lam r)] = log Σ_k π_k c_k.

    gmm = GaussianMixture.isotropic([0.5, 0.5], [[-1.5], [1.5]], std=0.5)
    target, log_Z = gmm.tilt(LinearReward([1.0]), lam=0.6)
    fk = Tilted(DiffusionModel(gmm.denoiser(sched), sched, (1,)), LinearReward([1.0]), lam=0.6)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

_LOG_2PI = float(np.log(2 * np.pi))


@dataclass(frozen=True)
class LinearReward:
    """r(x) = w·x for a batch x of shape (N, d)."""

    w: Any

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.as_tensor(np.asarray(self.w, dtype=np.float64), dtype=x.dtype, device=x.device)
        return x.reshape(x.shape[0], -1) @ w


@dataclass(frozen=True)
class QuadraticReward:
    """r(x) = -(x - center)ᵀ precision (x - center) / 2 (precision positive semi-definite)."""

    center: Any
    precision: Any

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = torch.as_tensor(np.asarray(self.center, dtype=np.float64), dtype=x.dtype, device=x.device)
        P = torch.as_tensor(np.atleast_2d(np.asarray(self.precision, dtype=np.float64)), dtype=x.dtype, device=x.device)
        d = x.reshape(x.shape[0], -1) - m
        return -0.5 * torch.einsum("ni,ij,nj->n", d, P, d)


@dataclass(frozen=True)
class GaussianMixture:
    """Σ_k π_k N(μ_k, Σ_k): ``weights`` (K,), ``means`` (K, d), ``covs`` (K, d, d)."""

    weights: np.ndarray
    means: np.ndarray
    covs: np.ndarray

    def __post_init__(self) -> None:
        w = np.asarray(self.weights, dtype=np.float64)
        mu = np.atleast_2d(np.asarray(self.means, dtype=np.float64))
        cov = np.asarray(self.covs, dtype=np.float64)
        if w.ndim != 1 or mu.shape[0] != w.shape[0] or cov.shape != (w.shape[0], mu.shape[1], mu.shape[1]):
            raise ValueError(f"shapes do not fit: weights {w.shape}, means {mu.shape}, covs {cov.shape}; "
                             "expected (K,), (K, d), (K, d, d)")
        if (w < 0).any() or not np.isclose(w.sum(), 1.0):
            raise ValueError(f"weights must be non-negative and sum to 1, got {w}")
        if (np.linalg.eigvalsh(cov) <= 0).any():
            raise ValueError("every covariance must be positive definite")
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "means", mu)
        object.__setattr__(self, "covs", cov)

    @classmethod
    def isotropic(cls, weights: Any, means: Any, std: float | Any) -> "GaussianMixture":
        mu = np.atleast_2d(np.asarray(means, dtype=np.float64))
        K, d = mu.shape
        s = np.broadcast_to(np.asarray(std, dtype=np.float64), (K,))
        return cls(np.asarray(weights, dtype=np.float64), mu, (s**2)[:, None, None] * np.eye(d))

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        k = rng.choice(len(self.weights), size=n, p=self.weights)
        L = np.linalg.cholesky(self.covs)
        return self.means[k] + np.einsum("nij,nj->ni", L[k], rng.standard_normal((n, self.dim)))

    def component_log_probs(self, x: np.ndarray) -> np.ndarray:
        """(n, K): log π_k + log N(x; μ_k, Σ_k)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.dim)
        prec = np.linalg.inv(self.covs)
        _, logdet = np.linalg.slogdet(self.covs)
        diff = x[:, None, :] - self.means[None]
        maha = np.einsum("nki,kij,nkj->nk", diff, prec, diff)
        return np.log(self.weights) - 0.5 * (maha + logdet + self.dim * _LOG_2PI)

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        lp = self.component_log_probs(x)
        m = lp.max(axis=1, keepdims=True)
        return m[:, 0] + np.log(np.exp(lp - m).sum(axis=1))

    def responsibilities(self, x: np.ndarray) -> np.ndarray:
        """(n, K) posterior component probabilities of points x."""
        lp = self.component_log_probs(x)
        p = np.exp(lp - lp.max(axis=1, keepdims=True))
        return p / p.sum(axis=1, keepdims=True)

    def mean(self) -> np.ndarray:
        return self.weights @ self.means

    def posterior(self, x_t: torch.Tensor, a: float, b: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(E[x0 | x_t], E[ε | x_t]) for x_t = a x0 + b ε, ε ~ N(0, I); x_t of shape (N, d).
        Per component, x_t | k ~ N(a μ_k, S_k) with S_k = a² Σ_k + b² I, Cov(x0, x_t | k) = a Σ_k and
        Cov(ε, x_t | k) = b I, so E[x0 | x_t, k] = μ_k + a Σ_k S_k⁻¹ r_k and E[ε | x_t, k] = b S_k⁻¹ r_k,
        r_k = x_t - a μ_k, mixed with the posterior weights w_k(x_t)."""
        dt = x_t.dtype
        x = x_t.reshape(x_t.shape[0], -1).to(torch.float64)
        if x.shape[1] != self.dim:
            raise ValueError(f"x_t of shape {tuple(x_t.shape)} does not fit a {self.dim}-dimensional mixture; "
                             f"use sample_shape=({self.dim},)")
        mu = torch.as_tensor(self.means, dtype=torch.float64, device=x.device)
        cov = torch.as_tensor(self.covs, dtype=torch.float64, device=x.device)
        S = a * a * cov + b * b * torch.eye(self.dim, dtype=torch.float64, device=x.device)
        S_inv = torch.linalg.inv(S)
        logdet = torch.linalg.slogdet(S)[1]
        diff = x[:, None, :] - a * mu[None]                                    # r_k, (N, K, d)
        sol = torch.einsum("kij,nkj->nki", S_inv, diff)                        # S_k⁻¹ r_k
        log_w = torch.log(torch.as_tensor(self.weights, dtype=torch.float64, device=x.device)) \
            - 0.5 * ((diff * sol).sum(-1) + logdet)
        w = torch.softmax(log_w, dim=1)[..., None]                              # (N, K, 1)
        x0 = (w * (mu[None] + a * torch.einsum("kij,nkj->nki", cov, sol))).sum(1)
        eps = b * (w * sol).sum(1)
        return x0.to(dt).reshape(x_t.shape), eps.to(dt).reshape(x_t.shape)

    def posterior_mean(self, x_t: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """E[x0 | x_t] under the forward process with ᾱ = ``alpha_bar``; x_t of shape (N, d)."""
        return self.posterior(x_t, float(np.sqrt(alpha_bar)), float(np.sqrt(1.0 - alpha_bar)))[0]

    def velocity(self, x_t: torch.Tensor, t: float) -> torch.Tensor:
        """The rectified-flow velocity v(x_t, t) = E[ε - x0 | x_t] for x_t = (1 - t) x0 + t ε
        (``posterior`` with a = 1 - t, b = t; no division by t, so exact down to t = 0);
        the velocity a ``diffusion.flow.FlowMatchingModel`` takes, at flow time t in [0, 1]."""
        x0, eps = self.posterior(x_t, 1.0 - float(t), float(t))
        return eps - x0

    def denoiser(self, scheduler: Any) -> "GMMDenoiser":
        """The exact denoiser for ``scheduler``'s ᾱ table and ``prediction_type``."""
        return GMMDenoiser(self, scheduler.alphas_cumprod.double().cpu().numpy(), scheduler.config.prediction_type)

    def tilt(self, reward: LinearReward | QuadraticReward, lam: float) -> tuple["GaussianMixture", float]:
        """The tilted mixture p(x) exp(lam r(x)) / Z and log Z = log E_p[exp(lam r)]."""
        d = self.dim
        if isinstance(reward, LinearReward):
            w = np.asarray(reward.w, dtype=np.float64).reshape(d)
            Sw = self.covs @ w
            means = self.means + lam * Sw
            covs = self.covs
            log_c = lam * self.means @ w + 0.5 * lam**2 * Sw @ w
        elif isinstance(reward, QuadraticReward):
            m = np.asarray(reward.center, dtype=np.float64).reshape(d)
            P = np.atleast_2d(np.asarray(reward.precision, dtype=np.float64))
            prec = np.linalg.inv(self.covs) + lam * P
            if (np.linalg.eigvalsh(prec) <= 0).any():
                raise ValueError(f"lam={lam} makes a tilted component improper (Σ⁻¹ + lam P not positive definite)")
            covs = np.linalg.inv(prec)
            means = np.einsum("kij,kj->ki", covs, np.linalg.solve(self.covs, self.means[..., None])[..., 0] + lam * P @ m)
            delta = self.means - m
            I = np.eye(d)
            log_c = np.array([
                -0.5 * np.linalg.slogdet(I + lam * S @ P)[1]
                - 0.5 * lam * dl @ np.linalg.solve(I + lam * P @ S, P @ dl)
                for S, dl in zip(self.covs, delta)])
        else:
            raise TypeError(f"closed-form tilts exist for LinearReward and QuadraticReward, got {type(reward).__name__}")
        log_pc = np.log(self.weights) + log_c
        log_Z = float(np.logaddexp.reduce(log_pc))
        return GaussianMixture(np.exp(log_pc - log_Z), means, covs), log_Z


class GMMDenoiser:
    """``denoiser(x_t, timestep)`` of a ``GaussianMixture``: the exact model output."""

    def __init__(self, gmm: GaussianMixture, alphas_cumprod: np.ndarray, prediction_type: str) -> None:
        if prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {prediction_type!r}")
        self.gmm = gmm
        self.alphas_cumprod = alphas_cumprod
        self.prediction_type = prediction_type

    def __call__(self, x_t: torch.Tensor, timestep: Any) -> torch.Tensor:
        ab = float(self.alphas_cumprod[int(timestep)])
        x0 = self.gmm.posterior_mean(x_t, ab)
        if self.prediction_type == "sample":
            return x0
        a, b = np.sqrt(ab), np.sqrt(1.0 - ab)
        eps = (x_t - a * x0) / b
        return eps if self.prediction_type == "epsilon" else a * eps - b * x0
