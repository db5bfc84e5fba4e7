"""``StepModel``: stepwise LLM generation as dynamics (a Feynman-Kac model without a reward).

A particle is the prompt plus the steps generated so far (a step ends with a delimiter
such as "\\n\\n", with EOS, or after ``max_step_tokens`` tokens). One SMC step samples
the next step of every unfinished particle. A reward steers it only through
``ppl_scaling.tilt.Tilted``, which scores ``view(t, x)``, the partial generations::

    gen = StepModel(lm, "Q:24+5-4\\n", step_delimiter="\\n", max_steps=8,
                    stop=r"A:-?\\d+\\n", temperature=0.8)
    result = pps.smc(Tilted(gen, prm, shape="difference", lam=1.0), num_particles=16, seed=0)
    x = result.particles
    x.partials()          # list[Partial]: prompt, steps, finished
    x.completions()       # generated texts;  gen.texts(x): prompt + completion
    x.token_ids, x.log_p, x.log_q     # tokens, log p (model) and log q_τ (sampled) per particle
    result.ledger         # tokens, forward_passes, reward_calls, ... (recorded by the backend)

The dynamics (t = 0 .. max_steps - 1):

    M0, M    sample one step from the proposal q for every unfinished particle: the
             tempered model q_τ, truncated by ``top_p`` / ``top_k`` / ``min_p`` when given
             (``ppl_scaling.models.lm``: vLLM's semantics and order, renormalised; q below
             means this proposal). Finished particles are frozen by the engine and cost nothing.
    logG_t   the target of the generation alone:
                 0                                          target="tempered": q_τ(x)
                 log p(step_t) - log q_τ(step_t)            target="model":    p(x)
             (from the cumulative log p / log q of x_t minus those of x_{t-1}), so the
             tilted target is q_τ(x) exp(lam r(x)) (the PF paper's) or p(x) exp(lam r(x)).
             **Truncation and target="model".** A truncated proposal puts q = 0 on the tokens
             it drops, where p > 0: the weights p / q then correct towards p restricted to the
             proposal's support (p(x) 1[every token of x kept], renormalised), not p. Use
             target="tempered" to sample the truncated proposal itself (exact), or
             target="model" knowing that the tails are cut.
    done     EOS, the ``stop`` pattern found in the completion, or the last step t = max_steps - 1
             (the generation is then cut: the target lives on these truncated sequences).
    view     ``x.partials()``: what a potential (PRM, verifier, judge) scores.

A delimiter the model never produces makes every step ``max_step_tokens`` tokens long;
generation then ends at ``max_steps`` (or EOS).

**Twisted proposals** (``twist=ψ``, one token per step: ``step_delimiter=None``): every
token is drawn from q_ψ(v | x) ∝ q_τ(v | x) ψ(x v) over the vocabulary instead of q_τ, and
logG_t gains the proposal correction log L(x) - log ψ(x v), L(x) = Σ_v q_τ(v | x) ψ(x v),
so the target above is unchanged. With ψ = the tilt's potential φ (shape "difference") the
step's weight is log L(x) - log φ(x): constant for the exact value function, never -inf for
a hard constraint. See ``ppl_scaling.models.twist`` (token scores of potentials,
``CharClass``); twisted steps read ``lm.next_token_logprobs`` on whole rows (no KV cache).

The state (``StepState``) is columnar: per-particle steps, tokens, flags and log-probs,
plus the language model's ``Contexts`` rows (KV cache) of the unfinished particles
only; ``take`` reorders them for resampling, finished particles hold none.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ppl_scaling.fk import Dynamics
from ppl_scaling.ledger import record, recording
from ppl_scaling.rng import torch_generator

from .lm import Contexts, LanguageModel, StepRecorder, StepSample, check_sampling, truncates
from .twist import as_twist, sample_twisted_tokens, token_log_potential, token_pieces
from .types import Partial

TARGETS = ("tempered", "model")


@dataclass(frozen=True, eq=False)
class StepState:
    """N particles of a ``StepModel``; ``contexts`` holds one row per unfinished
    particle, in particle order."""

    prompt: str
    question: str               # the raw question reward models read (``Partial.question``)
    steps: tuple[tuple[str, ...], ...]
    token_ids: tuple[tuple[int, ...], ...]  # generated tokens per particle (EOS included)
    finished: np.ndarray        # (N,) bool
    log_p: np.ndarray           # (N,) log p of the generation under the model
    log_q: np.ndarray           # (N,) log q_τ of the generation under the sampling distribution
    contexts: Contexts
    log_r: np.ndarray | None = None  # (N,) twisted proposals: log q_τ - log q_ψ of each particle's latest step

    @property
    def num_particles(self) -> int:
        return len(self.steps)

    @property
    def num_tokens(self) -> np.ndarray:
        """(N,) number of generated tokens per particle."""
        return np.array([len(t) for t in self.token_ids], dtype=np.int64)

    def _rows(self) -> np.ndarray:
        """Row of each particle in ``contexts`` (meaningful for unfinished particles only)."""
        return np.cumsum(~self.finished) - 1

    def take(self, idx: Sequence[int] | np.ndarray) -> StepState:
        idx = np.asarray(idx, dtype=np.int64)
        alive = idx[~self.finished[idx]]
        return StepState(self.prompt, self.question, tuple(self.steps[i] for i in idx),
                         tuple(self.token_ids[i] for i in idx),
                         self.finished[idx], self.log_p[idx], self.log_q[idx],
                         self.contexts.take(self._rows()[alive]), None if self.log_r is None else self.log_r[idx])

    def where(self, mask: np.ndarray, other: StepState) -> StepState:
        """Particle i from ``self`` where ``mask[i]``, else from ``other``."""
        mask = np.asarray(mask, dtype=bool)
        mine, theirs = mask & ~self.finished, ~mask & ~other.finished
        parts = [s.contexts.take(s._rows()[sel]) for s, sel in ((self, mine), (other, theirs)) if sel.any()]
        if len(parts) == 2:  # rows of both: concatenate, then restore particle order
            order = np.argsort(np.concatenate([np.flatnonzero(mine), np.flatnonzero(theirs)]), kind="stable")
            contexts = type(self.contexts).concat(parts).take(order)
        else:
            contexts = parts[0] if parts else self.contexts.take(np.zeros(0, dtype=np.int64))

        def pick(a: Any, b: Any) -> Any:
            if isinstance(a, tuple):
                return tuple(u if m else v for m, u, v in zip(mask, a, b))
            return np.where(mask, a, b)

        log_r = None
        if self.log_r is not None or other.log_r is not None:
            zeros = np.zeros(len(mask))
            log_r = pick(zeros if self.log_r is None else self.log_r, zeros if other.log_r is None else other.log_r)
        return StepState(self.prompt, self.question, pick(self.steps, other.steps),
                         pick(self.token_ids, other.token_ids),
                         pick(self.finished, other.finished), pick(self.log_p, other.log_p),
                         pick(self.log_q, other.log_q), contexts, log_r)

    def partials(self) -> list[Partial]:
        return [Partial(self.prompt, s, bool(f), self.question) for s, f in zip(self.steps, self.finished)]

    def completions(self) -> list[str]:
        """The generated text of each particle (steps joined, prompt excluded)."""
        return ["".join(s) for s in self.steps]


class StepModel(Dynamics):
    """Stepwise generation from ``lm`` after ``prompt`` (module docstring).

    ``stop``: a regular expression searched in the completion, or a predicate on it,
    that ends a particle (e.g. the final-answer line). ``target``: "tempered" (the
    generation's own weight is 1: target q_τ) or "model" (weight p / q_τ per step: target p).
    ``twist``: a potential (or anything with ``next_token_log_potential``) whose token scores
    ψ(x v) twist the proposal (module docstring); needs ``step_delimiter=None``.
    ``top_p``, ``top_k``, ``min_p``: truncation of the proposal (``ppl_scaling.models.lm``; off:
    1, None or 0, 0), validated here; not combined with ``twist`` (``NotImplementedError``).
    ``question``: the raw question reward models read (``Partial.question``) when ``prompt``
    is the policy's formatting of it (``MethodConfig.step_model`` builds both from a
    ``Question``); default: the prompt itself.
    """

    def __init__(self, lm: LanguageModel, prompt: str, *, step_delimiter: str | None = "\n\n",
                 max_steps: int = 40, max_step_tokens: int = 256, temperature: float = 1.0,
                 stop: str | Callable[[str], bool] | None = None, target: str = "tempered",
                 twist: Any = None, top_p: float = 1.0, top_k: int | None = None, min_p: float = 0.0,
                 question: str | None = None) -> None:
        if not isinstance(prompt, str) or prompt == "":
            raise ValueError("StepModel needs a non-empty prompt string; for unconditional generation "
                             "pass the model's BOS text (or any start text) as the prompt")
        if step_delimiter is not None and (not isinstance(step_delimiter, str) or step_delimiter == ""):
            raise ValueError(f"step_delimiter must be a non-empty string or None (one token per step), "
                             f"got {step_delimiter!r}")
        for name, value in (("max_steps", max_steps), ("max_step_tokens", max_step_tokens)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        temperature, top_p, top_k, min_p = check_sampling(temperature, top_p, top_k, min_p)
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if twist is not None and step_delimiter is not None:
            raise NotImplementedError("twisted proposals are implemented for one token per step only; "
                                      "pass step_delimiter=None with twist=...")
        if twist is not None and truncates(top_p, top_k, min_p):
            raise NotImplementedError("twisted proposals do not combine with top_p / top_k / min_p; "
                                      "use temperature alone with twist=...")
        self.twist = None if twist is None else as_twist(twist)
        self._pieces: list[str] | None = None
        self.prompt_ids = list(lm.encode(prompt))
        if not self.prompt_ids:
            raise ValueError(f"the prompt {prompt!r} encodes to no tokens")
        self.lm, self.prompt = lm, prompt
        self.question = prompt if question is None else str(question)
        self.step_delimiter, self.max_step_tokens = step_delimiter, int(max_step_tokens)
        self.temperature, self.target = float(temperature), target
        self.top_p, self.top_k, self.min_p = top_p, top_k, min_p
        # passed to sample_steps only when active, so custom LMs without the controls keep working
        self._controls = dict(top_p=top_p, top_k=top_k, min_p=min_p) if truncates(top_p, top_k, min_p) else {}
        self.T = int(max_steps)
        self.stop = re.compile(stop).search if isinstance(stop, str) else stop
        self._prompt_contexts: Contexts | None = None

    def __repr__(self) -> str:
        return (f"StepModel({type(self.lm).__name__}, prompt={self.prompt[:40]!r}, max_steps={self.T}, "
                f"temperature={self.temperature:g}, target={self.target!r}"
                + "".join(f", {k}={v!r}" for k, v in self._controls.items())
                + ("" if self.twist is None else f", twist={self.twist!r}") + ")")

    # -- the dynamics ------------------------------------------------------------------
    def M0(self, N: int, rng: np.random.Generator) -> StepState:
        if self._prompt_contexts is None:  # the prompt is encoded once, shared by every run
            # twisted steps read whole rows through next_token_logprobs: plain rows, no cache
            self._prompt_contexts = (Contexts([self.prompt_ids]) if self.twist is not None
                                     else self.lm.start([self.prompt_ids]))
        zeros = np.zeros(N)
        x = StepState(self.prompt, self.question, ((),) * N, ((),) * N, np.zeros(N, dtype=bool), zeros, zeros,
                      self._prompt_contexts.take(np.zeros(N, dtype=np.int64)),
                      None if self.twist is None else zeros)
        return self._advance(0, x, rng)

    def M(self, t: int, xp: StepState, rng: np.random.Generator) -> StepState:
        return self._advance(t, xp, rng)

    def logG(self, t: int, xp: StepState | None, x: StepState) -> np.ndarray:
        """0 (target="tempered"), or log p(step_t) - log q_τ(step_t) (target="model"); plus, with a
        twist, the proposal correction log q_τ(step_t) - log q_ψ(step_t)."""
        if self.target == "tempered":
            own = np.zeros(x.num_particles)
        else:
            own = x.log_p - x.log_q
            own = own if xp is None else own - (xp.log_p - xp.log_q)
        if x.log_r is not None:
            moved = np.ones(x.num_particles, bool) if xp is None else ~xp.finished
            own = own + np.where(moved, x.log_r, 0.0)
        return own

    def done(self, t: int, x: StepState) -> np.ndarray:
        return x.finished.copy()

    def logpt(self, t: int, xp: StepState, x: StepState) -> np.ndarray:
        """Transition log-density of M (for ancestor / backward sampling): log q_τ of x_i's last
        step after xp_i's steps when x_i extends xp_i by one step, 0 when xp_i had finished and
        x_i is xp_i, -inf otherwise (a state holds its whole history). A 1-particle ``x`` is
        broadcast against every particle of ``xp``."""
        out = np.full(xp.num_particles, -np.inf)
        one = x.num_particles == 1
        for i, prev in enumerate(xp.token_ids):
            j = 0 if one else i
            new = x.token_ids[j]
            if xp.finished[i]:
                out[i] = 0.0 if new == prev else -np.inf
            elif len(x.steps[j]) == len(xp.steps[i]) + 1 and new[:len(prev)] == prev:
                out[i] = x.log_q[j] - xp.log_q[i]
                if x.log_r is not None and np.isfinite(x.log_r[j]):  # the twisted proposal's density
                    out[i] -= x.log_r[j]
        return out

    def view(self, t: int, x: StepState) -> list[Partial]:
        """The partial generations, what a potential scores."""
        return x.partials()

    # -- reading results -----------------------------------------------------------------
    def texts(self, x: StepState) -> list[str]:
        """Prompt plus completion of each particle."""
        return [p.text for p in x.partials()]

    # -- one step ------------------------------------------------------------------------
    def _advance(self, t: int, xp: StepState, rng: np.random.Generator) -> StepState:
        act = np.flatnonzero(~xp.finished)
        if act.size == 0:
            return xp
        if self.twist is not None:
            s, log_r = self._sample_twisted(t, xp, act, rng)
            return self._extend(t, xp, act, s, log_r)
        s = self.lm.sample_steps(xp.contexts, step_delimiter=self.step_delimiter,
                                 max_step_tokens=self.max_step_tokens, temperature=self.temperature,
                                 generator=torch_generator(rng, str(self.lm.device)), **self._controls)
        return self._extend(t, xp, act, s)

    def _extend(self, t: int, xp: StepState, act: np.ndarray, s: StepSample,
                log_r: np.ndarray | None = None) -> StepState:
        if self.target == "model" and np.isnan(s.log_p).any():
            raise ValueError(f"{type(self.lm).__name__} did not report the model's log-probabilities "
                             "(log_p is NaN), which target='model' needs; use target='tempered'")
        steps, token_ids = list(xp.steps), list(xp.token_ids)
        for j, i in enumerate(act):
            steps[i] = steps[i] + (s.texts[j],)
            token_ids[i] = token_ids[i] + tuple(s.token_ids[j])
        fin = s.eos.copy()
        if t >= self.T - 1:
            fin[:] = True
        elif self.stop is not None:
            fin |= np.array([bool(self.stop("".join(steps[i]))) for i in act])
        finished, log_p, log_q = xp.finished.copy(), xp.log_p.copy(), xp.log_q.copy()
        finished[act] = fin
        log_p[act] += s.log_p
        log_q[act] += s.log_q
        r = None
        if log_r is not None:
            r = np.zeros(xp.num_particles)
            r[act] = log_r
        return StepState(self.prompt, self.question, tuple(steps), tuple(token_ids), finished, log_p, log_q,
                         s.contexts.take(np.flatnonzero(~fin)), r)

    def _sample_twisted(self, t: int, xp: StepState, act: np.ndarray,
                        rng: np.random.Generator) -> tuple[StepSample, np.ndarray]:
        """One token for each unfinished particle from q_ψ ∝ q_τ ψ; returns the step and
        log q_τ - log q_ψ of each new token."""
        rows = [list(r) for r in xp.contexts.ids]
        with recording() as own:
            logprobs = self.lm.next_token_logprobs(rows)
        if own.forward_passes == 0:  # a custom LM that records nothing: one call, whole rows read
            record(forward_passes=1, prefill_tokens=sum(len(r) for r in rows))
        V = int(logprobs.shape[-1])
        if self._pieces is None or len(self._pieces) != V:
            self._pieces = token_pieces(self.lm, V)
        pieces = self._pieces
        eos = np.zeros(V, dtype=bool)
        eos[[v for v in self.lm.eos_token_ids if v < V]] = True
        if t >= self.T - 1:
            finished = np.ones((act.size, V), dtype=bool)
        else:
            finished = np.tile(eos, (act.size, 1))
            if self.stop is not None:
                for j, i in enumerate(act):
                    done = "".join(xp.steps[i])
                    finished[j] |= [bool(self.stop(done + s)) for s in pieces]
        partials = [Partial(self.prompt, xp.steps[i], False, self.question) for i in act]
        log_psi = token_log_potential(self.twist, partials, pieces, finished)
        gen = torch_generator(rng, str(getattr(logprobs, "device", self.lm.device)))
        tok, log_q, log_p, log_r = sample_twisted_tokens(logprobs, log_psi, self.temperature, gen)
        rec = StepRecorder(self.lm, act.size, None)
        rec.add(np.arange(act.size), tok, log_q, log_p)
        return rec.result(xp.contexts.extend(rec.ids)), log_r.cpu().numpy()
