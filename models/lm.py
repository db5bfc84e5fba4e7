"""Language models: the small interface SMC needs, with generic step sampling on top.

A custom language model implements four things::

    next_token_logprobs(contexts: list[list[int]]) -> torch.Tensor   (B, V): log p(next token | context)
    encode(text) -> list[int]        decode(ids) -> str
    eos_token_id                     an int, a list of ints, or None

Everything else has a generic implementation here: correct, and slow (every token
re-reads whole contexts). Backends override ``start`` and ``sample_steps`` with a
fast batched path (``HFLanguageModel`` keeps a KV cache per particle; engines that
sample a whole step per request, vLLM and OpenAI-compatible servers, derive from
``EngineLanguageModel``)::

    ctx = lm.start([prompt_ids]).take(np.zeros(N, int))    # N rows sharing the prompt
    s = lm.sample_steps(ctx, step_delimiter="\\n\\n", max_step_tokens=256,
                        temperature=0.8, generator=torch_generator(rng))
    s.contexts, s.token_ids, s.texts, s.eos, s.log_q, s.log_p

**Steps.** A step is sampled token by token from the proposal q (below; by default the
tempered model q_τ(v | context) ∝ p(v | context)^(1/τ)) until the delimiter string appears in the
step's decoded text (the step keeps it), EOS is sampled (kept in ``token_ids``, not in
``texts``), or ``max_step_tokens`` tokens were drawn. ``step_delimiter=None`` means
one token per step. With multi-character tokens a step ends at the token that
completes the delimiter, so its text may run a few characters past it.

**Sampling controls** (``temperature``, ``top_p``, ``top_k``, ``min_p``; every backend, same
semantics as vLLM's sampler, ``process_logprobs``), applied to each next-token distribution
in vLLM's order:

1. temperature: q ∝ p^(1/τ);
2. min-p: drop the tokens with q(v) < min_p · max_v' q(v');
3. top-k: keep the tokens whose q is at least the k-th largest (ties with it are kept);
4. top-p: renormalise the kept tokens, sort them by probability and drop those whose
   probability mass *above* them (more probable tokens) is already >= top_p (the most
   probable token is always kept);

then renormalise. Tokens dropped have q = 0 (never sampled). Min-p and top-k commute (both
keep a most-probable prefix and neither depends on the renormalisation); top-p reads the
distribution left by the other two, so the order matters for it. Off: ``top_p=1``,
``top_k=None`` (or 0), ``min_p=0``; ``check_sampling`` validates them.

**Proposal vs model.** ``log_q`` is the log-probability of the sampled step under the
proposal q (tempered, truncated and renormalised: what was actually sampled from),
``log_p`` under the model itself (τ = 1, no truncation). With no control active they are
equal. A sampler that wants the model's own distribution as its target adds
``log_p - log_q`` to the weight (``StepModel(target="model")``); with truncation that is
exact only on the proposal's support (the tokens the controls keep), see ``StepModel``.

**Contexts.** Rows of token sequences, one per particle, with ``take(idx)`` (for
resampling; a backend reorders its cache rows, never re-encodes text) and
``Contexts.concat(parts)``. Randomness comes only from the ``torch.Generator`` passed in.

**Context length.** ``lm.context_length`` is the most tokens a row may hold, context plus
the tokens a step may add (None: unknown, not checked). A backend that knows it refuses a
row that does not fit (context + ``max_step_tokens`` > ``context_length``) with
``ContextLengthError``, whose message names the lengths, or, built with ``truncate="left"``,
drops the row's oldest tokens so that it fits.

**Compute.** Every backend reports its work to the ledger (``ppl_scaling.ledger.record``)
where it happens, in the calling thread:

- ``tokens``: tokens sampled (EOS included);
- ``prefill_tokens``: tokens fed to the model that it did not sample in the same call
  (prompts, contexts, scored rows);
- ``forward_passes``: batched model calls. The generic sampler records one per
  ``next_token_logprobs`` call (unless the model records its own) together with the
  context tokens it re-reads as ``prefill_tokens``; the backends document theirs.

**Merged calls.** ``lm.sample_steps_many(parts, ...)`` samples one step for the rows of
several independent callers in one backend call (``ppl_scaling.models.lockstep`` drives
it): ``parts`` are ``(contexts, generator)`` pairs and each part's rows draw from its own
generator exactly as ``sample_steps(contexts, generator=generator)`` alone would (per-row
group generators, ``RowGenerators``; engines draw each part's per-request seeds from its
generator). It records nothing itself: it returns, per part, the ``StepSample`` and the
``Ledger`` of what that part would have recorded alone (its sampled tokens, its rows'
prefill, the forward passes its own rows needed: the *stand-alone* rule, so a run's ledger
does not depend on what it was batched with; the shared passes are fewer). ``sample_steps``
is the one-part case. The base class runs the parts one after another.
"""
from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import torch

