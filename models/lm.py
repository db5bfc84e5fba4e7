"""Language models: the small interface SMC needs, with generic step sampling on top.

A custom language model implements four things::

    next_token_logprobs(contexts: list[list[int]]) -> torch.Tensor   (B, V): log p(next token | context)
    encode(text) -> list[int]        decode(ids) -> str
    eos_token_id                     an int, a list of ints, or None

Everything else has a generic implementation here: correct, and slow (every token
re-reads whole contexts). Backends override ``start`` and ``sample_steps`` with a
fast batched path (``HFLanguageModel`` keeps a KV cache per particle)::

    ctx = lm.start([prompt_ids]).take(np.zeros(N, int))    # N rows sharing the prompt
    s = lm.sample_steps(ctx, step_delimiter="\\n\\n", max_step_tokens=256,
                        temperature=0.8, generator=torch_generator(rng))
    s.contexts, s.token_ids, s.texts, s.eos, s.log_q, s.log_p

**Steps.** A step is sampled token by token from the tempered model
q_τ(v | context) ∝ p(v | context)^(1/τ) until the delimiter string appears in the
step's decoded text (the step keeps it), EOS is sampled (kept in ``token_ids``, not in
``texts``), or ``max_step_tokens`` tokens were drawn. ``step_delimiter=None`` means
one token per step. With multi-character tokens a step ends at the token that
completes the delimiter, so its text may run a few characters past it.

**Proposal vs model.** ``log_q`` is the log-probability of the sampled step under
q_τ (what was actually sampled from), ``log_p`` under the model itself (τ = 1). At
τ = 1 they are equal. A sampler that wants the model's own distribution as its
target adds ``log_p - log_q`` to the weight (``StepModel(target="model")``).

**Contexts.** Rows of token sequences, one per particle, with ``take(idx)`` (for
resampling; a backend reorders its cache rows, never re-encodes text) and
``Contexts.concat(parts)``. Randomness comes only from the ``torch.Generator`` passed in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


class Contexts:
    """A batch of token sequences (rows). Backends subclass it to carry their cache rows."""

    def __init__(self, ids: Sequence[Sequence[int]]) -> None:
        self.ids: list[tuple[int, ...]] = [tuple(r) for r in ids]

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, idx: Sequence[int] | np.ndarray) -> "Contexts":
        """The rows ``idx`` (repeats allowed), in that order."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if _is_identity(idx, len(self)):
            return self
        return Contexts([self.ids[i] for i in idx])

    def extend(self, new_ids: Sequence[Sequence[int]]) -> "Contexts":
        """Append ``new_ids[r]`` to row r."""
        return Contexts([old + tuple(new) for old, new in zip(self.ids, new_ids)])

    @classmethod
    def concat(cls, parts: Sequence["Contexts"]) -> "Contexts":
        return Contexts([r for p in parts for r in p.ids])


def _is_identity(idx: np.ndarray, n: int) -> bool:
    return idx.shape[0] == n and bool(np.array_equal(idx, np.arange(n)))


@dataclass
class StepSample:
    """One sampled step for each row of ``contexts`` (see the module docstring)."""

    contexts: Contexts          # the rows extended by their new tokens
    token_ids: list[list[int]]  # new tokens per row (EOS included if sampled)
    texts: list[str]            # decoded new text per row (EOS excluded)
    eos: np.ndarray             # (R,) bool: the step ended with EOS
    delimited: np.ndarray       # (R,) bool: the step ended with the delimiter
    log_q: np.ndarray           # (R,) log-probability of the step under the sampling distribution q_τ
    log_p: np.ndarray           # (R,) log-probability of the step under the model (τ = 1)

    @classmethod
    def empty(cls, contexts: Contexts) -> "StepSample":
        """The step of zero rows (every particle has finished)."""
        return cls(contexts, [], [], np.zeros(0, bool), np.zeros(0, bool), np.zeros(0), np.zeros(0))


