"""Potentials: functions that score batches of particle values, and their algebra.

A *potential* phi >= 0 scores the values particles hold — partial LLM generations
(``ppl_scaling.models.types.Partial``), diffusion states, any Python object — and
works in log space throughout. Its log-value log phi(x) is also called the *reward*
r(x): the FK shapes of ``ppl_scaling.shapes`` turn rewards into the potentials
G_t of a Feynman-Kac model, with target p(x) exp(lam r(x)).

The contract (after genlm-control's "prefix / complete" potentials)
--------------------------------------------------------------------
A potential has two methods over a batch ``xs`` of N values::

    prefix(xs)   -> (N,) float64   log-value of *partial* values (generation still running)
    complete(xs) -> (N,) float64   log-value of *finished* values (default: same as prefix)

and one derived method that the models call::

    score(xs, finished) -> (N,)    complete(xs) where finished, prefix(xs) elsewhere;
                                   one batched call of each on its sub-batch.

1. Values are floats in [-inf, +inf): -inf rejects a particle (phi = 0). NaN and
   +inf are errors (``PotentialError``, naming the potential and the method).
2. Rejection is final: prefix(x) = -inf implies complete(x) = -inf and
   prefix(y) = complete(y) = -inf for every extension y of x.
3. Particles are scored independently: the value of a particle does not depend on
   the other values in the batch or their order, and the same value scores the
   same every time (no sampling inside a potential).

``check_potential(p, xs, ...)`` tests 1-3 on example values; ``PotentialContractTests``
is the same as a pytest mixin for a user's own test suite.

Batches: a Python ``list`` holds one value per particle; every other batch follows
``ppl_scaling.state`` (numpy / torch / JAX arrays with a leading particle axis, dicts
and tuples of them, or objects with ``take(idx)``).

Algebra (every result is again a ``Potential``)::

Coercion: ``as_potential(obj)`` is the boundary every steering method passes its
reward through — a ``Potential`` is kept, a Python function ``fn(xs) -> log-values``
becomes ``Potential.from_callable(fn)``; anything else is refused with a hint. So PRMs,
classifiers, functions and Pyro programs steer LLMs and diffusion alike.

    p * q                  log-values add          (product of potentials)
    p ** lam, p.tempered(lam)   log-values times lam >= 0 (-inf stays -inf)
    Potential.from_callable(fn, complete=None)   a Python function of the batch
    PyroPotential(program)  the observed / factor sites of a Pyro program
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .errors import PotentialError
from .ledger import record
from .state import num_particles
from .state import take as take_state

__all__ = [
    "Potential", "Product", "Tempered", "CallablePotential", "PyroPotential",
    "check_potential", "PotentialContractTests", "batch_size", "subset", "as_potential",
]


# --- batches -----------------------------------------------------------------------

def batch_size(xs: Any) -> int:
    """Number of particle values in the batch ``xs``."""
    if isinstance(xs, list):
        return len(xs)
    n = num_particles(xs)
    if n is None:
        raise TypeError(
            f"cannot tell the number of particles in a batch of type {type(xs).__name__}: "
            "pass a list of values, arrays/tensors with a leading particle axis, "
            "or an object with num_particles and take(idx)"
        )
    return n


def subset(xs: Any, idx: np.ndarray) -> Any:
    """The sub-batch of particles ``idx``."""
    if isinstance(xs, list):
        return [xs[i] for i in idx]
    return take_state(xs, np.ascontiguousarray(idx, dtype=np.int64))


def as_log_values(values: Any, n: int, where: str) -> np.ndarray:
    """Validate the output of a potential method: an (n,) float64 array in [-inf, inf).

    Accepts numpy arrays, lists and torch/JAX arrays; booleans mean
    True -> 0 (accept), False -> -inf (reject). ``where`` names the culprit in errors.
    """
    if hasattr(values, "detach"):  # torch
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.dtype == bool:
        arr = np.where(arr, 0.0, -np.inf)
    if not (np.issubdtype(arr.dtype, np.number)):
        raise PotentialError(f"{where} returned values of dtype {arr.dtype}; return numbers (log-values)")
    arr = np.array(arr, dtype=np.float64)  # a copy: callers may update it in place
    if arr.shape != (n,):
        hint = " (squeeze the trailing axis)" if arr.size == n else ""
        raise PotentialError(
            f"{where} returned shape {arr.shape} for a batch of {n} values; "
            f"expected one log-value per particle, shape ({n},){hint}"
        )
    bad = np.isnan(arr) | (arr == np.inf)
    if bad.any():
        idx = np.flatnonzero(bad)
        raise PotentialError(
            f"{where} returned {'NaN' if np.isnan(arr[idx[0]]) else '+inf'} for particles "
            f"{idx[:10].tolist()}{' ...' if idx.size > 10 else ''}; log-values must be finite, "
            "or -inf to reject a particle"
        )
    return arr


# --- the base class ----------------------------------------------------------------

class Potential:
    """Base class. Override ``prefix`` (and ``complete`` if it differs); see the module
    docstring for the contract. ``name`` appears in error messages."""

    name: str | None = None

    def prefix(self, xs: Any) -> np.ndarray:
        raise NotImplementedError(f"{self} must implement prefix(xs)")

    def complete(self, xs: Any) -> np.ndarray:
        return self.prefix(xs)

    # -- validated evaluation ------------------------------------------------------
    def evaluate(self, method: str, xs: Any) -> np.ndarray:
        """``prefix`` or ``complete`` on ``xs``, validated (shape, NaN, +inf)."""
        if method not in ("prefix", "complete"):
            raise ValueError(f"method must be 'prefix' or 'complete', got {method!r}")
        n = batch_size(xs)
        if n == 0:
            return np.zeros(0)
        return as_log_values(getattr(self, method)(xs), n, f"potential {self}.{method}")

    def score(self, xs: Any, finished: Any = False) -> np.ndarray:
        """complete(xs) where ``finished``, prefix(xs) elsewhere; (N,) float64.
        Records ``reward_calls`` = N in the compute ledger."""
        n = batch_size(xs)
        record(reward_calls=n)
        fin = np.broadcast_to(np.asarray(finished, dtype=bool), (n,))
        if fin.all() or not fin.any():
            return self.evaluate("complete" if fin.any() else "prefix", xs)
        out = np.empty(n)
        for method, mask in (("complete", fin), ("prefix", ~fin)):
            idx = np.flatnonzero(mask)
            out[idx] = self.evaluate(method, subset(xs, idx))
        return out

    # -- algebra ------------------------------------------------------------------
    def __mul__(self, other: Potential) -> Potential:
        if not isinstance(other, Potential):
            raise TypeError(
                f"cannot multiply {self} by {type(other).__name__}: both factors must be Potentials "
                "(wrap a function with Potential.from_callable(fn), a Pyro program with PyroPotential)"
            )
        return Product([self, other])

    def __pow__(self, lam: float) -> Potential:
        return self.tempered(lam)

    def tempered(self, lam: float) -> Potential:
        """phi ** lam: log-values times ``lam`` (>= 0; -inf stays -inf)."""
        return Tempered(self, lam)

    @staticmethod
    def from_callable(fn: Callable[[Any], Any], complete: Callable[[Any], Any] | None = None, *,
                      batched: bool = True, name: str | None = None) -> Potential:
        """A potential from plain functions returning log-values / rewards.

        ``fn(xs)`` gives the prefix log-values of a batch (numpy, list, torch; booleans
        mean accept / reject); ``complete`` defaults to ``fn``. With ``batched=False``
        the functions take one value (an element of a list batch; for array batches,
        a batch of one) and are mapped over the batch.
        """
        return CallablePotential(fn, complete, batched=batched, name=name)

    def __repr__(self) -> str:
        return self.name or type(self).__name__


class Product(Potential):
    """phi_1 * ... * phi_k: log-values add. Factors after the first are only evaluated
    on particles that the earlier factors did not reject (expensive reward models
    skip what a cheap verifier already killed)."""

    def __init__(self, factors: Sequence[Potential]):
        flat: list[Potential] = []
        for f in factors:
            flat.extend(f.factors if isinstance(f, Product) else [f])
        self.factors = tuple(flat)

    def _combine(self, method: str, xs: Any) -> np.ndarray:
        total = self.factors[0].evaluate(method, xs)
        for f in self.factors[1:]:
            alive = np.flatnonzero(total > -np.inf)
            if alive.size == total.size:
                total = total + f.evaluate(method, xs)
            elif alive.size:
                total[alive] += f.evaluate(method, subset(xs, alive))
        return total

    def prefix(self, xs: Any) -> np.ndarray:
        return self._combine("prefix", xs)

    def complete(self, xs: Any) -> np.ndarray:
        return self._combine("complete", xs)

    def __repr__(self) -> str:
        return self.name or " * ".join(repr(f) for f in self.factors)


class Tempered(Potential):
    """phi ** lam for lam >= 0: log-values times lam; rejected particles stay rejected
    (the support is kept, also at lam = 0)."""

    def __init__(self, base: Potential, lam: float):
        lam = float(lam)
        if not np.isfinite(lam) or lam < 0:
            raise ValueError(f"tempering exponent must be finite and >= 0, got {lam}")
        if isinstance(base, Tempered):  # (phi ** a) ** b = phi ** (a b)
            base, lam = base.base, base.lam * lam
        self.base, self.lam = base, lam

    def _scale(self, v: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return np.where(np.isneginf(v), -np.inf, self.lam * v)

    def prefix(self, xs: Any) -> np.ndarray:
        return self._scale(self.base.evaluate("prefix", xs))

    def complete(self, xs: Any) -> np.ndarray:
        return self._scale(self.base.evaluate("complete", xs))

    def __repr__(self) -> str:
        return self.name or f"({self.base!r}) ** {self.lam:g}"


class CallablePotential(Potential):
    """A potential from Python functions; see ``Potential.from_callable``."""

    def __init__(self, fn: Callable[[Any], Any], complete: Callable[[Any], Any] | None = None, *,
                 batched: bool = True, name: str | None = None):
        if not callable(fn) or (complete is not None and not callable(complete)):
            raise TypeError("from_callable needs callables: fn(xs) -> log-values, complete(xs) -> log-values")
        self.fn, self.complete_fn, self.batched = fn, complete, batched
        self.name = name or getattr(fn, "__name__", None)

    def _call(self, fn: Callable[[Any], Any], xs: Any) -> Any:
        if self.batched:
            return fn(xs)
        values = [fn(x) for x in (xs if isinstance(xs, list) else _unbatch(xs))]
        return [float(v.item() if hasattr(v, "item") else v) for v in values]

    def prefix(self, xs: Any) -> Any:
        return self._call(self.fn, xs)

    def complete(self, xs: Any) -> Any:
        return self._call(self.complete_fn or self.fn, xs)


def _unbatch(xs: Any) -> list[Any]:
    return [subset(xs, np.array([i])) for i in range(batch_size(xs))]


class PyroPotential(Potential):
    """The log-density of a Pyro program's observations, as a potential.

    ``program(xs)`` receives the batch of values and declares evidence with
    ``pyro.factor(name, log_factor)`` and observed ``pyro.sample(name, dist, obs=...)``.
    The log-value of particle i is the sum over those sites of their log-probabilities
    at index i. **The particle dimension is the leading (leftmost) batch dimension** of
    every site: a site's ``log_prob`` must have shape (N, ...), trailing batch dims are
    summed (vectorise the program over particles, e.g. inside
    ``pyro.plate("particles", N, dim=-k)`` with k the number of batch dims). A latent
    (unobserved) sample site is an error: a potential scores, it never samples.
    ``complete`` defaults to ``program``.
    """

    def __init__(self, program: Callable[[Any], Any], complete: Callable[[Any], Any] | None = None, *,
                 name: str | None = None):
        self.program, self.complete_program = program, complete
        self.name = name or getattr(program, "__name__", None)

    def _log_values(self, program: Callable[[Any], Any], xs: Any) -> np.ndarray:
        import torch
        from pyro import poutine
        from pyro.poutine.util import site_is_subsample

        n = batch_size(xs)
        with torch.no_grad():
            trace = poutine.trace(program).get_trace(xs)
        total = np.zeros(n)
        for site in trace.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if not site["is_observed"]:
                raise PotentialError(
                    f"Pyro potential {self}: site {site['name']!r} samples a latent value; a potential "
                    "must not sample. Observe it (obs=...) or score with pyro.factor."
                )
            lp = site["fn"].log_prob(site["value"])
            lp = torch.as_tensor(lp, dtype=torch.float64)
            if lp.dim() == 0 or lp.shape[0] != n:
                raise PotentialError(
                    f"Pyro potential {self}: site {site['name']!r} has log_prob of shape {tuple(lp.shape)}; "
                    f"the particle dimension must be the leading batch dimension, of size {n} "
                    "(vectorise the program over the batch of values)"
                )
            total += lp.reshape(n, -1).sum(-1).cpu().numpy()
        return total

    def prefix(self, xs: Any) -> np.ndarray:
        return self._log_values(self.program, xs)

    def complete(self, xs: Any) -> np.ndarray:
        return self._log_values(self.complete_program or self.program, xs)


def as_potential(obj: Any, what: str = "reward") -> Potential:
    """``obj`` as a ``Potential``: potentials pass, callables are wrapped (batched)."""
    if isinstance(obj, Potential):
        return obj
    if callable(obj):
        return CallablePotential(obj)
    raise TypeError(
        f"the {what} must be a Potential or a function of a batch returning log-values, got "
        f"{type(obj).__name__}; wrap a Pyro program with PyroPotential(program)"
    )


# --- checking a potential against the contract ---------------------------------------

def check_potential(p: Potential, xs: Any, *, finished: Any = None,
                    prefixes: Callable[[Any], Sequence[Any]] | None = None,
                    atol: float = 1e-6, rtol: float = 1e-6) -> None:
    """Check potential ``p`` against the contract on the example batch ``xs``.

    Checks: (1) ``prefix``, ``complete`` and ``score`` return (N,) floats without
    NaN / +inf; (2) rejection is final — prefix(x) = -inf implies complete(x) = -inf,
    and, if ``prefixes(x)`` lists the earlier (partial) values of x, a rejected
    earlier value implies x is rejected; (3) each particle scores the same alone as in
    the batch, in reversed order, and on a repeated call; ``score`` agrees with
    ``prefix`` / ``complete`` under the mask ``finished`` (default: alternating).
    Float comparisons use ``atol`` / ``rtol`` (batched neural models pad inputs).
    Raises AssertionError listing every violation.
    """
    n = batch_size(xs)
    problems: list[str] = []

    def close(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        same_inf = np.isneginf(a) & np.isneginf(b)
        with np.errstate(invalid="ignore"):
            return same_inf | (np.abs(a - b) <= atol + rtol * np.abs(b))

    def run(what: str, f: Callable[[], np.ndarray]) -> np.ndarray | None:
        try:
            return f()
        except PotentialError as e:
            problems.append(f"{what}: {e}")
            return None

    pre = run("prefix", lambda: p.evaluate("prefix", xs))
    com = run("complete", lambda: p.evaluate("complete", xs))
    if pre is not None and com is not None:
        bad = np.flatnonzero(np.isneginf(pre) & ~np.isneginf(com))
        if bad.size:
            problems.append(f"prefix is -inf but complete is finite for particles {bad.tolist()} "
                            "(rejection must be final)")
        for method, full in (("prefix", pre), ("complete", com)):
            again = run(f"{method} (repeat)", lambda m=method: p.evaluate(m, xs))
            if again is not None and not close(again, full).all():
                problems.append(f"{method} is not deterministic: two calls differ at particles "
                                f"{np.flatnonzero(~close(again, full)).tolist()}")
            rev = np.arange(n)[::-1]
            rv = run(f"{method} (reversed)", lambda m=method: p.evaluate(m, subset(xs, rev)))
            if rv is not None and not close(rv[::-1], full).all():
                problems.append(f"{method} depends on the order of the batch at particles "
                                f"{np.flatnonzero(~close(rv[::-1], full)).tolist()}")
            for i in range(n):
                one = run(f"{method} (particle {i} alone)",
                          lambda m=method, i=i: p.evaluate(m, subset(xs, np.array([i]))))
                if one is not None and not close(one, full[i:i + 1]).all():
                    problems.append(f"{method} of particle {i} alone is {one[0]!r} but {full[i]!r} in the batch")
        fin = (np.arange(n) % 2 == 1) if finished is None else np.broadcast_to(np.asarray(finished, bool), (n,))
        sc = run("score", lambda: p.score(xs, fin))
        if sc is not None and not close(sc, np.where(fin, com, pre)).all():
            problems.append("score(xs, finished) differs from complete where finished / prefix elsewhere")
        if prefixes is not None:
            for i in range(n):
                x = subset(xs, np.array([i]))
                earlier = list(prefixes(x[0] if isinstance(x, list) else x))
                if not earlier:
                    continue
                ev = run(f"prefix of the earlier values of particle {i}",
                         lambda e=earlier: p.evaluate("prefix", e if isinstance(xs, list) else _stack(e)))
                if ev is not None and np.isneginf(ev).any() and not (np.isneginf(pre[i]) and np.isneginf(com[i])):
                    problems.append(f"particle {i}: an earlier value is rejected (-inf) but the particle "
                                    "is not (rejection must be final)")
    if problems:
        raise AssertionError(f"potential {p} breaks the contract:\n  - " + "\n  - ".join(problems))


def _stack(values: Sequence[Any]) -> Any:
    """Concatenate single-particle batches along the particle axis (arrays / tensors)."""
    first = values[0]
    if hasattr(first, "detach"):
        import torch

        return torch.cat(list(values))
    return np.concatenate([np.asarray(v) for v in values])


class PotentialContractTests:
    """pytest mixin: subclass it as ``class TestMine(PotentialContractTests)`` and define
    ``make_potential()`` and ``make_values()`` (a batch of example values); optional
    ``prefixes(x)`` lists the earlier partial values of x (see ``check_potential``)."""

    prefixes: Callable[[Any], Sequence[Any]] | None = None

    def make_potential(self) -> Potential:
        raise NotImplementedError

    def make_values(self) -> Any:
        raise NotImplementedError

    def test_potential_contract(self) -> None:
        check_potential(self.make_potential(), self.make_values(), prefixes=self.prefixes)