from ppl_scaling.ledger import Ledger, record, recording

T = TypeVar("T")
SEED_HIGH = 2**31 - 1  # per-request seeds, valid for vLLM and OpenAI-compatible servers
TRUNCATIONS = (None, "left")


class ContextLengthError(ValueError):
    """An input does not fit a model's context window. ``length``: the tokens it needs
    (context plus the new tokens asked for), ``limit``: the model's context length; the
    message names both and what to change."""

    def __init__(self, message: str, *, length: int | None = None, limit: int | None = None) -> None:
        super().__init__(message)
        self.length, self.limit = length, limit


def fit_context(rows: Sequence[Sequence[int]], new_tokens: int, limit: int | None, *,
                truncate: str | None = None, who: str = "the model") -> tuple[list[Sequence[int]], list[int]]:
    """Rows that fit ``limit`` (a context length; None: no check) with ``new_tokens`` more tokens
    each. A row with len(row) + new_tokens > limit raises ``ContextLengthError`` naming the
    lengths, or with ``truncate="left"`` keeps its last limit - new_tokens tokens. Returns the
    rows and the indices of the truncated ones."""
    if truncate not in TRUNCATIONS:
        raise ValueError(f"truncate must be one of {TRUNCATIONS}, got {truncate!r}")
    if limit is None:
        return list(rows), []
    out, cut = list(rows), []
    for i, r in enumerate(rows):
        need = len(r) + new_tokens
        if need <= limit:
            continue
        room = limit - new_tokens
        if truncate == "left" and room >= 1:
            out[i] = r[len(r) - room:]
            cut.append(i)
            continue
        hint = (f"lower max_step_tokens: {new_tokens} new tokens alone leave no room for a context" if room < 1 else
                "shorten the prompt, lower max_step_tokens or max_steps, or build the model with truncate='left'")
        raise ContextLengthError(f"{who}: a context of {len(r)} tokens plus {new_tokens} new tokens ({need}) "
                                 f"exceeds the context length of {limit} tokens; {hint}", length=need, limit=limit)
    return out, cut


