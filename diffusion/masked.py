"""Masked (absorbing-state) discrete diffusion over token sequences, as dynamics.

The forward process masks each token of x0 independently: at time s in [0, 1] a token
is still visible with probability alpha_s = 1 - s (the linear schedule of MDLM,
Sahoo et al. 2024). The reverse process starts from the all-mask sequence and, over K
steps s_k = 1 - k/K, unmasks: from s_{k-1} to s_k each still-masked token is revealed
with probability (alpha_{s_k} - alpha_{s_{k-1}}) / (1 - alpha_{s_{k-1}}) = 1 / (K - k + 1),
its value drawn from the denoiser's prediction p_theta(x0_i | x_t) (the mask token
excluded); revealed tokens never change. The last step reveals all that remain.

``MaskedDiffusionModel`` is that reverse process as ``Dynamics`` with T = K + 1 steps
(state t = the sequence after t unmasking steps: t = 0 all masked, t = K clean). Each
state carries the denoiser output at its own tokens, so one step costs one denoiser
evaluation per particle (recorded as ``nfe`` in the ledger); the clean state at t = K
costs none. The dynamics never see a reward: ``ppl_scaling.tilt.Tilted`` steers them by a
potential with log-value r (the reward), toward p_theta(x) exp(lam r(x)). What the
potential reads at step t < K is a predicted clean sequence, chosen by ``intermediate``:

    "argmax"   r_t = r(x0_hat), masked positions filled with the denoiser's argmax
               (``view(t, x)``; deterministic given x_t: one reward call per particle)
    "sample"   r_t = r(x0_1), one fill drawn from p_theta(x0 | x_t)
    "many"     r_t = (1/lam) log (1/n) Σ_i exp(lam r(x0_i)), n = ``num_x0_samples``
               independent fills (FK steering's many-sample estimate of the soft value
               (1/lam) log E[exp(lam r(x0)) | x_t] under the model's factorised x0
               prediction; the mean of the r(x0_i) at lam = 0)

and r_K = r(x) of the clean sequence itself (``view(K, x)``), so the tilted target is
p_theta(x) exp(lam r(x)) for every FK shape. The fills of "sample" and "many" are drawn
in ``rewards`` from a child stream of the run's generator (``rng.spawn``), so the
trajectories do not depend on ``intermediate``: with lam = 0 every mode reproduces the
base sampler ``sample(N, rng)`` bit for bit.

    model, vocab = load_text_mdm()                        # ppl_scaling.diffusion.text_toy
    mdm = MaskedDiffusionModel(model, vocab.seq_len, vocab.mask_id, num_steps=12)
    result = ppl_scaling.smc(Tilted(mdm, sentiment_reward(vocab), shape="difference", lam=2.0),
                             num_particles=16, seed=0)
    vocab.decode(result.particles.tokens)
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ppl_scaling.fk import Dynamics
from ppl_scaling.ledger import record
from ppl_scaling.rng import torch_generator
from ppl_scaling.state import take

from .model import soft_value

__all__ = ["MaskedDiffusionModel", "MaskedState", "INTERMEDIATE"]

INTERMEDIATE = ("argmax", "sample", "many")


@dataclass(frozen=True, eq=False)
class MaskedState:
    """A batch of N token sequences at one step (fields share the particle axis)."""

    tokens: torch.Tensor          # (N, L) long; mask_id where still masked
    logp: torch.Tensor | None     # (N, L, V) denoiser log-probabilities at tokens; None when clean (t = K)

    @property
    def num_particles(self) -> int:
        return int(self.tokens.shape[0])

    def take(self, idx: np.ndarray) -> MaskedState:
        return MaskedState(take(self.tokens, idx), None if self.logp is None else take(self.logp, idx))


class MaskedDiffusionModel(Dynamics):
    """The reverse process of a masked diffusion model (module docstring).

    ``denoiser(tokens)``: (N, L) long -> logits (N, L, V) of the clean tokens.
    ``temperature`` divides the logits of the reveal distribution (1 = the model).
    ``decode`` turns token tensors into what a potential reads (e.g. ``vocab.decode``
    for strings); by default it reads the (N, L) token tensors.
    """

    def __init__(self, denoiser: Callable[[torch.Tensor], torch.Tensor], seq_len: int, mask_id: int, *,
                 num_steps: int = 16, intermediate: str = "argmax", num_x0_samples: int = 4,
                 temperature: float = 1.0, decode: Callable[[torch.Tensor], Any] | None = None,
                 device: str | torch.device = "cpu") -> None:
        if not callable(denoiser):
            raise TypeError(f"denoiser must be callable as denoiser(tokens) -> logits, got {type(denoiser).__name__}")
        for name, value in (("seq_len", seq_len), ("num_steps", num_steps), ("num_x0_samples", num_x0_samples)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if intermediate not in INTERMEDIATE:
            raise ValueError(f"intermediate must be one of {INTERMEDIATE}, got {intermediate!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.denoiser = denoiser
        self.L, self.mask_id, self.K = int(seq_len), int(mask_id), int(num_steps)
        self.T = self.K + 1
        self.intermediate = intermediate
        self.num_x0_samples = int(num_x0_samples)
        self.temperature = float(temperature)
        self.decode = decode
        self.device = torch.device(device)

    # -- the dynamics -----------------------------------------------------------------------
    def M0(self, N: int, rng: np.random.Generator) -> MaskedState:
        """The all-mask sequences and the denoiser's prediction at them."""
        tokens = torch.full((N, self.L), self.mask_id, dtype=torch.long, device=self.device)
        return MaskedState(tokens, self.predict(tokens))

    def M(self, t: int, xp: MaskedState, rng: np.random.Generator) -> MaskedState:
        """Reverse step t (1..K), then the prediction at the new tokens (none at t = K)."""
        tokens = self.unmask(t, xp.tokens, xp.logp, torch_generator(rng, self.device.type))
        return MaskedState(tokens, None if t == self.K else self.predict(tokens))

    def sample(self, N: int, rng: np.random.Generator) -> torch.Tensor:
        """N clean sequences (N, L) from the base sampler: the plain reverse process."""
        x = self.M0(N, rng)
        for t in range(1, self.T):
            x = self.M(t, x, rng)
        return x.tokens

    # -- what a potential reads -------------------------------------------------------------
    def view(self, t: int, x: MaskedState) -> Any:
        """The clean sequences at t = K, the argmax x0 predictions before (decoded)."""
        return self.readable(x.tokens if x.logp is None else self.fill(x.tokens, x.logp, None))

    def rewards(self, t: int, x: MaskedState, rows: np.ndarray, finished: np.ndarray, tilt: Any,
                rng: np.random.Generator) -> np.ndarray:
        """Rewards r_t of particles ``rows`` read with ``tilt.potential`` (and ``tilt.lam`` for
        "many"): of ``view`` for "argmax" and clean sequences, else of x0 fills drawn from
        p_theta(x0 | x_t) with a child stream of ``rng`` (module docstring)."""
        if rows.size != x.num_particles:
            x = x.take(rows)
        with torch.no_grad():
            if x.logp is None or self.intermediate == "argmax":
                return tilt.potential.score(self.view(t, x), finished)
            n = 1 if self.intermediate == "sample" else self.num_x0_samples
            g = torch_generator(rng.spawn(1)[0], self.device.type)
            draws = self.fill(x.tokens.repeat_interleave(n, 0), x.logp.repeat_interleave(n, 0), g)
            r = tilt.potential.score(self.readable(draws), np.repeat(finished, n)).reshape(len(rows), n)
        return r[:, 0] if n == 1 else soft_value(r, tilt.lam)

    def readable(self, tokens: torch.Tensor) -> Any:
        """``tokens`` as a potential reads them: ``decode(tokens)``, or the tensor itself."""
        return tokens if self.decode is None else self.decode(tokens)

    # -- the reverse process ------------------------------------------------------------------
    def predict(self, tokens: torch.Tensor) -> torch.Tensor:
        """log p_theta(x0 | tokens): log-probabilities (N, L, V) of the clean tokens at
        temperature ``temperature``, the mask token excluded. Records N denoiser evaluations."""
        with torch.no_grad():
            logits = self.denoiser(tokens)
        record(nfe=int(tokens.shape[0]))
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(tokens.shape):
            raise ValueError(f"denoiser must return logits of shape (N, L, V) = ({tokens.shape[0]}, {self.L}, V) "
                             f"for tokens of shape {tuple(tokens.shape)}; got "
                             f"{getattr(logits, 'shape', type(logits).__name__)}")
        if not 0 <= self.mask_id < logits.shape[-1]:
            raise ValueError(f"mask_id {self.mask_id} is outside the denoiser's vocabulary of "
                             f"{logits.shape[-1]} tokens")
        logits = logits.float() / self.temperature
        logits[..., self.mask_id] = -torch.inf
        return torch.log_softmax(logits, dim=-1)

    def fill(self, tokens: torch.Tensor, logp: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Masked positions filled from ``logp``: drawn with ``generator``, or the argmax if None."""
        if generator is None:
            draw = logp.argmax(-1)
        else:
            N, L, V = logp.shape
            draw = torch.multinomial(logp.exp().reshape(N * L, V), 1, generator=generator).reshape(N, L)
        return torch.where(tokens == self.mask_id, draw, tokens)

    def unmask(self, t: int, tokens: torch.Tensor, logp: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Reverse step t (1..K): reveal each masked token with probability 1 / (K - t + 1)."""
        reveal = torch.rand(tokens.shape, generator=generator, device=tokens.device) * (self.K - t + 1) < 1.0
        return torch.where(reveal, self.fill(tokens, logp, generator), tokens)
