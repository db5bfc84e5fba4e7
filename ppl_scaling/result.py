"""``SMCResult``: the one result of every method — the weighted particle population,
its diagnostics, the compute ledger, posterior and answer views, ArviZ export.

Per-step arrays (``ess``, ``resampled``, ``log_evidence_increments``) have one
entry per executed step t = 0..steps-1; ``resampled[t]`` says whether the
particles were selected (resampled) at the start of step t. Search methods (beam,
DVTS, SVDD, noise search) return search scores as ``log_weights`` and
``log_evidence = nan``. Methods that score their final particles with a reward
model put those log-values in ``rewards``; Markov chain methods (particle Gibbs,
parallel tempering) put the reference path of every iteration in ``trajectories``.

Answer views: given the answer of each particle (e.g. extracted from its text),
``result.select(answers, rule)`` applies a rule of ``ppl_scaling.aggregate``:
``argmax_weight``, ``argmax_reward``, ``weighted_majority``, ``majority_vote``,
``best_of_majority`` (by ``rewards`` when the method has them, else by log-weights), and the
path rules ``perplexity_consistency`` and ``rpc``, which read the particles' model log-probability
``log_p`` and tokens ``token_ids`` (LLM states: ``StepState``), and ``group_vote`` (a vote within
and then across the groups of ``info["groups"]``, e.g. the temperatures of ``multi_temperature``);
``result.weighted_answers(answers)`` lists the answer distribution.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from . import aggregate
from .ledger import Ledger
from .rng import as_generator
from .state import take
from .weights import ess as _ess
from .weights import normalise

SELECTION_RULES = (frozenset(aggregate.SELECTORS) | {"argmax_reward", "group_vote"}
                   | frozenset(aggregate.PATH_RULES))


@dataclass
class SMCResult:
    particles: Any
    log_weights: np.ndarray
    log_evidence: float
    ess: np.ndarray
    resampled: np.ndarray
    log_evidence_increments: np.ndarray
    done: np.ndarray | None = None
    history: list[Any] | None = None
    log_weights_history: list[np.ndarray] | None = None
    ancestors: list[np.ndarray] | None = None
    ledger: Ledger = field(default_factory=Ledger)
    info: dict[str, Any] = field(default_factory=dict)
    rewards: np.ndarray | None = None
    trajectories: list[Any] | None = None

    @property
    def num_particles(self) -> int:
        return int(self.log_weights.shape[0])

    @property
    def weights(self) -> np.ndarray:
        """Normalised final weights W (sum to one)."""
        return normalise(self.log_weights)

    @property
    def best_index(self) -> int:
        """Index of the particle of largest weight (the search methods' best path)."""
        return int(np.argmax(self.log_weights))

    @property
    def final_ess(self) -> float:
        return _ess(self.log_weights)

    @property
    def cumulative_log_evidence(self) -> np.ndarray:
        """log Z_t after each step t."""
        return np.cumsum(self.log_evidence_increments)

    def resample(self, k: int | None = None, *, seed: int | None = None,
                 rng: np.random.Generator | None = None) -> Any:
        """``k`` equally weighted draws (multinomial, i.i.d. order) from the final particles."""
        rng = as_generator(seed, rng)
        k = self.num_particles if k is None else int(k)
        return take(self.particles, rng.choice(self.num_particles, size=k, p=self.weights))

    def filtering_mean(self, f: Any = None) -> np.ndarray:
        """Σ_i W_{t,i} f(x_{t,i}) at every step t (needs ``store_history=True``);
        ``f`` defaults to the identity on array states."""
        if self.history is None:
            raise ValueError("run smc(..., store_history=True) to keep per-step particles")
        f = f or (lambda x: np.asarray(x, dtype=np.float64))
        return np.array([normalise(lw) @ f(x) for x, lw in zip(self.history, self.log_weights_history)])

    def lineage(self) -> np.ndarray:
        """(steps, N) int array: B[t, n] = index at step t of the ancestor of final particle n."""
        if self.ancestors is None:
            raise ValueError("run smc(..., store_history=True) to keep the genealogy")
        steps = len(self.ancestors)
        B = np.empty((steps, self.num_particles), dtype=np.int64)
        B[-1] = np.arange(self.num_particles)
        for t in range(steps - 1, 0, -1):
            B[t - 1] = self.ancestors[t][B[t]]
        return B

    def paths(self) -> list[Any]:
        """The full trajectory of every final particle: element t is the batch of
        states at step t along each final particle's ancestral line."""
        B = self.lineage()
        return [take(x, B[t]) for t, x in enumerate(self.history)]

    def num_unique_ancestors(self) -> np.ndarray:
        """Distinct ancestors at each step of the surviving lines (path degeneracy)."""
        return np.array([np.unique(b).size for b in self.lineage()])

    # -- answer views -------------------------------------------------------------------
    def select(self, answers: Sequence[Any], rule: str | None = None, *,
               key: Callable[[Any], Hashable] | None = None, min_share: float | None = None,
               k: int | None = None) -> Any:
        """The final answer by ``rule`` (default: the method's own, ``info["selection_rule"]``,
        else ``argmax_weight``) from the particles' ``answers`` (None = no answer).
        ``argmax_reward`` picks the answer of the particle with the highest final reward.
        ``min_share``: Best-of-Majority's frequency threshold (default ``info["min_share"]``,
        else 0.2). With ``k``, the list of up to ``k`` distinct submissions, best first
        (``aggregate.top_k``: rules ``argmax_reward``, ``majority_vote``, ``best_of_majority``).
        ``perplexity_consistency`` / ``rpc`` sum the model probability of each answer's distinct
        paths (``aggregate``), read from the particles' ``log_p`` and ``token_ids``; ``group_vote``
        votes within and across the groups of ``info["groups"]``."""
        rule = rule or self.info.get("selection_rule", "argmax_weight")
        if len(answers) != self.num_particles:
            raise ValueError(f"got {len(answers)} answers for {self.num_particles} particles")
        if min_share is None:
            min_share = float(self.info.get("min_share", 0.2))
        kw = {} if key is None else {"key": key}
        if k is not None:
            if rule not in aggregate.TOP_K_RULES:
                raise ValueError(f"k submissions need a rule of {list(aggregate.TOP_K_RULES)}, got {rule!r}")
            return aggregate.top_k(rule, answers, self._scores(), k, min_share=min_share, **kw)
        if rule == "argmax_weight":
            return aggregate.argmax_weight(answers, self.log_weights)
        if rule == "argmax_reward":
            return aggregate.argmax_weight(answers, self._scores())
        if rule == "weighted_majority":
            return aggregate.weighted_majority(answers, self.log_weights, **kw)
        if rule == "majority_vote":
            return aggregate.majority_vote(answers, **kw)
        if rule == "best_of_majority":
            return aggregate.best_of_majority(answers, self._scores(), min_share, **kw)
        if rule == "group_vote":
            if "groups" not in self.info:
                raise ValueError("rule 'group_vote' needs the group of every particle in info['groups'] "
                                 "(multi_temperature records the temperatures)")
            return aggregate.group_vote(answers, list(self.info["groups"]), **kw)
        if rule in aggregate.PATH_RULES:
            log_p, paths = self._paths(rule)
            return aggregate.perplexity_consistency(answers, log_p, paths, prune=rule == "rpc", **kw)
        raise ValueError(f"unknown selection rule {rule!r}; choose from {sorted(SELECTION_RULES)}")

    def _paths(self, rule: str) -> tuple[np.ndarray, list[Any]]:
        """The particles' model log-probabilities and token paths, for the path rules."""
        log_p, paths = getattr(self.particles, "log_p", None), getattr(self.particles, "token_ids", None)
        if log_p is None or paths is None:
            raise ValueError(f"rule {rule!r} reads each particle's model log-probability (log_p) and tokens "
                             f"(token_ids), which {type(self.particles).__name__} particles do not have; "
                             "use it on LLM runs (StepModel states)")
        return np.asarray(log_p, dtype=np.float64), list(paths)

    def _scores(self) -> np.ndarray:
        return self.log_weights if self.rewards is None else self.rewards

    def for_method(self, method: str, selection_rule: str, **info: Any) -> SMCResult:
        """This result labelled as the output of ``method`` with its default answer rule;
        ``rewards`` default to the final rewards a ``Tilted`` run carries."""
        if selection_rule not in SELECTION_RULES:
            raise ValueError(f"unknown selection rule {selection_rule!r}; choose from {sorted(SELECTION_RULES)}")
        rewards = self.rewards
        if rewards is None and isinstance(getattr(self.particles, "reward", None), np.ndarray):
            rewards = self.particles.reward
        return replace(self, rewards=rewards, info={**self.info, "method": method,
                                                    "selection_rule": selection_rule, **info})

    def weighted_answers(self, answers: Sequence[Any], *,
                         key: Callable[[Any], Hashable] | None = None) -> list[tuple[Any, float]]:
        """Distinct answers (grouped by ``key``, shown by their first member) with their total
        normalised weight, heaviest first."""
        lw = self.log_weights
        W = normalise(lw) if np.isfinite(np.max(lw)) else np.full(lw.shape, 1.0 / lw.size)
        first: dict[Any, Any] = {}
        totals: dict[Any, float] = {}
        for a, w in zip(answers, W):
            k = a if key is None or a is None else key(a)
            first.setdefault(k, a)
            totals[k] = totals.get(k, 0.0) + float(w)
        return sorted(((first[k], v) for k, v in totals.items()), key=lambda kv: -kv[1])

    def summary(self) -> str:
        steps = len(self.ess)
        lines = [
            f"SMCResult: {self.num_particles} particles, {steps} steps, model {self.info.get('model', '?')}",
            f"  log evidence      {self.log_evidence:.4f}",
            f"  final ESS         {self.final_ess:.1f} / {self.num_particles}",
            f"  min ESS           {self.ess.min():.1f} at step {int(self.ess.argmin())}" if steps else "",
            f"  resampled         {int(self.resampled.sum())} of {steps} steps ({self.info.get('selection', '?')})",
        ]
        if self.done is not None and self.done.any():
            lines.append(f"  finished          {int(self.done.sum())} of {self.num_particles} particles")
        for k, v in self.ledger.as_dict().items():
            if v:
                lines.append(f"  {k:<17} {v:.4g}" if isinstance(v, float) else f"  {k:<17} {v}")
        return "\n".join(line for line in lines if line)

    def __repr__(self) -> str:
        return (f"SMCResult(num_particles={self.num_particles}, steps={len(self.ess)}, "
                f"log_evidence={self.log_evidence:.4f}, final_ess={self.final_ess:.1f})")

    def to_arviz(self, extra: dict[str, Any] | None = None):
        """Export to ArviZ; see ``ppl_scaling.arviz_export.to_arviz`` for the layout. ``extra``:
        per-particle arrays for the posterior group (LLM runs: answers, rewards, lengths,
        ``ppl_scaling.models.harness.llm_posterior_fields``)."""
        from .arviz_export import to_arviz

        return to_arviz([self], extra=[extra])
