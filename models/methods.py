"""Inference-time scaling methods for LLMs, by name, behind one call.

Every method gets the same inputs and spends a comparable budget N (the number of
particles, samples or beams: N generations' worth of steps) and returns the same
record, so evaluation compares them at equal cost::

    out = run_method("particle_filtering", lm, prompt, prm=prm, budget=16,
                     rng=np.random.default_rng(0), config=MethodConfig(step_delimiter="\\n"))
    out.answer, out.answers, out.log_weights, out.scores, out.compute

Methods (``METHODS``):

    particle_filtering           the PF paper's preset (Puri et al. 2025; ``Weighting.pf_paper``):
                                 reward logit(p) of the PRM's prefix score, FK shape ``last`` with
                                 lam = 1 / softmax temperature, multinomial resampling at every step;
                                 answer of the highest final PRM score (the paper's pick; with an
                                 imperfect PRM a vote over the particles, ``selection=
                                 "majority_vote"`` or ``"weighted_majority"``, is often better)
    particle_filtering_adaptive  our default: reward log p, ``difference`` shape (exact
                                 intermediate targets p_LM(x_{1:t}) p_t^lam), resampling when
                                 ESS < N/2; answer by weighted majority vote
    particle_gibbs               the preset's weighting in SMC sweeps (the first plain, then
                                 conditional on a reference path): N = sweeps x particles per
                                 sweep (the paper's 4 x 16 = 64); N < 4 runs particle_filtering
    parallel_tempering           chains at lam_k / softmax temperature (``pt_lams``) swapping
                                 reference paths (``ppl_scaling.samplers.parallel_tempering``),
                                 N = chains x sweeps x particles; the answer from the lam = 1
                                 chain's last sweep; N < 12 runs particle_filtering
    best_of_n                    N samples, the one with the highest PRM score (PRM as ORM)
    weighted_best_of_n           N samples, the answer with the largest sum of PRM scores p
    self_consistency             N samples, majority vote (no reward model)
    beam_search, dvts            PRM-guided search (``ppl_scaling.samplers.beam``), width M = min(beam_width, N)
                                 (DVTS: N rounded down to a multiple of M)

A name may end with ``:selection`` to pick the final answer with another rule of
``ppl_scaling.aggregate`` (``particle_filtering:majority_vote``: the paper's particle
filter, answer by a vote over its final particles).

``prm`` is a ``ProcessRewardModel`` (or any potential with ``score(partials, finished)``
returning log-values and, for the PF presets, ``configured(transform=...)``). The
final PRM score of every candidate, log p(x), is in ``scores``. ``compute`` holds the
language model's ``tokens`` and ``forward_passes``, ``reward_calls`` (prefixes scored),
the reward model's own counters, and ``wall_s``; the PRM's score cache is cleared
before each run so that methods never share work.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import numpy as np

from ppl_scaling import aggregate
from ppl_scaling.result import SMCResult
from ppl_scaling.samplers.beam import beam_search, dvts
from ppl_scaling.samplers.parallel_tempering import parallel_tempering
from ppl_scaling.samplers.particle_gibbs import particle_gibbs
from ppl_scaling.smc import smc

from .answers import extract_answer, normalize_answer
from .rewards import Weighting
from .step import StepModel
from .types import Partial


def _default_key(answer: Any) -> Hashable:
    return normalize_answer(str(answer))


@dataclass(frozen=True)
class MethodConfig:
    """Generation and method settings shared by every method.

    ``extract(completion) -> answer or None``; ``key(answer)`` groups equivalent answers
    for the votes. ``selection`` overrides every method's default final pick (a name in
    ``ppl_scaling.aggregate.SELECTORS``: by log-weights, or for ``best_of_majority`` by scores).
    """

    step_delimiter: str | None = "\n\n"
    max_steps: int = 40
    max_step_tokens: int = 256
    temperature: float = 0.8
    stop: str | Callable[[str], bool] | None = r"\\boxed"
    extract: Callable[[str], Any] = extract_answer
    key: Callable[[Any], Hashable] = _default_key
    selection: str | None = None
    softmax_temperature: float = 1.0
    beam_width: int = 4
    pg_sweeps: int = 4
    pt_lams: tuple[float, ...] = (1.0, 0.5, 0.25)
    pt_sweeps: int = 2
    store_history: bool = False

    def step_model(self, lm: Any, prompt: str, potential: Any = None, *, shape: str = "difference",
                   lam: float = 1.0) -> StepModel:
        return StepModel(lm, prompt, potential, step_delimiter=self.step_delimiter, max_steps=self.max_steps,
                         max_step_tokens=self.max_step_tokens, temperature=self.temperature, stop=self.stop,
                         shape=shape, lam=lam)


@dataclass
class MethodOutput:
    """One method's result on one prompt."""

    method: str
    budget: int
    answer: Any                       # the selected final answer (None: no candidate gave one)
    answers: list[Any]                # extracted answer of every candidate
    completions: list[str]            # generated text of every candidate
    log_weights: np.ndarray           # the method's final log-weights (search scores for beam/DVTS)
    scores: np.ndarray | None         # final PRM score log p(x) of every candidate (None without a PRM)
    compute: dict[str, float] = field(default_factory=dict)
    result: SMCResult | None = None   # the underlying run (its last sweep for PG / PT)

    def weighted_answers(self) -> list[tuple[Any, float]]:
        """Distinct answers with their total normalised weight, heaviest first."""
        lw = np.asarray(self.log_weights, dtype=np.float64)
        W = np.exp(lw - lw.max()) if np.isfinite(lw.max()) else np.ones_like(lw)
        W = W / W.sum()
        totals: dict[Any, float] = {}
        for a, w in zip(self.answers, W):
            totals[a] = totals.get(a, 0.0) + float(w)
        return sorted(totals.items(), key=lambda kv: -kv[1])