class Contexts:
    """A batch of token sequences (rows). Backends subclass it to carry their cache rows."""

    def __init__(self, ids: Sequence[Sequence[int]]) -> None:
        self.ids: list[tuple[int, ...]] = [tuple(r) for r in ids]

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, idx: Sequence[int] | np.ndarray) -> "Contexts":
        """The rows ``idx`` (repeats allowed), in that order."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if is_identity(idx, len(self)):
            return self
        return Contexts([self.ids[i] for i in idx])

    def extend(self, new_ids: Sequence[Sequence[int]]) -> "Contexts":
        """Append ``new_ids[r]`` to row r."""
        return Contexts([old + tuple(new) for old, new in zip(self.ids, new_ids)])

    @classmethod
    def concat(cls, parts: Sequence["Contexts"]) -> "Contexts":
        return Contexts([r for p in parts for r in p.ids])


def is_identity(idx: np.ndarray, n: int) -> bool:
    """Is ``idx`` the index array 0 .. n-1 (a reordering that changes nothing)?"""
    return idx.shape[0] == n and bool(np.array_equal(idx, np.arange(n)))


def merge_eos(*eos: int | Sequence[int] | None) -> list[int] | None:
    """The sorted union of EOS ids, each given as an id, a list of ids or None
    (a tokenizer's and a generation config's); None when there are none."""
    ids: set[int] = set()
    for e in eos:
        if e is not None:
            ids |= {int(e)} if isinstance(e, (int, np.integer)) else {int(i) for i in e}
    return sorted(ids) or None


def draw_seeds(generator: torch.Generator, n: int) -> list[int]:
    """``n`` per-request seeds drawn from ``generator`` (reproducible, distinct streams)."""
    return torch.randint(0, SEED_HIGH, (n,), generator=generator).tolist() if n else []


def measured(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, Ledger]:
    """``fn(*args, **kwargs)`` run in a fresh context, so what it records reaches no ledger of
    the caller's; returns its result and a ``Ledger`` of what it recorded."""
    def body() -> tuple[T, Ledger]:
        with recording() as spent:
            out = fn(*args, **kwargs)
        return out, spent

    return contextvars.Context().run(body)


def record_ledger(ledger: Ledger) -> None:
    """``record`` the counters of ``ledger`` (its ``wall_s`` aside) in the calling context."""
    record(**{k: v for k, v in ledger.as_dict().items() if k != "wall_s" and v})


def apportion(total: int, weights: Sequence[int]) -> list[int]:
    """``total`` split into integers in proportion to ``weights`` (largest remainders; the
    parts add up to ``total``; equal to ``weights`` when they add up to ``total``)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.sum() <= 0:
        return [0] * len(w)
    exact = total * w / w.sum()
    out = np.floor(exact).astype(np.int64)
    out[np.argsort(-(exact - out), kind="stable")[:total - int(out.sum())]] += 1
    return out.tolist()


class RowGenerators:
    """Generators for groups of consecutive rows of a merged batch: the rows with ``group[r] == g``
    draw from ``generators[g]``, exactly as a call on those rows alone with that generator
    would (same draws, same order). ``group`` is non-decreasing."""

    def __init__(self, generators: Sequence[torch.Generator], group: np.ndarray) -> None:
        self.generators, self.group = list(generators), np.asarray(group, dtype=np.int64)

    def take(self, rows: np.ndarray) -> "RowGenerators":
        """The generators of the rows ``rows`` (increasing), as a batch of their own."""
        return RowGenerators(self.generators, self.group[rows])

    def segments(self) -> list[tuple[int, int, int]]:
        """``(g, start, stop)`` for each group present, in row order."""
        if self.group.size == 0:
            return []
        cuts = np.flatnonzero(np.diff(self.group)) + 1
        starts, stops = np.r_[0, cuts], np.r_[cuts, self.group.size]
        return [(int(self.group[a]), int(a), int(b)) for a, b in zip(starts, stops)]


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

    def rows(self, start: int, stop: int, contexts: Contexts) -> "StepSample":
        """Rows ``start .. stop - 1`` of this step, with ``contexts`` their extended rows."""
        return StepSample(contexts, self.token_ids[start:stop], self.texts[start:stop], self.eos[start:stop],
                          self.delimited[start:stop], self.log_q[start:stop], self.log_p[start:stop])


def check_sampling(temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None,
                   min_p: float = 0.0) -> tuple[float, float, int | None, float]:
    """Validate the sampling controls (module docstring); returns them normalised:
    ``(temperature, top_p, top_k, min_p)`` with ``top_k`` None when off (None or 0 given).
    Raises ``ValueError`` naming the control, its range and the value."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.integer, np.floating)) \
            or not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be positive and finite, got {temperature!r}; "
                         "a deterministic (greedy) proposal gives resampled copies no diversity")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.integer, np.floating)) \
            or not (0.0 < float(top_p) <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] (1: off), got {top_p!r}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
            raise ValueError(f"top_k must be an integer >= 1, or None / 0 (off), got {top_k!r}")
        top_k = int(top_k) or None
    if isinstance(min_p, bool) or not isinstance(min_p, (int, float, np.integer, np.floating)) \
            or not (0.0 <= float(min_p) < 1.0):
        raise ValueError(f"min_p must be in [0, 1) (0: off), got {min_p!r}")
    return float(temperature), float(top_p), top_k, float(min_p)


