"""Running an inference method by name on one LLM prompt: what evaluation compares.

Every method of ``ppl_scaling.samplers.METHODS`` gets the same inputs and spends a
comparable budget N (particles, samples or beams: N generations' worth of steps)::

    run = run_method("particle_filtering", lm, prompt, prm=prm, budget=16,
                     rng=np.random.default_rng(0), config=MethodConfig(step_delimiter="\\n"))
    run.answer, run.answers, run.completions
    run.result                # the method's SMCResult: log_weights, rewards, ledger, info
    run.select("majority_vote")   # another answer rule on the same candidates

What ``run_method`` does:

1. ``"name:rule"`` picks the method ``METHODS[name]`` and, optionally, the answer rule
   (``ppl_scaling.result.SELECTION_RULES``; default ``config.selection``, else the
   method's own, ``result.info["selection_rule"]``);
2. the dynamics: a fresh ``StepModel`` from ``config`` (``config.step_model(lm, prompt)``); a
   ``Question`` (raw text, system prompt) is formatted for the policy by its chat template
   (``config.chat_template``), while reward models read the raw question
   (``Partial.question``) and format it their own way;
3. the potential: the PRM read as log p (``prm.configured(transform="log")``; any other
   potential as it is), so its value is p. Presets re-read it as they need (the PF paper's
   ``particle_filtering`` as logit p). ``self_consistency`` runs without one;
4. the method runs with the settings of ``config`` that it takes (``method_options``);
   the PRM's score cache is cleared first, so methods never share work; everything the
   run spends is recorded into ``result.ledger`` (tokens, forward_passes, reward_calls,
   reward_tokens, ..., wall_s);
5. answers are extracted from the completions (``config.extract``); when the method used
   the PRM, or the rule reads rewards (``best_of_majority``, ``argmax_reward``), the final
   PRM score log p(x) of every candidate becomes ``result.rewards`` (read from the cache,
   after the ledger is closed, so it costs the method nothing);
6. the answer is ``result.select(answers, rule, key=config.key)``; a rule given (``:rule`` or
   ``config.selection``) replaces ``result.info["selection_rule"]``, so ``run.select()``
   gives ``run.answer``.

The presets that need a minimum budget (``particle_gibbs``: N >= 4, ``parallel_tempering``:
N >= 4 K) refuse smaller ones when called directly; ``run_method`` (an evaluation sweeps
budgets) passes ``allow_fallback=True`` unless told otherwise, so they run the PF paper's
filter instead and say so in ``result.info["fallback"]`` (and ``evaluate`` in the row).

``run.to_arviz()`` (or ``llm_posterior_fields(run)`` passed to
``ppl_scaling.arviz_export.to_arviz(results, extra=...)``) adds the candidates' ``answer``,
``reward`` and ``length`` (generated tokens) to the ArviZ posterior group; ``run_method``
keeps them in ``result.info["posterior_fields"]``, so ``run.result.to_arviz()`` has them too.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ppl_scaling.allocation import Policy
from ppl_scaling.ledger import Ledger, recording
from ppl_scaling.potentials import Potential, as_potential
from ppl_scaling.result import SELECTION_RULES, SMCResult
from ppl_scaling.samplers import DIFFUSION_METHODS, METHODS
from ppl_scaling.stopping import AnswerSettled, FinishedCount, TokenBudget, any_of

from .answers import extract_answer, normalize_answer
from .chat import format_question
from .step import StepModel
from .types import Question

__all__ = ["MethodConfig", "MethodRun", "run_method", "parse_method", "needs_reward", "method_options",
           "log_potential", "answer_key", "llm_posterior_fields", "LLM_METHODS", "WITHOUT_REWARD",
           "REWARD_RULES", "FALLBACK_METHODS"]

LLM_METHODS = frozenset(METHODS) - DIFFUSION_METHODS
WITHOUT_REWARD = frozenset({"self_consistency", "deep_prune", "rpc", "first_finish", "multi_temperature"})   # methods that run without a reward model
REWARD_RULES = frozenset({"best_of_majority", "argmax_reward"})   # answer rules that read rewards
FALLBACK_METHODS = frozenset({"particle_gibbs", "parallel_tempering"})   # presets with a minimum budget


def answer_key(answer: Any) -> Hashable:
    """Default grouping of answers for votes: the normalised answer string."""
    return normalize_answer(str(answer))


@dataclass(frozen=True)
class MethodConfig:
    """Generation and method settings shared by every method.

    ``extract(completion) -> answer or None``; ``key(answer)`` groups equivalent answers
    for the votes. ``selection`` overrides every method's default answer rule.
    ``softmax_temperature``: the PF presets' 1 / lam; ``beam_width``: beam search / DVTS;
    ``pg_sweeps``: particle Gibbs sweeps; ``pt_lams`` / ``pt_sweeps``: parallel tempering.
    ``top_p`` / ``top_k`` / ``min_p``: truncation of the proposal (off: 1.0, None, 0.0; see
    ``StepModel`` and ``ppl_scaling.models.lm``). ``chat_template``: how the policy reads a
    ``Question`` (``ppl_scaling.models.chat``: None, the tokenizer's own; a Jinja template;
    ``"none"``, plain text). ``early_stop`` / ``token_budget``: the stop rule of the methods
    that take one (``stop_rule``; ``ppl_scaling.stopping``). ``policy``: the compute-optimal
    policy ``compute_optimal`` follows (``ppl_scaling.allocation``). ``judge``: DeepPrune's
    same-final-answer judge of two partial solutions (default: the same last step);
    ``expensive_verifier``: the second tier of ``verify_cascade`` (a potential or PRM, read as
    log p); ``verifications``: the sampled verdicts per solution of ``verifier_scaling``.
    """

    step_delimiter: str | None = "\n\n"
    max_steps: int = 40
    max_step_tokens: int = 256
    temperature: float = 0.8
    stop: str | Callable[[str], bool] | None = r"\\boxed"
    extract: Callable[[str], Any] = extract_answer
    key: Callable[[Any], Hashable] = answer_key
    selection: str | None = None
    softmax_temperature: float = 1.0
    beam_width: int = 4
    pg_sweeps: int = 4
    pt_lams: tuple[float, ...] = (1.0, 0.5, 0.25)
    pt_sweeps: int = 2
    store_history: bool = False
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    chat_template: str | None = None
    early_stop: str | None = None
    token_budget: int | None = None
    policy: Policy | None = None
    judge: Callable[[Any, Any], bool] | None = None
    expensive_verifier: Any = None
    verifications: int = 3

    def stop_rule(self) -> Callable[[Any], bool] | None:
        """The run's stop rule (``ppl_scaling.stopping``) from ``early_stop`` — ``"settled"``
        (the exact vote rule), ``"settled:0.95"`` (the Beta rule at that confidence) or
        ``"finished:k"`` — and ``token_budget`` (generated + reward tokens); None: run to the end."""
        rules = [] if self.token_budget is None else [TokenBudget(self.token_budget)]
        if self.early_stop:
            kind, _, arg = self.early_stop.partition(":")
            try:
                if kind == "settled":
                    rules.append(AnswerSettled(self.extract, key=self.key, confidence=float(arg) if arg else None))
                elif kind == "finished" and arg:
                    rules.append(FinishedCount(int(arg)))
                else:
                    raise ValueError("unknown rule")
            except ValueError as e:
                raise ValueError(f"early_stop {self.early_stop!r}: {e}; use 'settled', 'settled:CONFIDENCE' "
                                 "(0.5 < confidence < 1) or 'finished:K'") from None
        return any_of(*rules)

    def step_model(self, lm: Any, prompt: str | Question) -> StepModel:
        """The dynamics of a run: stepwise generation from ``lm`` after ``prompt``; a
        ``Question`` is formatted for the policy (``chat_template``) and its raw text is what
        reward models read."""
        question = None
        if isinstance(prompt, Question):
            question = prompt.text
            prompt = format_question(getattr(lm, "tokenizer", None), prompt, chat_template=self.chat_template)
        return StepModel(lm, prompt, step_delimiter=self.step_delimiter, max_steps=self.max_steps,
                         max_step_tokens=self.max_step_tokens, temperature=self.temperature, stop=self.stop,
                         top_p=self.top_p, top_k=self.top_k, min_p=self.min_p, question=question)


@dataclass(frozen=True)
class MethodRun:
    """One method's run on one prompt: the ``SMCResult`` and the candidates' answers."""

    method: str                 # as requested, "name" or "name:rule"
    budget: int
    result: SMCResult           # rewards: final PRM log p(x) of each candidate (None without the PRM)
    completions: list[str]      # generated text of every candidate
    answers: list[Any]          # extracted answer of every candidate (None: no answer)
    answer: Any                 # the selected answer
    key: Callable[[Any], Hashable] = answer_key

    @property
    def ledger(self) -> Ledger:
        return self.result.ledger

    def select(self, rule: str | None = None) -> Any:
        """The answer by ``rule`` (default: the method's own) from these candidates."""
        return self.result.select(self.answers, rule, key=self.key)

    def weighted_answers(self) -> list[tuple[Any, float]]:
        """Distinct answers (grouped by ``key``) with their total weight, heaviest first."""
        return self.result.weighted_answers(self.answers, key=self.key)

    def to_arviz(self):
        """The run's ``SMCResult`` in ArviZ, with the candidates' answers, rewards and lengths
        in the posterior group (``llm_posterior_fields``)."""
        from ppl_scaling.arviz_export import to_arviz

        return to_arviz([self.result], extra=[llm_posterior_fields(self)])


def llm_posterior_fields(run: MethodRun) -> dict[str, np.ndarray]:
    """Per-candidate arrays for the ArviZ posterior of an LLM run: ``answer`` (strings, ""
    for none), ``reward`` (the final PRM log p; NaN without a reward model) and ``length``
    (generated tokens)."""
    n = run.result.num_particles
    rewards = run.result.rewards
    lengths = getattr(run.result.particles, "num_tokens", None)
    return {
        "answer": np.array(["" if a is None else str(a) for a in run.answers], dtype=str).reshape(n),
        "reward": np.full(n, np.nan) if rewards is None else np.asarray(rewards, dtype=np.float64),
        "length": (np.array([len(c) for c in run.completions]) if lengths is None
                   else np.asarray(lengths, dtype=np.int64)),
    }


def parse_method(method: str) -> tuple[str, str | None]:
    """``"name"`` or ``"name:rule"`` -> (name, rule or None); unknown names / rules raise ValueError."""
    name, _, rule = method.partition(":")
    if name not in METHODS or name in DIFFUSION_METHODS:
        what = "a diffusion method" if name in DIFFUSION_METHODS else "an unknown method"
        raise ValueError(f"{method!r} is {what}; LLM methods are {sorted(LLM_METHODS)} "
                         f"(optionally with ':rule', rule in {sorted(SELECTION_RULES)})")
    if rule and rule not in SELECTION_RULES:
        raise ValueError(f"unknown selection {rule!r} in {method!r}; choose from {sorted(SELECTION_RULES)}")
    return name, rule or None


def needs_reward(method: str) -> bool:
    """Whether ``method`` (a name, with or without ':rule') needs a reward model."""
    return parse_method(method)[0] not in WITHOUT_REWARD


def method_options(name: str, config: MethodConfig, *, allow_fallback: bool = False) -> dict[str, Any]:
    """The settings of ``config`` that method ``name`` takes (those its signature names);
    ``allow_fallback`` lets the presets of ``FALLBACK_METHODS`` run the PF paper's filter
    on budgets too small for them (else they refuse)."""
    options: dict[str, Any] = {"softmax_temperature": config.softmax_temperature, "beam_width": config.beam_width,
                               "store_history": config.store_history}
    if allow_fallback and name in FALLBACK_METHODS:
        options["allow_fallback"] = True
    if name == "particle_filtering_adaptive":
        options["lam"] = 1.0 / config.softmax_temperature
    elif name == "particle_gibbs":
        options["sweeps"] = config.pg_sweeps
    elif name == "parallel_tempering":
        options.update(lams=tuple(config.pt_lams), sweeps=config.pt_sweeps)
    accepted = inspect.signature(METHODS[name]).parameters
    if "policy" in accepted:
        if config.policy is None:
            raise ValueError(f"method {name!r} needs a policy: MethodConfig(policy=Policy.read(path)) "
                             "(on the command line --policy FILE, written by `ppl-scaling allocate`)")
        options.update(policy=config.policy, extract=config.extract, key=config.key,
                       options_for=lambda method: method_options(method, config, allow_fallback=allow_fallback))
    if name == "deep_prune" and config.judge is not None:
        options["judge"] = config.judge
    elif name == "verifier_scaling":
        options["verifications"] = config.verifications
    elif name == "verify_cascade":
        if config.expensive_verifier is None:
            raise ValueError("verify_cascade needs an expensive verifier: MethodConfig(expensive_verifier=...) "
                             "(a potential or PRM; on the command line --expensive-prm PATH; the arithmetic task "
                             "uses its exact checker)")
        options["expensive"] = log_potential(config.expensive_verifier)
    stop = config.stop_rule()
    if stop is not None:
        if "stop" not in accepted:
            raise ValueError(f"method {name!r} takes no stop rule (early_stop / token_budget); methods that do: "
                             f"{sorted(m for m in LLM_METHODS if 'stop' in inspect.signature(METHODS[m]).parameters)}")
        options["stop"] = stop
    return {k: v for k, v in options.items() if k in accepted}


def log_potential(prm: Any) -> Potential:
    """The reward model read as log p: a PRM (``configured``) is re-configured, any other
    potential (or function of a batch) is used as it is."""
    return as_potential(prm.configured(transform="log") if hasattr(prm, "configured") else prm)


def run_method(method: str, lm: Any, prompt: str | Question, *, prm: Any = None, budget: int,
               rng: np.random.Generator, config: MethodConfig = MethodConfig(),
               allow_fallback: bool = True) -> MethodRun:
    """Run ``method`` ("name" or "name:rule") with budget N = ``budget`` on ``prompt`` (module
    docstring): the policy's prompt text, or a ``Question`` (formatted by ``config.step_model``).
    ``allow_fallback=False``: presets refuse budgets too small for them instead of running
    the PF paper's filter (``result.info["fallback"]``)."""
    name, rule = parse_method(method)
    rule = rule or config.selection
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ValueError(f"budget must be a positive integer (particles / samples), got {budget!r}")
    if prm is None and name not in WITHOUT_REWARD:
        raise ValueError(f"method {method!r} needs a reward model: pass prm=... (e.g. ProcessRewardModel."
                         f"from_pretrained(path)); only {sorted(WITHOUT_REWARD)} run without one")
    potential = None if prm is None else log_potential(prm)
    if prm is not None and hasattr(prm, "clear_cache"):
        prm.clear_cache()
    model = config.step_model(lm, prompt)
    with recording() as spent:
        result = METHODS[name](model, int(budget), potential=None if name in WITHOUT_REWARD else potential,
                               rng=rng, **method_options(name, config, allow_fallback=allow_fallback))
    result = replace(result, ledger=spent)
    partials = result.particles.partials()
    completions = [p.completion for p in partials]
    answers = [config.extract(c) for c in completions]
    if potential is not None and (result.rewards is not None or rule in REWARD_RULES):
        # cached for every method that scored the candidates during the run
        result = replace(result, rewards=potential.score(partials, np.ones(len(partials), dtype=bool)))
    if rule:   # the run's rule, so that run.select() and saved records agree with run.answer
        result = replace(result, info={**result.info, "selection_rule": rule})
    answer = result.select(answers, key=config.key)
    run = MethodRun(method, int(budget), result, completions, answers, answer, config.key)
    fields = llm_posterior_fields(run)   # so that run.result.to_arviz() shows the candidates
    return replace(run, result=replace(result, info={**result.info, "posterior_fields": fields}))
