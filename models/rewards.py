"""Reward models as potentials over batches of ``Partial(prompt, steps, finished, question)``.

    prm = ProcessRewardModel.from_pretrained(path, aggregation="last", transform="log")
    prm.score(partials, finished)            # (N,) rewards = log-values (ppl_scaling.potentials)
    fk = Tilted(StepModel(lm, prompt, ...), prm, shape="difference", lam=1.0)   # steering

A process reward model (PRM) gives each step j of a solution a probability p_j that the
solution is still correct after it, read by a step scorer (``ppl_scaling.models.scorers``:
a Hugging Face model, or a Python step checker through ``ProcessRewardModel.from_function``).

A reward model reads the raw question (``Partial.question``), never the policy's templated
prompt, and formats it its own way (an HF PRM: its chat template, system prompt and step
separator; a judge: its template and chat template). Step scores are cached by (question,
steps so far), so in SMC each step of each particle is scored once, also across resampled
copies. Aggregations of the step scores of a prefix
with K steps: ``last`` p_K, ``min`` min_j p_j, ``prod`` prod_j p_j, ``model`` (the PF
paper's "model aggregation") the score of the whole completion read as one step. The
reward is a *transform* of the aggregate p, made explicit: ``log`` (log p: the potential
is p), ``logit`` (log p/(1-p), p clipped to [1e-7, 1-1e-7] as in its_hub: the PF paper's
weight, see ``ppl_scaling.samplers.particle_filtering.paper_tilt``), or ``p`` itself. A
prefix with no steps yet gets reward 0. A step score must be a probability: a value
outside [0, 1] (beyond float rounding, ``PROB_TOL``) or NaN raises ``PotentialError`` naming
the step and the value, instead of becoming a reward (p = 2 would give log 2).

Also here: ``OutcomeRewardModel`` (scores finished generations only), ``Verifier`` (any
Python check of the text) and ``LLMJudge`` (log-probability that a language model answers
"Yes" to "is this correct?"). Compute: ``Potential.score`` records ``reward_calls``, the
HF scorer ``reward_tokens``, a judge's language model its own tokens and forward passes
(``ppl_scaling.ledger``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ppl_scaling.errors import PotentialError
from ppl_scaling.ledger import record, recording
from ppl_scaling.potentials import Potential

from .chat import RAW, format_question
from .scorers import FunctionScorer, HFStepScorer, StepRequest
from .types import Partial, Question

__all__ = [
    "ProcessRewardModel", "OutcomeRewardModel", "Verifier", "LLMJudge", "AGGREGATIONS", "TRANSFORMS",
    "transform_log_p", "question_of",
]

AGGREGATIONS = ("last", "min", "prod", "model")
TRANSFORMS = ("log", "logit", "p")
LOGIT_EPS = 1e-7
PROB_TOL = 1e-6  # step scores within this of [0, 1] (float rounding of a softmax) are clipped into it


def _partials(xs: Any, who: object) -> list[Partial]:
    xs = list(xs)
    for x in xs:
        if not (hasattr(x, "prompt") and hasattr(x, "steps")):
            raise TypeError(
                f"{who} scores batches of Partial(prompt, steps, finished) values "
                f"(ppl_scaling.models.types.Partial), got {type(x).__name__}"
            )
    return xs


def question_of(x: Any) -> str:
    """The raw question a reward model reads: ``x.question`` (a ``Partial``), else ``x.prompt``."""
    return getattr(x, "question", None) or x.prompt


def transform_log_p(log_p: np.ndarray, transform: str) -> np.ndarray:
    """Reward from log-probabilities: ``log`` -> log p, ``logit`` -> log(p / (1 - p))
    with p clipped to [LOGIT_EPS, 1 - LOGIT_EPS], ``p`` -> p."""
    if transform == "log":
        return log_p
    p = np.exp(log_p)
    if transform == "p":
        return p
    p = np.clip(p, LOGIT_EPS, 1.0 - LOGIT_EPS)
    return np.log(p) - np.log1p(-p)


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {choices}")


# --- process reward models -----------------------------------------------------------

class ProcessRewardModel(Potential):
    """A PRM as a potential: reward = transform(aggregate(step probabilities)).

    ``scorer(requests) -> list of step-probability arrays`` (an ``HFStepScorer`` or any
    callable with that signature, e.g. an exact checker). ``prefix`` and ``complete``
    coincide: both score all the steps so far.
    """

    def __init__(self, scorer: Callable[[Sequence[StepRequest]], list[np.ndarray]], *,
                 aggregation: str = "last", transform: str = "log", name: str | None = None,
                 _cache: dict | None = None) -> None:
        _check_choice(aggregation, AGGREGATIONS, "aggregation")
        _check_choice(transform, TRANSFORMS, "transform")
        self.scorer, self.aggregation, self.transform = scorer, aggregation, transform
        self.name = name or f"PRM({getattr(scorer, 'name', type(scorer).__name__)}, {aggregation}, {transform})"
        self._cache: dict[tuple[str, tuple[str, ...]], float] = {} if _cache is None else _cache

    @classmethod
    def from_pretrained(cls, path: str | Path, *, aggregation: str = "last", transform: str = "log",
                        **scorer_options: Any) -> ProcessRewardModel:
        """A PRM read from a Hugging Face model saved in ``path`` (or a Hub id when online);
        ``scorer_options`` (``kind``, ``device``, ``dtype``, ``separator``, ``good_label``,
        ``candidate_tokens``, ``system_prompt``, ``format``, ``batch_size``,
        ``reuse_cache``, ``max_cache_tokens``, ``trust_remote_code``) as in
        ``HFStepScorer.from_pretrained`` (separator PRMs reuse each scored prefix's KV cache by
        default, ``ppl_scaling.models.prm_cache``)."""
        return cls(HFStepScorer.from_pretrained(path, **scorer_options), aggregation=aggregation,
                   transform=transform)

    @classmethod
    def from_function(cls, fn: Callable[[str, tuple[str, ...]], Sequence[float]], *, aggregation: str = "last",
                      transform: str = "log", name: str | None = None) -> ProcessRewardModel:
        """A PRM from a Python step checker: ``fn(question, steps)`` gives the probability
        (or a bool: correct / not) of every step; e.g. an exact checker as a perfect PRM.
        With ``transform="log"`` a False step rejects the particle (log 0 = -inf)."""
        return cls(FunctionScorer(fn), aggregation=aggregation, transform=transform, name=name)

    def configured(self, *, aggregation: str | None = None, transform: str | None = None) -> ProcessRewardModel:
        """The same model (and score cache) with another aggregation / transform."""
        return ProcessRewardModel(self.scorer, aggregation=aggregation or self.aggregation,
                                  transform=transform or self.transform, _cache=self._cache)

    def clear_cache(self) -> None:
        """Forget every score, and the scorer's stored prefixes if it keeps any (a run that
        starts afresh spends what it would spend alone)."""
        self._cache.clear()
        if hasattr(self.scorer, "clear_cache"):
            self.scorer.clear_cache()

    def step_scores(self, xs: Any) -> list[np.ndarray]:
        """Probabilities of the scored steps of each Partial: all K steps, or for
        ``model`` aggregation the completion as one step. Only unseen prefixes reach
        the model, each once."""
        xs = _partials(xs, self)
        views = [(question_of(x), tuple(x.steps) if self.aggregation != "model" else
                  ((x.completion,) if x.steps else ())) for x in xs]
        todo: dict[tuple[str, tuple[str, ...]], int] = {}
        for prompt, steps in views:
            first = 0
            while first < len(steps) and (prompt, steps[:first + 1]) in self._cache:
                first += 1
            if first < len(steps):
                todo[(prompt, steps)] = first
        requests, covered = [], set()
        for (prompt, steps), first in sorted(todo.items(), key=lambda kv: -len(kv[0][1])):
            if (prompt, steps) not in covered:  # a longer request already scores this prefix
                requests.append((prompt, steps, first))
                covered.update((prompt, steps[:j]) for j in range(first + 1, len(steps) + 1))
        if requests:
            for (prompt, steps, first), probs in zip(requests, self.scorer(requests)):
                probs = np.asarray(probs, dtype=np.float64)
                if probs.shape != (len(steps) - first,):
                    raise PotentialError(f"{self}: scorer returned {probs.shape[0] if probs.ndim else 'a scalar'} "
                                         f"scores for {len(steps) - first} new steps")
                probs = _checked_probabilities(probs, self, prompt, first)
                for j, p in enumerate(probs, start=first):
                    self._cache[(prompt, steps[:j + 1])] = float(p)
        return [np.array([self._cache[(prompt, steps[:j + 1])] for j in range(len(steps))]) for prompt, steps in views]

    def prefix(self, xs: Any) -> np.ndarray:
        """transform(aggregate_j p_j) of each Partial; 0 for a Partial with no steps."""
        xs = _partials(xs, self)
        out = np.zeros(len(xs))
        for i, p in enumerate(self.step_scores(xs)):
            if p.size == 0:
                continue  # no steps yet: neutral reward 0
            with np.errstate(divide="ignore"):
                log_p = np.log(p)
            agg = {"last": log_p[-1], "model": log_p[-1], "min": log_p.min(), "prod": log_p.sum()}[self.aggregation]
            out[i] = transform_log_p(np.array([agg]), self.transform)[0]
        return out


def _checked_probabilities(probs: np.ndarray, who: object, prompt: str, first: int) -> np.ndarray:
    """``probs`` clipped into [0, 1]; a NaN or a value further than ``PROB_TOL`` outside
    raises ``PotentialError`` with the step (0-based) and the value."""
    bad = np.isnan(probs) | (probs < -PROB_TOL) | (probs > 1.0 + PROB_TOL)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise PotentialError(f"{who}: the step scorer returned p = {float(probs[k])!r} for step {first + k} (0-based) "
                             f"of the prompt {prompt[:60]!r}; a step score must be a probability in [0, 1] "
                             "(a PRM's p(correct), not a logit or a log-probability)")
    return np.clip(probs, 0.0, 1.0)


# --- outcome rewards, verifiers, judges ------------------------------------------------

class OutcomeRewardModel(Potential):
    """Scores finished generations only: prefix = 0, complete = ``reward.complete``.

    ``reward`` is a Potential (e.g. a PRM used as an ORM, as in the PF paper's final
    pick) or a function of the batch of Partials returning log-values.
    """

    def __init__(self, reward: Potential | Callable[[list[Partial]], Any], *, name: str | None = None) -> None:
        self.reward = reward if isinstance(reward, Potential) else Potential.from_callable(reward)
        self.name = name or f"ORM({self.reward!r})"

    @classmethod
    def from_pretrained(cls, path: str | Path, *, transform: str = "log", **kwargs: Any) -> OutcomeRewardModel:
        """An HF reward model reading the whole completion as one step; keyword
        arguments as in ``ProcessRewardModel.from_pretrained``."""
        return cls(ProcessRewardModel.from_pretrained(path, aggregation="model", transform=transform, **kwargs))

    def prefix(self, xs: Any) -> np.ndarray:
        return np.zeros(len(_partials(xs, self)))

    def complete(self, xs: Any) -> np.ndarray:
        return self.reward.evaluate("complete", xs)


class Verifier(Potential):
    """A rule-based check of the text as a potential.

    ``fn(text)`` returns a bool (True -> 0, False -> ``penalty``, -inf by default:
    reject) or a number (the log-value itself). ``text``: "completion" (the steps) or
    "full" (prompt + steps). By default only finished generations are checked
    (prefix = 0); ``on_prefix=True`` checks partial ones too — then a ``-inf`` penalty
    must be final (a rejected prefix never becomes valid again).
    """

    def __init__(self, fn: Callable[[str], bool | float], *, penalty: float = -math.inf,
                 text: Literal["completion", "full"] = "completion", on_prefix: bool = False,
                 name: str | None = None) -> None:
        if math.isnan(penalty) or penalty == math.inf:
            raise ValueError(f"penalty must be a finite log-value or -inf, got {penalty}")
        _check_choice(text, ("completion", "full"), "verifier text")
        self.fn, self.penalty, self.text, self.on_prefix = fn, float(penalty), text, on_prefix
        self.name = name or f"Verifier({getattr(fn, '__name__', 'fn')})"

    def _check(self, xs: Any) -> np.ndarray:
        out = []
        for x in _partials(xs, self):
            v = self.fn(x.completion if self.text == "completion" else x.text)
            out.append((0.0 if v else self.penalty) if isinstance(v, (bool, np.bool_)) else float(v))
        return np.array(out)

    def prefix(self, xs: Any) -> np.ndarray:
        return self._check(xs) if self.on_prefix else np.zeros(len(_partials(xs, self)))

    def complete(self, xs: Any) -> np.ndarray:
        return self._check(xs)


JUDGE_TEMPLATE = "{question}{completion}\nIs this solution correct? Answer Yes or No.\nAnswer: "


class LLMJudge(Potential):
    """An LLM as judge: reward = log P(``yes`` | question + solution + ``template``),
    normalised against ``no`` (log P(yes) - log(P(yes) + P(no))) unless ``no`` is None.

    ``lm`` needs ``encode(text) -> list[int]`` and
    ``next_token_logprobs(contexts: list[list[int]]) -> (B, V)`` (any
    ``ppl_scaling.models.lm.LanguageModel``). Multi-token answers are scored token by
    token. The context / answer split is the longest common prefix of
    encode(text) and encode(text + answer), so BOS tokens and merges are handled.
    Finished generations only, unless ``on_prefix``. Scores are cached by text.
    The judge reads the raw question: ``template`` fills ``{question}`` (the raw question),
    ``{completion}`` and, if it names it, ``{prompt}`` (the policy's templated prompt).
    ``chat_template``: None (default) wraps the filled template as the user turn of the
    judge's own chat template when its tokenizer has one (the answer is then scored as the
    start of the assistant's turn), a Jinja string another template, ``"none"`` plain text.
    Compute: the language model's backend records its forward passes and context tokens
    in the ledger (an LM that records nothing gets one forward pass and its contexts as
    ``prefill_tokens`` recorded here instead); ``score`` counts ``reward_calls``. So the
    judge's work is counted once.
    """

    def __init__(self, lm: Any, *, template: str = JUDGE_TEMPLATE, yes: str = "Yes", no: str | None = "No",
                 on_prefix: bool = False, name: str | None = None, chat_template: str | None = None) -> None:
        if "{completion}" not in template:
            raise ValueError("the judge template must contain '{completion}' (and usually '{question}')")
        self.lm, self.template, self.yes, self.no, self.on_prefix = lm, template, yes, no, on_prefix
        self.chat_template = chat_template
        self.name = name or "LLMJudge"
        self._cache: dict[str, float] = {}

    def _answer_logprobs(self, texts: list[str], answer: str) -> np.ndarray:
        queries, owners, targets = [], [], []
        for i, text in enumerate(texts):
            ctx, full = self.lm.encode(text), self.lm.encode(text + answer)
            k = 0
            while k < min(len(ctx), len(full)) and ctx[k] == full[k]:
                k += 1
            if k == len(full):
                raise ValueError(f"{self}: the answer {answer!r} adds no token to the judge prompt")
            for j in range(k, len(full)):
                queries.append(list(full[:j]))
                owners.append(i)
                targets.append(full[j])
        with recording() as own:
            lp = self.lm.next_token_logprobs(queries)
        if own.forward_passes == 0:  # an LM that records nothing: its one call, counted here once
            record(forward_passes=1, prefill_tokens=sum(len(q) for q in queries))
        lp = np.asarray(lp.detach().cpu().float() if hasattr(lp, "detach") else lp, dtype=np.float64)
        out = np.zeros(len(texts))
        np.add.at(out, owners, lp[np.arange(len(queries)), targets])
        return out

    def _judge(self, xs: Any) -> np.ndarray:
        texts = [self.text(x) for x in _partials(xs, self)]
        new = sorted(set(texts) - self._cache.keys())
        if new:
            r = self._answer_logprobs(new, self.yes)
            if self.no is not None:
                r = r - np.logaddexp(r, self._answer_logprobs(new, self.no))
            self._cache.update(zip(new, r.tolist()))
        return np.array([self._cache[t] for t in texts])

    def text(self, x: Partial) -> str:
        """The judge's prompt for ``x`` (its answer ``yes`` / ``no`` is scored after it)."""
        filled = self.template.format(question=question_of(x), prompt=x.prompt, completion=x.completion)
        tokenizer = getattr(self.lm, "tokenizer", None)
        if self.chat_template == RAW or (self.chat_template is None and not getattr(tokenizer, "chat_template", None)):
            return filled
        return format_question(tokenizer, Question(filled.rstrip()), chat_template=self.chat_template)

    def prefix(self, xs: Any) -> np.ndarray:
        return self._judge(xs) if self.on_prefix else np.zeros(len(_partials(xs, self)))

    def complete(self, xs: Any) -> np.ndarray:
        return self._judge(xs)
