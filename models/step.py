"""``StepModel``: stepwise LLM generation as a Feynman-Kac model.

A particle is the prompt plus the steps generated so far (a step ends with a delimiter
such as "\\n\\n", with EOS, or after ``max_step_tokens`` tokens). One SMC step samples
the next step of every unfinished particle; a potential scores the prefixes::

    fk = StepModel(lm, "Q:24+5-4\\n", potential=prm, step_delimiter="\\n",
                   max_steps=8, stop=r"A:-?\\d+\\n", temperature=0.8)
    result = pps.smc(fk, num_particles=16, seed=0)
    x = result.particles
    x.partials()          # list[Partial]: prompt, steps, finished
    x.completions()       # generated texts;  fk.texts(x): prompt + completion
    x.token_ids, x.log_p, x.log_q     # tokens, log p (model) and log q_τ (sampled) per particle
    result.compute        # tokens, forward_passes, reward_calls (+ the potential's own counters)

The FK model (t = 0 .. max_steps - 1):

    M0, M    sample one step from the tempered model q_τ for every unfinished particle
    logG_t   the potential's rewards r_t of the new prefixes, turned into potentials by an
             FK shape (``ppl_scaling.shapes``: difference, max, sum, last), with the terminal
             correction when a particle finishes, so that the final target is
                 q_τ(x) exp(lam r(x))   (target="tempered", the default; the PF paper), or
                 p(x)   exp(lam r(x))   (target="model": logG also gets log p(step) - log q_τ(step)).
             ``potential=None``: logG = 0 (plain sampling; with target="model" the weights
             still correct the temperature).
    done     EOS, the ``stop`` pattern found in the completion, or the last step t = max_steps - 1
             (the generation is then cut: the target lives on these truncated sequences).

A delimiter the model never produces makes every step ``max_step_tokens`` tokens long;
generation then ends at ``max_steps`` (or EOS). The potential is called once per step on
the particles that moved, as ``potential.score(partials, finished)`` if it has a
``score`` method, else ``potential(partials)``; either returns one reward per partial
(a float; -inf rejects the particle; NaN is an error).

The state (``StepState``) is columnar: per-particle steps, tokens, flags and FK-shape
accumulators, plus the language model's ``Contexts`` rows (KV cache) of the unfinished
particles only; ``take`` reorders them for resampling, finished particles hold none.
``M`` evaluates the potential of the states it creates and stores logG in them
(``StepState.logG``, which ``logG`` returns), so the shape accumulators travel with
the particles through resampling.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np

from ppl_scaling.errors import PotentialError
from ppl_scaling.fk import FeynmanKac
from ppl_scaling.rng import torch_generator
from ppl_scaling.shapes import FKShape

from .lm import Contexts, LanguageModel
from .types import Partial

TARGETS = ("tempered", "model")


@dataclass(frozen=True, eq=False)
class StepState:
    """N particles of a ``StepModel``; ``contexts`` holds one row per unfinished
    particle, in particle order."""

    prompt: str
    steps: tuple[tuple[str, ...], ...]
    token_ids: tuple[tuple[int, ...], ...]  # generated tokens per particle (EOS included)
    finished: np.ndarray        # (N,) bool
    log_p: np.ndarray           # (N,) log p of the generation under the model
    log_q: np.ndarray           # (N,) log q_τ of the generation under the sampling distribution
    logG: np.ndarray            # (N,) log potential of the latest move
    acc: dict[str, np.ndarray]  # FK-shape accumulators
    contexts: Contexts

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

    def _select(self, idx: np.ndarray, contexts: Contexts) -> "StepState":
        return StepState(self.prompt, tuple(self.steps[i] for i in idx), tuple(self.token_ids[i] for i in idx),
                         self.finished[idx], self.log_p[idx], self.log_q[idx], self.logG[idx],
                         {k: v[idx] for k, v in self.acc.items()}, contexts)

    def take(self, idx: Sequence[int] | np.ndarray) -> "StepState":
        idx = np.asarray(idx, dtype=np.int64)
        alive = idx[~self.finished[idx]]
        return self._select(idx, self.contexts.take(self._rows()[alive]))

    def where(self, mask: np.ndarray, other: "StepState") -> "StepState":
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

        return StepState(self.prompt, pick(self.steps, other.steps), pick(self.token_ids, other.token_ids),
                         pick(self.finished, other.finished), pick(self.log_p, other.log_p),
                         pick(self.log_q, other.log_q), pick(self.logG, other.logG),
                         {k: pick(v, other.acc[k]) for k, v in self.acc.items()}, contexts)

    def partials(self) -> list[Partial]:
        return [Partial(self.prompt, s, bool(f)) for s, f in zip(self.steps, self.finished)]

    def completions(self) -> list[str]:
        """The generated text of each particle (steps joined, prompt excluded)."""
        return ["".join(s) for s in self.steps]


class StepModel(FeynmanKac):
    """Stepwise generation from ``lm`` after ``prompt``, weighted by ``potential`` (module docstring).

    ``stop``: a regular expression searched in the completion, or a predicate on it,
    that ends a particle (e.g. the final-answer line). ``shape``/``lam``: the FK shape
    and the tempering of the rewards. ``target``: "tempered" or "model".
    """

    def __init__(self, lm: LanguageModel, prompt: str, potential: Any = None, *,
                 step_delimiter: str | None = "\n\n", max_steps: int = 40, max_step_tokens: int = 256,
                 temperature: float = 1.0, stop: str | Callable[[str], bool] | None = None,
                 shape: str = "difference", lam: float = 1.0, target: str = "tempered") -> None:
        if not isinstance(prompt, str) or prompt == "":
            raise ValueError("StepModel needs a non-empty prompt string; for unconditional generation "
                             "pass the model's BOS text (or any start text) as the prompt")
        if step_delimiter is not None and (not isinstance(step_delimiter, str) or step_delimiter == ""):
            raise ValueError(f"step_delimiter must be a non-empty string or None (one token per step), "
                             f"got {step_delimiter!r}")
        for name, value in (("max_steps", max_steps), ("max_step_tokens", max_step_tokens)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (np.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be positive and finite, got {temperature}; "
                             "a deterministic (greedy) proposal gives resampled copies no diversity")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if potential is not None and not (callable(potential) or hasattr(potential, "score")):
            raise TypeError(f"potential must have a score(partials, finished) method or be a callable "
                            f"partials -> rewards, got {type(potential).__name__}")
        self.prompt_ids = list(lm.encode(prompt))
        if not self.prompt_ids:
            raise ValueError(f"the prompt {prompt!r} encodes to no tokens")
        self.lm, self.prompt, self.potential = lm, prompt, potential
        self.step_delimiter, self.max_step_tokens = step_delimiter, int(max_step_tokens)
        self.temperature, self.target = float(temperature), target
        self.T = int(max_steps)
        self.shape = FKShape(shape, lam)
        self.stop = re.compile(stop).search if isinstance(stop, str) else stop
        self._prompt_contexts: Contexts | None = None
        self._reward_calls = 0

    # -- the FK model ------------------------------------------------------------------
    def M0(self, N: int, rng: np.random.Generator) -> StepState:
        if self._prompt_contexts is None:  # the prompt is encoded once, shared by every run
            self._prompt_contexts = self.lm.start([self.prompt_ids])
        zeros = np.zeros(N)
        x = StepState(self.prompt, ((),) * N, ((),) * N, np.zeros(N, dtype=bool), zeros, zeros, zeros,
                      self.shape.init(N), self._prompt_contexts.take(np.zeros(N, dtype=np.int64)))
        return self._advance(0, x, rng)

    def M(self, t: int, xp: StepState, rng: np.random.Generator) -> StepState:
        return self._advance(t, xp, rng)

    def logG(self, t: int, xp: StepState | None, x: StepState) -> np.ndarray:
        return x.logG

    def done(self, t: int, x: StepState) -> np.ndarray:
        return x.finished.copy()

    def counters(self) -> dict[str, int]:
        """The language model's ``tokens`` and ``forward_passes``, ``reward_calls``
        (partials scored by the potential) and the potential's own ``counters()`` if it has them."""
        own = getattr(self.potential, "counters", None)
        return {**self.lm.counters(), "reward_calls": self._reward_calls, **(own() if callable(own) else {})}

    # -- reading results -----------------------------------------------------------------
    def partials(self, x: StepState) -> list[Partial]:
        return x.partials()

    def texts(self, x: StepState) -> list[str]:
        """Prompt plus completion of each particle."""
        return [p.text for p in x.partials()]

    # -- one step ------------------------------------------------------------------------
    def _advance(self, t: int, xp: StepState, rng: np.random.Generator) -> StepState:
        act = np.flatnonzero(~xp.finished)
        if act.size == 0:
            return replace(xp, logG=np.zeros(xp.num_particles))
        s = self.lm.sample_steps(xp.contexts, step_delimiter=self.step_delimiter,
                                 max_step_tokens=self.max_step_tokens, temperature=self.temperature,
                                 generator=torch_generator(rng, str(self.lm.device)))
        steps, token_ids = list(xp.steps), list(xp.token_ids)
        for j, i in enumerate(act):
            steps[i] = steps[i] + (s.texts[j],)
            token_ids[i] = token_ids[i] + tuple(s.token_ids[j])
        fin = s.eos.copy()
        if t >= self.T - 1:
            fin[:] = True
        elif self.stop is not None:
            fin |= np.array([bool(self.stop("".join(steps[i]))) for i in act])
        logG = np.zeros(xp.num_particles)
        acc = {k: v.copy() for k, v in xp.acc.items()}
        if self.potential is not None:
            r = self._rewards(t, [Partial(self.prompt, steps[i], bool(f)) for i, f in zip(act, fin)], fin)
            logG[act], new = self.shape.step({k: v[act] for k, v in acc.items()}, r, final=fin)
            for k in acc:
                acc[k][act] = new[k]
        if self.target == "model":
            if np.isnan(s.log_p).any():
                raise ValueError(f"{type(self.lm).__name__} did not report the model's log-probabilities "
                                 "(log_p is NaN), which target='model' needs; use target='tempered'")
            logG[act] += s.log_p - s.log_q
        finished, log_p, log_q = xp.finished.copy(), xp.log_p.copy(), xp.log_q.copy()
        finished[act] = fin
        log_p[act] += s.log_p
        log_q[act] += s.log_q
        return StepState(self.prompt, tuple(steps), tuple(token_ids), finished, log_p, log_q, logG, acc,
                         s.contexts.take(np.flatnonzero(~fin)))

    def _rewards(self, t: int, partials: list[Partial], finished: np.ndarray) -> np.ndarray:
        pot = self.potential
        out = pot.score(partials, finished) if hasattr(pot, "score") else pot(partials)
        if hasattr(out, "detach"):
            out = out.detach().cpu().numpy()
        r = np.asarray(out, dtype=np.float64)
        self._reward_calls += len(partials)
        if r.shape != (len(partials),):
            raise PotentialError(f"the potential returned shape {np.shape(out)} at step t={t}; "
                                 f"expected ({len(partials)},), one reward per partial")
        if np.isnan(r).any():
            raise PotentialError(f"the potential returned NaN for {int(np.isnan(r).sum())} of {len(r)} "
                                 f"partials at step t={t}; return -inf to reject a particle, or fix the reward model")
        if np.isposinf(r).any():
            raise PotentialError(f"the potential returned +inf at step t={t}; rewards must be finite or -inf")
        return r
