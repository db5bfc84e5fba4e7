"""Masked (absorbing-state) discrete diffusion over token sequences, as dynamics.

The forward process masks each token of x0 independently: at time s in [0, 1] a token
is still visible with probability alpha_s = 1 - s (the linear schedule of MDLM,
Sahoo et al. 2024, and LLaDA, Nie et al. 2025). The reverse process starts from the
template (``prompt`` tokens kept, every other position masked) and, over K steps
s_k = 1 - k/K, unmasks; revealed tokens (and the prompt) never change. At step t the
*eligible* positions are the masked positions of the current block (the whole sequence
unless ``block_length`` splits the generated positions into semi-autoregressive blocks
of that length, each given K / #blocks steps, LLaDA's scheme); r_t is the number of steps
left in the block (r_t = K - t + 1 without blocks). Each eligible token gets a candidate
value v_i ~ p_theta(x0_i | x_t) (the denoiser's prediction, mask token excluded), and

    schedule="binomial"   c_t ~ Binomial(m_t, 1 / r_t) tokens are revealed, m_t eligible: with
                          random remasking each eligible token independently w.p. 1 / r_t =
                          (alpha_{s_t} - alpha_{s_{t-1}}) / (1 - alpha_{s_{t-1}}) (MDLM's ancestral
                          sampler, the default)
    schedule="fixed"      exactly c_t = floor(B / S) + [j < B mod S] tokens at the j-th step
                          (0-based) of a block of B generated positions and S steps (LLaDA's
                          ``get_num_transfer_tokens``)
    remasking="random"          which c_t: a uniformly random subset of the eligible positions
    remasking="low_confidence"  which c_t: those whose candidate is most probable,
                                conf_i = p_theta(v_i | x_t) (ties: lower position first)

The last step of a block reveals every token left in it; revealed tokens are never masked
again (LLaDA's "remasking" is the choice of which predictions stay masked). Low-confidence remasking is
deterministic given the logits *and the candidates*: at temperature > 0 the candidates are
random, so the transition still has a density (``logpt``); LLaDA's default temperature 0
(argmax candidates) would make every step deterministic and all N particles identical, which
is why ``temperature`` must be > 0. (LLaDA computes conf_i at temperature 1; here it is the
probability under the tempered reveal distribution, which keeps the density tractable.)

``MaskedDiffusionModel`` is that reverse process as ``Dynamics`` with T = K + 1 steps
(state t = the sequence after t unmasking steps: t = 0 the template, t = K clean). Each
state carries the denoiser output at its own tokens, so one step costs one denoiser
evaluation per particle (recorded as ``nfe`` in the ledger); the clean state at t = K
costs none. The dynamics are their own proposal: they add no weight (logG = 0), so
``ppl_scaling.tilt.Tilted`` steers them toward q(x) exp(lam r(x)), with q the law of the
sampler as configured: with random remasking the network's ancestral law for that
``schedule`` (which positions are revealed does not depend on the values), with
low-confidence remasking the sampler's own law, biased toward confident tokens. (Reweighting
low-confidence proposals toward the ancestral law would need log M_random - log M_low_confidence
per step, and they do not reach every ancestral move, so no such correction is offered.) The
transition density, for ancestor / backward sampling (``logpt``), with S the revealed
positions (|S| = c) and E the eligible ones:

    log M_t(x | xp) = log P(c) + Σ_{i∈S} log p_theta(x_i | xp) + log P(S | c, x_S)
    P(c)            Binomial(c; |E|, 1/r_t) ("binomial"), 1[c = c_t] ("fixed")
    P(S | c, x_S)   1 / C(|E|, c) ("random");
                    Π_{j∈E\\S} P(v_j ranks below every x_i, i∈S) ("low_confidence"), the
                    candidates of the positions left masked marginalised out

Memory: each state holds (N, L, V) float32 log-probabilities (for LLaDA, V = 126464: about
0.5 MB per particle and position), and ``store_history`` keeps one per step.

A denoiser with a true attribute ``time_conditioning`` is called as denoiser(tokens, s),
s (N,) the diffusion time 1 - t/K of the state; others as denoiser(tokens) (for absorbing
diffusion the mask pattern tells the noise level). ``from_pretrained`` wraps a Hugging Face
model (``ppl_scaling.diffusion.masked_lm.HFDenoiser``: LLaDA, MDLM, masked LMs).

The dynamics never see a reward. What a potential reads at step t < K is a predicted
clean sequence, chosen by ``intermediate``:

    "argmax"   r_t = r(x0_hat), masked positions filled with the denoiser's argmax
               (``view(t, x)``; deterministic given x_t: one reward call per particle)
    "sample"   r_t = r(x0_1), one fill drawn from p_theta(x0 | x_t)
    "many"     r_t = (1/lam) log (1/n) Σ_i exp(lam r(x0_i)), n = ``num_x0_samples``
               independent fills (FK steering's many-sample estimate of the soft value
               (1/lam) log E[exp(lam r(x0)) | x_t] under the model's factorised x0
               prediction; the mean of the r(x0_i) at lam = 0)

and r_K = r(x) of the clean sequence itself (``view(K, x)``), so the tilted target is
q(x) exp(lam r(x)) for every FK shape. The fills of "sample" and "many" are drawn in
``rewards`` from a child stream of the run's generator (``rng.spawn``), so the
trajectories do not depend on ``intermediate``: with lam = 0 every mode reproduces the
base sampler ``sample(N, rng)`` bit for bit.

    model, vocab = load_text_mdm()                        # ppl_scaling.diffusion.text_toy
    mdm = MaskedDiffusionModel(model, vocab.seq_len, vocab.mask_id, num_steps=12)
    result = ppl_scaling.smc(Tilted(mdm, sentiment_reward(vocab), shape="difference", lam=2.0),
                             num_particles=16, seed=0)
    vocab.decode(result.particles.tokens)

    llada = MaskedDiffusionModel.from_pretrained("GSAI-ML/LLaDA-8B-Instruct", trust_remote_code=True,
                                                 prompt=ids, gen_length=128, num_steps=128, block_length=32,
                                                 schedule="fixed", remasking="low_confidence",
                                                 temperature=0.5, dtype=torch.bfloat16, device="cuda")
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ppl_scaling.fk import Dynamics
from ppl_scaling.ledger import record
from ppl_scaling.rng import torch_generator
from ppl_scaling.state import take, where

from .model import soft_value

__all__ = ["MaskedDiffusionModel", "MaskedState", "INTERMEDIATE", "SCHEDULES", "REMASKING"]

INTERMEDIATE = ("argmax", "sample", "many")
SCHEDULES = ("binomial", "fixed")
REMASKING = ("random", "low_confidence")


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

    def where(self, mask: np.ndarray, other: MaskedState) -> MaskedState:
        """This state where ``mask`` (N,) is True, ``other`` elsewhere (states of the same step)."""
        return MaskedState(where(mask, self.tokens, other.tokens),
                           None if self.logp is None else where(mask, self.logp, other.logp))


class MaskedDiffusionModel(Dynamics):
    """The reverse process of a masked diffusion model (module docstring).

    ``denoiser(tokens)``: (N, L) long -> logits (N, L, V) of the clean tokens (or
    ``denoiser(tokens, s)`` if it has ``time_conditioning = True``).
    ``prompt``: token ids (P <= L) of the first P positions, kept throughout; positions
    where it holds ``mask_id``, and positions P..L-1, are generated (prefix prompts,
    infilling, a trailing [SEP]).
    ``schedule``, ``remasking``, ``block_length``: how many and which tokens each step
    reveals (module docstring). ``temperature`` divides the logits of the reveal
    distribution (1 = the model).
    ``decode`` turns token tensors into what a potential reads (e.g. ``vocab.decode``
    for strings); by default it reads the (N, L) token tensors.
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor], seq_len: int, mask_id: int, *,
                 num_steps: int = 16, schedule: str = "binomial", remasking: str = "random",
                 block_length: int | None = None, prompt: Sequence[int] | torch.Tensor | None = None,
                 intermediate: str = "argmax", num_x0_samples: int = 4, temperature: float = 1.0,
                 decode: Callable[[torch.Tensor], Any] | None = None,
                 device: str | torch.device = "cpu") -> None:
        if not callable(denoiser):
            raise TypeError(f"denoiser must be callable as denoiser(tokens) -> logits, got {type(denoiser).__name__}")
        for name, value in (("seq_len", seq_len), ("num_steps", num_steps), ("num_x0_samples", num_x0_samples),
                            ("block_length", 1 if block_length is None else block_length)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, value, allowed in (("intermediate", intermediate, INTERMEDIATE), ("schedule", schedule, SCHEDULES),
                                     ("remasking", remasking, REMASKING)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature} (temperature 0 makes every step "
                             "deterministic: all particles would be identical)")
        self.denoiser = denoiser
        self.time_conditioning = bool(getattr(denoiser, "time_conditioning", False))
        self.L, self.mask_id, self.K = int(seq_len), int(mask_id), int(num_steps)
        self.T = self.K + 1
        self.schedule, self.remasking = schedule, remasking
        self.intermediate = intermediate
        self.num_x0_samples = int(num_x0_samples)
        self.temperature = float(temperature)
        self.decode = decode
        self.device = torch.device(device)
        self.template = self._template(prompt)
        generated = self.template == self.mask_id
        G = int(generated.sum())
        if G == 0:
            raise ValueError("the prompt fills all seq_len positions: nothing to generate")
        B = G if block_length is None else int(block_length)
        num_blocks = -(-G // B)
        if self.K % num_blocks:
            raise ValueError(f"num_steps={self.K} must be a multiple of the number of blocks, "
                             f"{num_blocks} ({G} generated positions in blocks of block_length={B})")
        self.steps_per_block = self.K // num_blocks
        block = torch.full((self.L,), -1, dtype=torch.long)
        block[generated] = torch.arange(G) // B
        self.block = block.to(self.device)      # (L,) block of each generated position, -1 for the prompt
        S, self.counts = self.steps_per_block, []        # counts[t - 1]: c_t of the "fixed" schedule
        for b in range(num_blocks):
            size = min(B, G - b * B)
            self.counts += [size // S + int(j < size % S) for j in range(S)]

    def _template(self, prompt: Sequence[int] | torch.Tensor | None) -> torch.Tensor:
        template = torch.full((self.L,), self.mask_id, dtype=torch.long)
        if prompt is not None:
            ids = torch.as_tensor(prompt, dtype=torch.long).flatten()
            if ids.numel() > self.L:
                raise ValueError(f"the prompt has {ids.numel()} tokens, more than seq_len={self.L}")
            template[: ids.numel()] = ids
        return template.to(self.device)

    @classmethod
    def from_pretrained(cls, model: Any, *, gen_length: int, prompt: str | Sequence[int] | None = None,
                        tokenizer: Any = None, mask_token_id: int | None = None, trust_remote_code: bool = False,
                        dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                        time_conditioning: bool | None = None, batch_size: int | None = None,
                        **options: Any) -> MaskedDiffusionModel:
        """A Hugging Face model (a path / hub id, or a loaded model) as the denoiser, through
        ``HFDenoiser.from_pretrained`` (which reads the mask id from the tokenizer or config):
        the sequence is ``prompt`` (a string, encoded by the tokenizer, or token ids) followed
        by ``gen_length`` generated tokens, on ``device`` (default: where the model is).
        ``options``: the constructor's keyword arguments. Potentials read whole sequences, prompt
        included: e.g. ``decode=lambda x: tok.batch_decode(x[:, P:], skip_special_tokens=True)``
        for the completions' text (P = the prompt's length, ``tok = mdm.denoiser.tokenizer``)."""
        from .masked_lm import HFDenoiser

        denoiser = HFDenoiser.from_pretrained(model, tokenizer=tokenizer, mask_token_id=mask_token_id,
                                              trust_remote_code=trust_remote_code, dtype=dtype, device=device,
                                              time_conditioning=time_conditioning, batch_size=batch_size)
        ids = denoiser.encode(prompt)
        return cls(denoiser, len(ids) + int(gen_length), denoiser.mask_id, prompt=ids, device=denoiser.device,
                   **options)

    # -- the dynamics -----------------------------------------------------------------------
    def M0(self, N: int, rng: np.random.Generator) -> MaskedState:
        """The template (prompt, masks elsewhere) and the denoiser's prediction at it."""
        tokens = self.template.expand(N, self.L).clone()
        return MaskedState(tokens, self.predict(tokens, 0))

    def M(self, t: int, xp: MaskedState, rng: np.random.Generator) -> MaskedState:
        """Reverse step t (1..K), then the prediction at the new tokens (none at t = K)."""
        tokens = self.unmask(t, xp.tokens, xp.logp, torch_generator(rng, self.device.type))
        return MaskedState(tokens, None if t == self.K else self.predict(tokens, t))

    def sample(self, N: int, rng: np.random.Generator) -> torch.Tensor:
        """N clean sequences (N, L) from the base sampler: the plain reverse process."""
        x = self.M0(N, rng)
        for t in range(1, self.T):
            x = self.M(t, x, rng)
        return x.tokens

    def logpt(self, t: int, xp: MaskedState, x: MaskedState) -> np.ndarray:
        """log M_t(xp_i, x_i) of the step t - 1 -> t (module docstring; -inf where x_i changes a
        revealed token or reveals a non-eligible one), (N,) float64. A 1-particle ``x`` is
        broadcast against every particle of ``xp``."""
        prev, logp = xp.tokens, xp.logp.float()
        new = x.tokens.to(prev.device).expand_as(prev)
        masked = prev == self.mask_id
        eligible = self.eligible(t, prev)
        revealed = masked & (new != self.mask_id)
        possible = ((new == prev) | revealed).all(-1) & ~(revealed & ~eligible).any(-1)
        lp = logp.gather(-1, new.unsqueeze(-1)).squeeze(-1)            # log p_theta(x_i | xp)
        c, m = revealed.sum(-1).double(), eligible.sum(-1).double()
        log_choose = torch.lgamma(m + 1) - torch.lgamma(c + 1) - torch.lgamma((m - c).clamp(min=0) + 1)
        out = torch.where(revealed, lp, 0.0).sum(-1).double()
        if self.schedule == "binomial":
            q = torch.tensor(1.0 / self.steps_left(t), dtype=torch.float64, device=prev.device)
            out = out + log_choose + c * torch.log(q) + torch.xlogy(m - c, 1 - q)
        else:
            out = out.masked_fill(c != self.counts[t - 1], -torch.inf)
        if self.remasking == "random":
            out = out - log_choose
        else:
            out = out + self._rank_log_prob(lp, logp, revealed, eligible)
        return torch.where(possible, out, -torch.inf).cpu().numpy()

    def _rank_log_prob(self, lp: torch.Tensor, logp: torch.Tensor, revealed: torch.Tensor,
                       eligible: torch.Tensor) -> torch.Tensor:
        """log P(S | c, x_S) of low-confidence remasking: every eligible position j left masked
        drew a candidate ranked below the last revealed one i* (confidence c* = min_{i∈S} lp_i,
        the largest such i): P_j = P(lp_j(v) < c*) + [j > i*] P(lp_j(v) = c*), v ~ p_theta(. | xp)."""
        conf = lp.masked_fill(~revealed, torch.inf)
        cstar = conf.min(-1, keepdim=True).values                          # +inf when nothing is revealed
        pos = torch.arange(lp.shape[-1], device=lp.device)
        istar = torch.where(revealed & (conf == cstar), pos, -1).max(-1, keepdim=True).values
        level = cstar.unsqueeze(-1)
        below = (logp < level) | ((logp == level) & (pos > istar).unsqueeze(-1))
        log_pj = torch.logsumexp(logp.masked_fill(~below, -torch.inf), -1)
        return torch.where(eligible & ~revealed, log_pj, 0.0).sum(-1).double()

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
    def predict(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        """log p_theta(x0 | tokens) of the state after t steps: log-probabilities (N, L, V) of the
        clean tokens at temperature ``temperature``, the mask token excluded. Records N
        denoiser evaluations."""
        with torch.no_grad():
            if self.time_conditioning:
                logits = self.denoiser(tokens, torch.full((tokens.shape[0],), 1.0 - t / self.K, device=tokens.device))
            else:
                logits = self.denoiser(tokens)
        record(nfe=int(tokens.shape[0]))
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(tokens.shape):
            raise ValueError(f"denoiser must return logits of shape (N, L, V) = ({tokens.shape[0]}, {self.L}, V) "
                             f"for tokens of shape {tuple(tokens.shape)}; got "
                             f"{getattr(logits, 'shape', type(logits).__name__)}")
        if not 0 <= self.mask_id < logits.shape[-1]:
            raise ValueError(f"mask_id {self.mask_id} is outside the denoiser's vocabulary of "
                             f"{logits.shape[-1]} tokens")
        logits = logits.to(self.device).float() / self.temperature
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

    def steps_left(self, t: int) -> int:
        """r_t: the steps t..end of step t's block."""
        return self.steps_per_block - (t - 1) % self.steps_per_block

    def eligible(self, t: int, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L) bool: the masked positions of step t's block."""
        return (tokens == self.mask_id) & (self.block == (t - 1) // self.steps_per_block)

    def unmask(self, t: int, tokens: torch.Tensor, logp: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Reverse step t (1..K): reveal c_t eligible tokens (module docstring)."""
        eligible = self.eligible(t, tokens)
        if self.schedule == "binomial":
            u = torch.rand(tokens.shape, generator=generator, device=tokens.device)
            coin = (u * self.steps_left(t) < 1.0) & eligible
            if self.remasking == "random":       # each eligible token independently w.p. 1 / r_t
                return torch.where(coin, self.fill(tokens, logp, generator), tokens)
            count = coin.sum(-1, keepdim=True)
        else:
            count = self.counts[t - 1]
        draws = self.fill(tokens, logp, generator)
        if self.remasking == "random":
            key = torch.rand(tokens.shape, generator=generator, device=tokens.device)
        else:
            key = logp.gather(-1, draws.unsqueeze(-1)).squeeze(-1)
        order = torch.sort(key.masked_fill(~eligible, -torch.inf), dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(self.L, device=tokens.device).expand_as(order))
        return torch.where((rank < count) & eligible, draws, tokens)