# --- the methods -----------------------------------------------------------------------

@dataclass
class _Run:
    x: Any                      # final population (StepState)
    log_weights: np.ndarray
    result: SMCResult
    fk: StepModel               # its counters hold the reward calls of every sweep
    selection: tuple[str, str]  # default (selector, "scores" or "log_weights")
    final_scoring: bool = False # the PRM scores the final candidates only (best-of-N)
    uses_prm: bool = True       # self-consistency does not (its scores are not computed)


def _paper_fk(lm, prompt, prm, cfg, method):
    w = Weighting.pf_paper(_needs_configured(prm, method), cfg.softmax_temperature)
    return w, cfg.step_model(lm, prompt, w.potential, shape=w.shape.name, lam=w.shape.lam)


def _pf_paper(lm, prompt, prm, N, rng, cfg):
    w, fk = _paper_fk(lm, prompt, prm, cfg, "particle_filtering")
    res = smc(fk, N, rng=rng, store_history=cfg.store_history, **w.smc_kwargs())
    return _Run(res.particles, res.log_weights, res, fk, ("argmax_weight", "scores"))


def _pf_adaptive(lm, prompt, prm, N, rng, cfg):
    potential = _needs_configured(prm, "particle_filtering_adaptive").configured(transform="log")
    fk = cfg.step_model(lm, prompt, potential, shape="difference", lam=1.0 / cfg.softmax_temperature)
    res = smc(fk, N, ess_threshold=0.5, rng=rng, store_history=cfg.store_history)
    return _Run(res.particles, res.log_weights, res, fk, ("weighted_majority", "log_weights"))