def truncates(top_p: float = 1.0, top_k: int | None = None, min_p: float = 0.0) -> bool:
    """Does any truncation control (top-p, top-k, min-p) act?"""
    return top_p < 1.0 or bool(top_k) or min_p > 0.0


def process_logprobs(logprobs: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                     top_k: int | None = None, min_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The proposal of ``logprobs`` (B, V) (log-probabilities or logits) under the sampling
    controls, in vLLM's order (module docstring): returns ``(log_q, log_p)``, the (B, V)
    log-probabilities of the tempered, truncated, renormalised proposal (-inf outside the
    kept tokens) and of the model (log-softmax of the input). Computed in the input's
    floating dtype (float32 for half-precision inputs)."""
    x = logprobs if logprobs.dtype in (torch.float32, torch.float64) else logprobs.float()
    log_p = torch.log_softmax(x, dim=-1)
    log_q = log_p if temperature == 1.0 else torch.log_softmax(log_p / temperature, dim=-1)
    if not truncates(top_p, top_k, min_p):
        return log_q, log_p
    neg = torch.tensor(-float("inf"), dtype=log_q.dtype, device=log_q.device)
    z = log_q
    if min_p > 0.0:  # q(v) < min_p * max q: dropped (vLLM compares probabilities)
        q = z.exp()
        z = torch.where(q < min_p * q.amax(dim=-1, keepdim=True), neg, z)
    V = z.shape[-1]
    if top_k is not None and top_k < V:  # below the k-th largest value: dropped (ties kept)
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
        z = torch.where(z < kth, neg, z)
    if top_p < 1.0:  # vLLM: ascending sort, cumulative mass <= 1 - p dropped, the largest kept
        srt, idx = z.sort(dim=-1, descending=False)
        cum = torch.softmax(srt, dim=-1).cumsum(dim=-1)
        drop = cum <= 1.0 - top_p
        drop[:, -1] = False
        z = z.scatter(-1, idx, srt.masked_fill(drop, -float("inf")))
    return torch.log_softmax(z, dim=-1), log_p


def sample_tokens(logprobs: torch.Tensor, temperature: float, generator: torch.Generator | RowGenerators, *,
                  top_p: float = 1.0, top_k: int | None = None,
                  min_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one token per row of ``logprobs`` (B, V) (log-probabilities or logits) from the
    proposal q of ``process_logprobs`` (by default q_τ ∝ softmax(logprobs / τ)); returns
    tokens, log q(token), log p(token). With ``RowGenerators`` each group of rows is drawn
    by its own generator, as a call on that group alone would draw it."""
    log_q, log_p = process_logprobs(logprobs.float(), temperature, top_p, top_k, min_p)
    q = log_q.exp()
    if isinstance(generator, RowGenerators):
        tok = torch.cat([torch.multinomial(q[a:b], 1, generator=generator.generators[g])
                         for g, a, b in generator.segments()]) if len(q) else q.new_zeros((0, 1), dtype=torch.long)
    else:
        tok = torch.multinomial(q, 1, generator=generator)
    return tok.squeeze(1), log_q.gather(1, tok).squeeze(1), log_p.gather(1, tok).squeeze(1)


class StepRecorder:
    """Per-row bookkeeping of one step sampled token by token: new tokens, log-probs,
    and why each row stopped. Records the sampled ``tokens`` to the ledger."""

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
        record(tokens=len(tok_l))
        return live

    def result(self, contexts: Contexts) -> StepSample:
        """The ``StepSample`` of the recorded tokens, with ``contexts`` the extended rows."""
        texts = [self.lm.decode([t for t in ids if t not in self.eos_ids]) for ids in self.ids]
        return StepSample(contexts, self.ids, texts, self.eos, self.delimited, self.log_q, self.log_p)


class LanguageModel:
    """Base class: implement ``next_token_logprobs``, ``encode``, ``decode`` and set
    ``eos_token_id``; step sampling and compute accounting come for free."""

    eos_token_id: int | Sequence[int] | None = None
    device: str | torch.device = "cpu"
    context_length: int | None = None  # most tokens per row (context + a step's new tokens); None: unknown

    # -- the minimal interface ---------------------------------------------------------
    def next_token_logprobs(self, contexts: list[list[int]]) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement next_token_logprobs(contexts)")

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError(f"{type(self).__name__} must implement encode(text)")

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError(f"{type(self).__name__} must implement decode(ids)")

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset(merge_eos(self.eos_token_id) or ())

    # -- step sampling -----------------------------------------------------------------
    def start(self, ids: Sequence[Sequence[int]]) -> Contexts:
        """Contexts holding the token sequences ``ids`` (one row each, non-empty)."""
        if any(len(r) == 0 for r in ids):
            raise ValueError("every context needs at least one token (e.g. BOS); got an empty one")
        return Contexts(ids)

    def sample_steps(self, contexts: Contexts, *, step_delimiter: str | None, max_step_tokens: int,
                     temperature: float = 1.0, generator: torch.Generator, top_p: float = 1.0,
                     top_k: int | None = None, min_p: float = 0.0) -> StepSample:
        """Sample one step for every row of ``contexts`` (module docstring)."""
        temperature, top_p, top_k, min_p = check_sampling(temperature, top_p, top_k, min_p)
        rec = StepRecorder(self, len(contexts), step_delimiter)
        live = list(range(len(contexts)))
        for _ in range(1 if step_delimiter is None else max_step_tokens):
            if not live:
                break
            rows = [list(contexts.ids[r]) + rec.ids[r] for r in live]
            with recording() as own:
                logprobs = self.next_token_logprobs(rows)
            if own.forward_passes == 0:  # a custom LM that records nothing: one call, whole rows read
                record(forward_passes=1, prefill_tokens=sum(len(r) for r in rows))
            tok, log_q, log_p = sample_tokens(logprobs, temperature, generator, top_p=top_p, top_k=top_k,
                                              min_p=min_p)
            keep = rec.add(live, tok, log_q, log_p)
            live = [r for r, k in zip(live, keep) if k]
        return rec.result(contexts.extend(rec.ids))

    def sample_steps_many(self, parts: Sequence[tuple[Contexts, torch.Generator]], *, step_delimiter: str | None,
                          max_step_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                          top_k: int | None = None, min_p: float = 0.0) -> list[tuple[StepSample, Ledger]]:
        """One step for the rows of every part ``(contexts, generator)``, each part drawing from
        its own generator; returns per part the step and what it would have cost alone (module
        docstring: merged calls). Records nothing. Here: the parts one after another through
        ``sample_steps``; backends that batch override it."""
        controls = dict(top_p=top_p, top_k=top_k, min_p=min_p) if truncates(top_p, top_k, min_p) else {}
        return [measured(self.sample_steps, c, step_delimiter=step_delimiter, max_step_tokens=max_step_tokens,
                         temperature=temperature, generator=g, **controls) for c, g in parts]


class MergingLanguageModel(LanguageModel):
    """A backend whose own call is ``sample_steps_many`` (many parts in shared passes or one
    engine request): ``sample_steps`` is its one-part case, recorded in the ledger."""

    def sample_steps(self, contexts: Contexts, *, step_delimiter: str | None, max_step_tokens: int,
                     temperature: float = 1.0, generator: torch.Generator, top_p: float = 1.0,
                     top_k: int | None = None, min_p: float = 0.0) -> StepSample:
        """Sample one step for every row (module docstring: the step, the sampling controls
        ``temperature``, ``top_p``, ``top_k``, ``min_p`` in vLLM's order, log q / log p)."""
        (step, spent), = self.sample_steps_many([(contexts, generator)], step_delimiter=step_delimiter,
                                                max_step_tokens=max_step_tokens, temperature=temperature,
                                                top_p=top_p, top_k=top_k, min_p=min_p)
        record_ledger(spent)
        return step


@dataclass
class StepReply:
    """An engine's answer to one step request."""

    token_ids: list[int]           # the new tokens (EOS included if sampled)
    logprobs: np.ndarray | None    # log q of each new token under the proposal (None: not requested)
    eos: bool                      # the step ended with EOS
    delimited: bool                # the step ended with the delimiter


class EngineLanguageModel(MergingLanguageModel):
    """Base of backends whose engine samples a whole step per request (vLLM in-process,
    OpenAI-compatible servers). One ``sample_steps`` sends one request per row, with a
    per-row seed from the generator, the step delimiter as stop string and the step
    length as ``max_tokens``. Subclasses implement ``request_steps`` and
    ``token_logprobs`` and set ``logprobs`` / ``exact_log_p``:

    - ``logprobs=False``: no log-probabilities are asked for (``log_q``, ``log_p`` NaN);
    - log q is what the engine returns for the sampled tokens (vLLM's processed
      log-probabilities: after temperature, min-p, top-k, top-p); when the proposal is not
      the model (τ ≠ 1 or a truncation control active), log p comes from a scoring request
      of context + step (``exact_log_p=False``: NaN instead).

    The sampling controls go to the engine with every request (``request_steps``'s
    ``top_p``, ``top_k``, ``min_p``; off: 1, None, 0).

    Ledger: a step records its sampled ``tokens``, the contexts sent as
    ``prefill_tokens`` (an engine's prefix cache may serve part of them) and, as
    ``forward_passes``, the engine steps of a batch that runs all requests together: the
    length of the longest step. A scoring request records its rows as ``prefill_tokens``
    and one forward pass.
    """

    logprobs: bool = True
    exact_log_p: bool = True

    def request_steps(self, rows: Sequence[Sequence[int]], *, stop: str | None, max_tokens: int,
                      temperature: float, seeds: Sequence[int], top_p: float = 1.0, top_k: int | None = None,
                      min_p: float = 0.0) -> list[StepReply]:
        """One step request per row (``stop``: the delimiter, kept in the output; EOS ids stop too),
        sampled under the controls (module docstring of ``ppl_scaling.models.lm``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement request_steps")

    def token_logprobs(self, rows: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """For each row, log p(row[i] | row[:i]) for i = 1 .. len(row)-1 (length len(row)-1)."""
        raise NotImplementedError(f"{type(self).__name__} must implement token_logprobs")

    def decode_rows(self, rows: Sequence[Sequence[int]]) -> list[str]:
        """``decode`` of each row (a backend may batch or parallelise it)."""
        return [self.decode(r) for r in rows]

    def sample_steps_many(self, parts: Sequence[tuple[Contexts, torch.Generator]], *, step_delimiter: str | None,
                          max_step_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                          top_k: int | None = None, min_p: float = 0.0) -> list[tuple[StepSample, Ledger]]:
        """All parts' rows in one ``request_steps`` call (and one scoring call for log p), each
        part's seeds drawn from its own generator. Ledger per part: its tokens, its contexts as
        ``prefill_tokens`` and its longest step as ``forward_passes``; the scoring call's
        ``prefill_tokens`` apportioned by the parts' row lengths (exact unless rows were
        truncated) and one forward pass each."""
        temperature, top_p, top_k, min_p = check_sampling(temperature, top_p, top_k, min_p)
        sizes = [len(c) for c, _ in parts]
        seeds = [s for (c, g) in parts for s in draw_seeds(g, len(c))]
        bounds = np.r_[0, np.cumsum(sizes)].tolist()
        merged = Contexts([r for c, _ in parts for r in c.ids])
        if not merged.ids:
            return [(StepSample.empty(c), Ledger()) for c, _ in parts]
        controls = dict(top_p=top_p, top_k=top_k, min_p=min_p) if truncates(top_p, top_k, min_p) else {}
        replies, _ = measured(self.request_steps, merged.ids, stop=step_delimiter,
                              max_tokens=1 if step_delimiter is None else int(max_step_tokens),
                              temperature=float(temperature), seeds=seeds, **controls)
        token_ids = [r.token_ids for r in replies]
        scoring = Ledger()
        if self.logprobs:
            token_lps = [np.asarray(r.logprobs, dtype=np.float64) for r in replies]
            log_q = np.array([lp.sum() for lp in token_lps])
            log_p, scoring = measured(self._model_log_p, merged, token_ids, token_lps, log_q, temperature,
                                      truncated=bool(controls))
        else:
            log_q, log_p = np.full(len(replies), np.nan), np.full(len(replies), np.nan)
        eos_ids = self.eos_token_ids
        texts = self.decode_rows([[t for t in ids if t not in eos_ids] for ids in token_ids])
        step = StepSample(merged.extend(token_ids), token_ids, texts, np.array([r.eos for r in replies], bool),
                          np.array([r.delimited for r in replies], bool), log_q, log_p)
        scored = apportion(scoring.prefill_tokens, [sum(len(r) + len(t) for r, t in zip(c.ids, token_ids[a:b]))
                                                    for (c, _), a, b in zip(parts, bounds, bounds[1:])])
        out = []
        for (c, _), a, b, prefill in zip(parts, bounds, bounds[1:], scored):
            if a == b:
                out.append((StepSample.empty(c), Ledger()))
                continue
            own = token_ids[a:b]
            spent = Ledger(tokens=sum(len(t) for t in own), prefill_tokens=sum(len(r) for r in c.ids) + prefill,
                           forward_passes=max(len(t) for t in own) + min(scoring.forward_passes, 1))
            out.append((step.rows(a, b, c.extend(own)), spent))
        return out

    def _model_log_p(self, contexts: Contexts, token_ids: list[list[int]], token_lps: list[np.ndarray],
                     log_q: np.ndarray, temperature: float, truncated: bool = False) -> np.ndarray:
        """log p of each new step under the model (τ = 1, no truncation), by scoring context + step."""
        if temperature == 1.0 and not truncated:
            return log_q.copy()
        if not self.exact_log_p:
            return np.full(len(token_ids), np.nan)
        scores = self.token_logprobs([list(c) + list(t) for c, t in zip(contexts.ids, token_ids)])
        new = [s[len(s) - len(t):] if t else s[:0] for s, t in zip(scores, token_ids)]
        if temperature != 1.0:  # at τ = 1 a truncated proposal may equal the model on the sampled tokens
            self.check_proposal_logprobs(np.concatenate(token_lps), np.concatenate(new), temperature)
        return np.array([s.sum() for s in new])

    def check_proposal_logprobs(self, sampled: np.ndarray, scored: np.ndarray, temperature: float) -> None:
        """Hook: refuse sampled-token log-probabilities that are not the proposal's (log q_τ),
        given the model's own (``scored``) at ``temperature`` != 1. Default: trust the engine."""