def sample_tokens(logprobs: torch.Tensor, temperature: float,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one token per row of ``logprobs`` (B, V) (log-probabilities or logits) from
    q_τ ∝ softmax(logprobs / τ); returns tokens, log q_τ(token), log p(token)."""
    log_p = torch.log_softmax(logprobs.float(), dim=-1)
    log_q = log_p if temperature == 1.0 else torch.log_softmax(log_p / temperature, dim=-1)
    tok = torch.multinomial(log_q.exp(), 1, generator=generator)
    return tok.squeeze(1), log_q.gather(1, tok).squeeze(1), log_p.gather(1, tok).squeeze(1)


class _StepRecorder:
    """Per-row bookkeeping of one step: new tokens, log-probs, and why each row stopped."""

    def __init__(self, lm: "LanguageModel", R: int, step_delimiter: str | None) -> None:
        self.lm, self.delimiter = lm, step_delimiter
        self.eos_ids = lm.eos_token_ids
        self.ids: list[list[int]] = [[] for _ in range(R)]
        self.log_q, self.log_p = np.zeros(R), np.zeros(R)
        self.eos, self.delimited = np.zeros(R, bool), np.zeros(R, bool)

    def add(self, rows: Sequence[int], tok: torch.Tensor, log_q: torch.Tensor,
            log_p: torch.Tensor, check_delimiter: np.ndarray | None = None) -> np.ndarray:
        """Record one token for each of ``rows``; returns a bool array: row still generating.
        ``check_delimiter[j] = False`` promises the token cannot complete the delimiter."""
        rows, tok_l = np.asarray(rows, dtype=np.int64), tok.tolist()
        self.log_q[rows] += log_q.double().cpu().numpy()
        self.log_p[rows] += log_p.double().cpu().numpy()
        for r, t in zip(rows.tolist(), tok_l):
            self.ids[r].append(t)
        live = np.fromiter((t not in self.eos_ids for t in tok_l), dtype=bool, count=len(tok_l))
        self.eos[rows[~live]] = True
        if self.delimiter is None:
            live[:] = False
        else:
            candidates = live if check_delimiter is None else live & check_delimiter
            for j in np.flatnonzero(candidates):
                if self.delimiter in self.lm.decode(self.ids[rows[j]]):
                    self.delimited[rows[j]], live[j] = True, False
        self.lm._count(tokens=len(tok_l))
        return live

    def result(self, contexts: Contexts) -> StepSample:
        texts = [self.lm.decode([t for t in ids if t not in self.eos_ids]) for ids in self.ids]
        return StepSample(contexts, self.ids, texts, self.eos, self.delimited, self.log_q, self.log_p)


class LanguageModel:
    """Base class: implement ``next_token_logprobs``, ``encode``, ``decode`` and set
    ``eos_token_id``; step sampling and compute counters come for free."""

    eos_token_id: int | Sequence[int] | None = None
    device: str | torch.device = "cpu"

    # -- the minimal interface ---------------------------------------------------------
    def next_token_logprobs(self, contexts: list[list[int]]) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement next_token_logprobs(contexts)")

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError(f"{type(self).__name__} must implement encode(text)")

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError(f"{type(self).__name__} must implement decode(ids)")

    @property
    def eos_token_ids(self) -> frozenset[int]:
        eos = self.eos_token_id
        if eos is None:
            return frozenset()
        return frozenset([int(eos)] if isinstance(eos, (int, np.integer)) else (int(e) for e in eos))

    # -- compute counters --------------------------------------------------------------
    def _count(self, *, tokens: int = 0, forward_passes: int = 0) -> None:
        c = self.__dict__.setdefault("_counts", {"tokens": 0, "forward_passes": 0})
        c["tokens"] += tokens
        c["forward_passes"] += forward_passes

    def counters(self) -> dict[str, int]:
        """Cumulative ``tokens`` sampled and batched ``forward_passes`` of the model."""
        return dict(self.__dict__.get("_counts", {"tokens": 0, "forward_passes": 0}))

    # -- step sampling -----------------------------------------------------------------
    def start(self, ids: Sequence[Sequence[int]]) -> Contexts:
        """Contexts holding the token sequences ``ids`` (one row each, non-empty)."""
        if any(len(r) == 0 for r in ids):
            raise ValueError("every context needs at least one token (e.g. BOS); got an empty one")
        return Contexts(ids)

    def sample_steps(self, contexts: Contexts, *, step_delimiter: str | None, max_step_tokens: int,
                     temperature: float = 1.0, generator: torch.Generator) -> StepSample:
        """Sample one step for every row of ``contexts`` (module docstring)."""
        rec = _StepRecorder(self, len(contexts), step_delimiter)
        live = list(range(len(contexts)))
        for _ in range(1 if step_delimiter is None else max_step_tokens):
            if not live:
                break
            calls = self.counters()["forward_passes"]
            logprobs = self.next_token_logprobs([list(contexts.ids[r]) + rec.ids[r] for r in live])
            if self.counters()["forward_passes"] == calls:  # a custom LM that does not count its calls
                self._count(forward_passes=1)
            tok, log_q, log_p = sample_tokens(logprobs, temperature, generator)
            keep = rec.add(live, tok, log_q, log_p)
            live = [r for r, k in zip(live, keep) if k]
        return rec.result(contexts.extend(rec.ids))
