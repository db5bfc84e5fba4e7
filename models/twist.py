"""Twisted proposals at token level: the locally optimal proposal of token-level SMC.

Token-level SMC (``StepModel(lm, prompt, step_delimiter=None)``, one token per step)
draws every token from the tempered model q_τ(v | x) and lets a potential φ reweight
afterwards (``Tilted``): a token that φ rejects is proposed anyway and its particle
dies. A *twist* ψ(x v) >= 0 that scores every next token v at once moves the potential
into the proposal (genlm-control and LLaMPPL call this the locally optimal proposal)::

    q_ψ(v | x) = q_τ(v | x) ψ(x v) / L(x),        L(x) = Σ_v' q_τ(v' | x) ψ(x v')

and ``StepModel(..., twist=ψ)`` weights each token by the proposal correction

    log q_τ(v | x) - log q_ψ(v | x) = log L(x) - log ψ(x v)

so the target stays the one configured (q_τ(x) or p(x), times the tilt of ``Tilted``).
With ψ = φ, the potential of the tilt (``shape="difference"``), the two weights
combine into the familiar twisted-SMC increment

    log Σ_v q_τ(v | x) φ(x v) - log φ(x),

which is 0 when φ is the exact value function H(x) = E_q[φ_final | x] (every weight
equal, ESS = N at every step, and the evidence estimate exact) and never -inf for a
hard 0/1 constraint (no particle proposes a rejected token unless no token is allowed).

Exactness asks only that ψ(x v) > 0 wherever the target may be positive (for ψ = φ,
rule 2 of the potential contract guarantees it); a row whose every next token has
ψ = 0 gets weight -inf (a token is then drawn from q_τ, which is what ``logpt`` reports).

**Token scores.** ``token_log_potential(ψ, partials, pieces, finished) -> (n, V)``
returns log ψ(x_i v) for row i and token v:

- a potential that defines ``next_token_log_potential(partials, pieces, finished)``
  computes it itself (fast: ``CharClass`` below builds a mask over the vocabulary);
- ``p ** lam`` and ``p * q`` combine their factors' token scores;
- any other ``Potential`` (or function, via ``as_potential``) is scored on the n·V
  one-token extensions ``Partial(prompt, steps + (pieces[v],), finished[i, v])`` in one
  batched ``score`` call (``reward_calls`` n·V in the ledger): exact, and costly for
  large vocabularies.

``pieces[v]`` is the text token v adds as a step (``lm.decode([v])``, "" for EOS), as
``StepModel`` appends it; ``finished[i, v]`` says whether x_i v ends the generation
(EOS, the ``stop`` pattern, the last step), so that ``complete`` scores it, as ``Tilted``
will.

Scope: one token per step (``step_delimiter=None``), temperature only: ``StepModel`` refuses a
twist together with ``top_p`` / ``top_k`` / ``min_p`` (``NotImplementedError``). The generic sampler reads
``lm.next_token_logprobs`` on whole rows (a backend's KV-cached ``sample_steps`` is not
used), so any ``LanguageModel`` works, HF included, at the cost of re-reading contexts.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ppl_scaling.errors import PotentialError
from ppl_scaling.potentials import Potential, Product, Tempered, as_potential

from .types import Partial

__all__ = ["token_log_potential", "sample_twisted_tokens", "token_pieces", "CharClass", "as_twist"]


def as_twist(twist: Any) -> Any:
    """A twist: an object with ``next_token_log_potential`` is kept, anything else goes
    through ``as_potential`` (a ``Potential`` or a function of a batch of partials)."""
    if callable(getattr(twist, "next_token_log_potential", None)):
        return twist
    return as_potential(twist)


def token_pieces(lm: Any, V: int) -> list[str]:
    """The text each token id 0 .. V-1 adds as a one-token step ("" for EOS)."""
    eos = lm.eos_token_ids
    return ["" if v in eos else lm.decode([v]) for v in range(V)]


def token_log_potential(twist: Any, partials: Sequence[Partial], pieces: Sequence[str],
                        finished: np.ndarray) -> np.ndarray:
    """(n, V) float64 log ψ(x_i v) (module docstring), validated: no NaN, no +inf."""
    n, V = len(partials), len(pieces)
    finished = np.broadcast_to(np.asarray(finished, dtype=bool), (n, V))
    if n == 0:
        return np.zeros((0, V))
    own = getattr(twist, "next_token_log_potential", None)
    if callable(own):
        out = own(list(partials), list(pieces), finished)
        if hasattr(out, "detach"):
            out = out.detach().cpu().numpy()
        out = np.asarray(out)
        if out.dtype == bool:
            out = np.where(out, 0.0, -np.inf)
        out = np.array(out, dtype=np.float64)
        where = f"twist {twist!r}.next_token_log_potential"
        if out.shape != (n, V):
            raise PotentialError(f"{where} returned shape {out.shape}; expected (rows, vocabulary) = ({n}, {V})")
        if np.isnan(out).any() or (out == np.inf).any():
            raise PotentialError(f"{where} returned NaN or +inf; log-values must be finite, or -inf to reject")
        return out
    if isinstance(twist, Tempered):
        base = token_log_potential(twist.base, partials, pieces, finished)
        with np.errstate(invalid="ignore"):
            return np.where(np.isneginf(base), -np.inf, twist.lam * base)
    if isinstance(twist, Product):
        total = np.zeros((n, V))
        for f in twist.factors:
            total = total + token_log_potential(f, partials, pieces, finished)
        return total
    if not isinstance(twist, Potential):
        twist = as_potential(twist)
    ext = [Partial(p.prompt, p.steps + (piece,), bool(f), p.question)
           for p, fin in zip(partials, finished) for piece, f in zip(pieces, fin)]
    return twist.score(ext, finished.reshape(-1)).reshape(n, V)


def sample_twisted_tokens(logprobs: torch.Tensor, log_psi: np.ndarray | torch.Tensor, temperature: float,
                          generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Draw one token per row from q_ψ ∝ q_τ(v) ψ(v) (``logprobs`` (B, V): log-probabilities or
    logits; ``log_psi`` (B, V): log ψ). Returns tokens, log q_τ(token), log p(token) and the
    proposal correction log q_τ(token) - log q_ψ(token) = log L - log ψ(token) (float64);
    a row with L = 0 draws from q_τ and gets correction -inf."""
    log_p = torch.log_softmax(logprobs.double(), dim=-1)
    log_q = log_p if temperature == 1.0 else torch.log_softmax(log_p / temperature, dim=-1)
    psi = torch.as_tensor(np.asarray(log_psi, dtype=np.float64), device=log_q.device)
    joint = log_q + psi
    log_L = torch.logsumexp(joint, dim=-1)
    dead = torch.isneginf(log_L)
    prop = torch.where(dead[:, None], log_q, joint - torch.where(dead, 0.0, log_L)[:, None])
    tok = torch.multinomial(prop.exp(), 1, generator=generator)
    lq, lp = log_q.gather(1, tok).squeeze(1), log_p.gather(1, tok).squeeze(1)
    corr = torch.where(dead, torch.full_like(log_L, -np.inf), lq - prop.gather(1, tok).squeeze(1))
    return tok.squeeze(1), lq, lp, corr