def _particle_gibbs(lm, prompt, prm, N, rng, cfg):
    sweeps = max(1, min(cfg.pg_sweeps, N // 2))
    if sweeps == 1:
        return _pf_paper(lm, prompt, prm, N, rng, cfg)
    _, fk = _paper_fk(lm, prompt, prm, cfg, "particle_gibbs")
    res = particle_gibbs(fk, N // sweeps, sweeps - 1, rng=rng).runs[-1]
    return _Run(res.particles, res.log_weights, res, fk, ("argmax_weight", "scores"))


def _parallel_tempering(lm, prompt, prm, N, rng, cfg):
    chains = len(cfg.pt_lams)
    sweeps = min(cfg.pt_sweeps, N // (2 * chains))   # the initial SMC run of each chain included
    if sweeps < 2:
        return _pf_paper(lm, prompt, prm, N, rng, cfg)
    _, fk = _paper_fk(lm, prompt, prm, cfg, "parallel_tempering")
    res = parallel_tempering(fk, cfg.pt_lams, N // (chains * sweeps), sweeps - 1, rng=rng).runs[0]
    return _Run(res.particles, res.log_weights, res, fk, ("argmax_weight", "scores"))


def _sampling(selection, uses_prm=True):
    def run(lm, prompt, prm, N, rng, cfg):
        fk = cfg.step_model(lm, prompt)
        res = smc(fk, N, ess_threshold=0.0, rng=rng, store_history=cfg.store_history)
        return _Run(res.particles, res.log_weights, res, fk, selection, final_scoring=uses_prm, uses_prm=uses_prm)
    return run


def _search(search):
    def run(lm, prompt, prm, N, rng, cfg):
        fk = cfg.step_model(lm, prompt, _log_potential(prm), shape="difference", lam=1.0)
        width = min(cfg.beam_width, N)
        res = search(fk, N - N % width if search is dvts else N, width, rng=rng, store_history=cfg.store_history)
        return _Run(res.particles, res.log_weights, res, fk, ("argmax_weight", "log_weights"))
    return run


METHODS: dict[str, Callable[..., _Run]] = {
    "particle_filtering": _pf_paper,
    "particle_filtering_adaptive": _pf_adaptive,
    "particle_gibbs": _particle_gibbs,
    "parallel_tempering": _parallel_tempering,
    "best_of_n": _sampling(("argmax_weight", "scores")),
    "weighted_best_of_n": _sampling(("weighted_majority", "scores")),
    "self_consistency": _sampling(("majority_vote", "log_weights"), uses_prm=False),
    "beam_search": _search(beam_search),
    "dvts": _search(dvts),
}
NEEDS_PRM = frozenset(METHODS) - {"self_consistency"}


def _needs_configured(prm: Any, method: str) -> Any:
    if not hasattr(prm, "configured"):
        raise TypeError(f"method {method!r} needs a ProcessRewardModel (it re-reads the PRM with another "
                        f"transform via prm.configured(...)), got {type(prm).__name__}")
    return prm


def _log_potential(prm: Any) -> Any:
    """The reward model reading log p (a PRM is re-configured; other potentials are used as they are)."""
    return prm.configured(transform="log") if hasattr(prm, "configured") else prm


def _snapshot(lm: Any, prm: Any) -> dict[str, float]:
    out = dict(lm.counters())
    get = getattr(prm, "counters", None)
    if callable(get):
        out.update(get())
    return out


def run_method(method: str, lm: Any, prompt: str, *, prm: Any = None, budget: int,
               rng: np.random.Generator, config: MethodConfig = MethodConfig()) -> MethodOutput:
    """Run ``method`` with budget N = ``budget`` on ``prompt`` (module docstring)."""
    base, _, selection = method.partition(":")
    if base not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)} "
                         f"(optionally with ':selection', selection in {sorted(aggregate.SELECTORS)})")
    if selection and selection not in aggregate.SELECTORS:
        raise ValueError(f"unknown selection {selection!r} in {method!r}; choose from {sorted(aggregate.SELECTORS)}")
    selection = selection or config.selection
    if not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ValueError(f"budget must be a positive integer (particles / samples), got {budget!r}")
    if prm is None and base in NEEDS_PRM:
        raise ValueError(f"method {method!r} needs a reward model: pass prm=... (e.g. ProcessRewardModel."
                         "from_pretrained(path)); only self_consistency runs without one")
    if prm is not None and hasattr(prm, "clear_cache"):
        prm.clear_cache()
    before, start = _snapshot(lm, prm), time.perf_counter()
    run = METHODS[base](lm, prompt, prm, int(budget), rng, config)
    partials: list[Partial] = run.x.partials()
    completions = [p.completion for p in partials]
    answers = [config.extract(c) for c in completions]
    scores = None
    if prm is not None and (run.uses_prm or selection == "best_of_majority"):
        # cached for every method that scored prefixes during the run
        scores = _log_potential(prm).score(partials, np.ones(len(partials), dtype=bool))
        scores = np.asarray(scores, dtype=np.float64)
    after = _snapshot(lm, prm)
    compute: dict[str, float] = {k: after[k] - before.get(k, 0) for k in after}
    compute["reward_calls"] = int(run.fk.counters().get("reward_calls", 0)) + (len(partials) if run.final_scoring else 0)
    compute["wall_s"] = time.perf_counter() - start
    selector, by = run.selection
    lw = np.asarray(run.log_weights, dtype=np.float64)
    answer = select(selection or selector, answers, scores if by == "scores" else lw, scores, config.key)
    return MethodOutput(method, int(budget), answer, answers, completions, lw, scores, compute, run.result)


def select(name: str, answers: list[Any], weights: np.ndarray, scores: np.ndarray | None,
           key: Callable[[Any], Hashable]) -> Any:
    """Final answer by the selector ``name`` (``ppl_scaling.aggregate``)."""
    if name == "argmax_weight":
        return aggregate.argmax_weight(answers, weights)
    if name == "weighted_majority":
        return aggregate.weighted_majority(answers, weights, key=key)
    if name == "majority_vote":
        return aggregate.majority_vote(answers, key=key)
    if name == "best_of_majority":
        return aggregate.best_of_majority(answers, scores if scores is not None else weights, key=key)
    raise ValueError(f"unknown selection {name!r}; choose from {sorted(aggregate.SELECTORS)}")
