"""The compute ledger: what a run spent, counted the same way by every component.

Methods are compared at equal cost, so every backend, reward model and denoiser
reports what it does through one function::

    from ppl_scaling.ledger import record
    record(tokens=12, forward_passes=1)          # inside a language model's step
    record(reward_calls=16, reward_tokens=640)   # inside a reward model

``record`` adds to every ledger being *recorded* in the current context (nested
recordings all see the counts: a method's ledger includes its SMC runs'). The engine
records each of its steps; anyone can measure a block of code::

    with recording() as ledger:
        result = pps.smc(fk, 16, seed=0)
    ledger.tokens, ledger.wall_s, result.ledger     # the same counts

Counters (``Ledger`` fields): ``tokens`` generated tokens, ``prefill_tokens`` prompt /
context tokens encoded, ``forward_passes`` batched model calls, ``reward_calls`` values
scored by potentials (partials, samples), ``reward_tokens`` tokens a reward model
encoded, ``nfe`` denoiser evaluations (one per sample per call), ``escalated_calls`` values a
verification cascade passed on to its expensive tier (``samplers/verify_cascade.py``; every
value counts once in ``reward_calls``, the cheap tier), ``wall_s`` seconds.
Counts are recorded in the thread that called the component: a backend that works in
worker threads records after gathering their results.
"""
from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import asdict, dataclass, fields

__all__ = ["Ledger", "record", "recording"]


@dataclass
class Ledger:
    """Additive compute counters (see the module docstring)."""

    tokens: int = 0
    prefill_tokens: int = 0
    forward_passes: int = 0
    reward_calls: int = 0
    reward_tokens: int = 0
    nfe: int = 0
    escalated_calls: int = 0
    wall_s: float = 0.0

    def __add__(self, other: Ledger) -> Ledger:
        return Ledger(*(getattr(self, f) + getattr(other, f) for f in _FIELDS))

    def __sub__(self, other: Ledger) -> Ledger:
        return Ledger(*(getattr(self, f) - getattr(other, f) for f in _FIELDS))

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def _add(self, counts: dict[str, float]) -> None:
        for name, value in counts.items():
            setattr(self, name, getattr(self, name) + value)


_FIELDS = tuple(f.name for f in fields(Ledger))   # in order (a plain tuple: astuple deep-copies)
COUNTERS = frozenset(_FIELDS) - {"wall_s"}
_active: ContextVar[tuple[Ledger, ...]] = ContextVar("ppl_scaling_ledgers", default=())


def record(**counts: float) -> None:
    """Add ``counts`` (names of ``Ledger`` counters) to every ledger being recorded."""
    unknown = set(counts) - COUNTERS
    if unknown:
        raise TypeError(f"unknown ledger counter(s) {sorted(unknown)}; the counters are {sorted(COUNTERS)}")
    for ledger in _active.get():
        ledger._add(counts)


class recording:
    """``with recording() as ledger:`` records what the block spends (and its wall time)
    into a ledger, new or ``into``."""

    def __init__(self, into: Ledger | None = None) -> None:
        self.ledger = Ledger() if into is None else into

    def __enter__(self) -> Ledger:
        self._token = _active.set(_active.get() + (self.ledger,))
        self._start = time.perf_counter()
        return self.ledger

    def __exit__(self, *exc: object) -> None:
        self.ledger.wall_s += time.perf_counter() - self._start
        _active.reset(self._token)