class CharClass(Potential):
    """A hard 0/1 potential: every character of the completion after the first ``after``
    (the whole completion when ``after`` is None) is one of ``allowed``. Its token scores
    (``next_token_log_potential``) make it a twist that never proposes a rejected token::

        only_digits = CharClass("0123456789\\n", after="A:")     # the toy task's answer line
        gen = StepModel(lm, prompt, step_delimiter=None, twist=only_digits)
        pps.smc(Tilted(gen, only_digits), 16, seed=0)
    """

    def __init__(self, allowed: str, after: str | None = None, name: str | None = None) -> None:
        if after == "":
            raise ValueError("after must be a non-empty string or None")
        self.allowed, self.after = frozenset(allowed), after
        self.name = name or f"CharClass({''.join(sorted(self.allowed))!r}" + (f", after={after!r})" if after else ")")
        self._masks: dict[tuple[str, ...], np.ndarray] = {}

    def _ok(self, text: str) -> bool:
        if self.after is not None:
            k = text.find(self.after)
            if k < 0:
                return True
            text = text[k + len(self.after):]
        return all(c in self.allowed for c in text)

    def prefix(self, partials: Sequence[Partial]) -> np.ndarray:
        return np.array([0.0 if self._ok(p.completion) else -np.inf for p in partials])

    def _mask(self, pieces: Sequence[str]) -> np.ndarray:
        key = tuple(pieces)
        if key not in self._masks:
            self._masks[key] = np.array([all(c in self.allowed for c in s) for s in pieces])
        return self._masks[key]

    def next_token_log_potential(self, partials: Sequence[Partial], pieces: Sequence[str],
                                 finished: np.ndarray) -> np.ndarray:
        mask = self._mask(pieces)
        out = np.zeros((len(partials), len(pieces)))
        for i, p in enumerate(partials):
            text = p.completion
            if not self._ok(text):
                out[i] = -np.inf
            elif self.after is None or self.after in text:
                out[i, ~mask] = -np.inf
            else:  # the constraint starts only once ``after`` appears, possibly within the next token
                tail = text[len(text) - len(self.after) + 1:] if len(self.after) > 1 else ""
                for v, s in enumerate(pieces):
                    if self.after in tail + s and not self._ok(tail + s):
                        out[i, v] = -np.inf
        return out
