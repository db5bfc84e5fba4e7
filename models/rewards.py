"""Reward models as potentials over batches of ``Partial(prompt, steps, finished)``.

    prm = ProcessRewardModel.from_pretrained(path, aggregation="last", transform="log")
    prm.score(partials, finished)            # (N,) rewards = log-values (ppl_scaling.potentials)
    w = Weighting.pf_paper(prm, temperature=1.0)   # the PF paper's configuration

Process reward models (PRMs) give each step j of a solution a probability p_j that
the solution is still correct after it. Two ways to read them from a Hugging Face model:

* ``separator`` (Qwen2.5-Math-PRM style): the steps are joined with a separator token
  (``<extra_0>``) after each step, and p_j is read at the j-th separator from a
  token-classification head (probability of ``good_label``), or from an LM head as
  p(good token) / (p(good) + p(bad)) over ``candidate_tokens`` (Math-Shepherd style).
  One forward scores every step of a prefix.
* ``classifier`` (``AutoModelForSequenceClassification``): p_j = probability of the
  positive label for the text of the prefix ending at step j; one forward per prefix.

A rule-based step checker (``fn(prompt, steps) -> one probability or bool per
step``, e.g. the toy task's exact checker) is a PRM through
``ProcessRewardModel.from_function``.

Step scores are cached by (prompt, steps so far), so in SMC each step of each
particle is scored once, also across resampled copies. Aggregations of the step
scores of a prefix with K steps: ``last`` p_K, ``min`` min_j p_j, ``prod`` Π_j p_j,
``model`` (the PF paper's "model aggregation") the score of the whole completion
read as one step. The reward is a *transform* of the aggregate p, made explicit:
``log`` (log p: the potential is p), ``logit`` (log p/(1-p), p clipped to
[1e-7, 1-1e-7] as in its_hub: the PF paper's weight), or ``p`` itself. A prefix
with no steps yet gets reward 0.

Also here: ``OutcomeRewardModel`` (scores finished generations only),
``Verifier`` (any Python check of the text), ``LLMJudge`` (log-probability that a
language model answers "Yes" to "is this correct?"), and ``Weighting`` — a reward
potential together with the FK shape and resampling rule that turn it into an
SMC run, with the PF paper's configuration as a named preset.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ppl_scaling.errors import PotentialError
from ppl_scaling.potentials import Potential
from ppl_scaling.shapes import FKShape

from .types import Partial

__all__ = [
    "HFStepScorer", "ProcessRewardModel", "OutcomeRewardModel", "Verifier", "LLMJudge",
    "Weighting", "AGGREGATIONS", "TRANSFORMS",
]

AGGREGATIONS = ("last", "min", "prod", "model")
TRANSFORMS = ("log", "logit", "p")
LOGIT_EPS = 1e-7
QWEN_PRM_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."

StepRequest = tuple[str, tuple[str, ...], int]  # (prompt, steps, first step to score)


def _partials(xs: Any, who: object) -> list[Partial]:
    xs = list(xs)
    for x in xs:
        if not (hasattr(x, "prompt") and hasattr(x, "steps")):
            raise TypeError(
                f"{who} scores batches of Partial(prompt, steps, finished) values "
                f"(ppl_scaling.models.types.Partial), got {type(x).__name__}"
            )
    return xs


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


# --- reading step scores from a Hugging Face model -----------------------------------

class HFStepScorer:
    """Step probabilities from a Hugging Face model (see the module docstring).

    Called with requests ``(prompt, steps, first)``, it returns for each the
    probabilities p_j of steps[j], j = first .. len(steps)-1, given the prompt and
    the earlier steps. ``format(prompt, steps) -> str`` builds the text the model reads
    (``classifier`` default: prompt + the steps; ``separator`` default: the tokenizer's
    chat template with ``system_prompt`` if it has one, else prompt + newline, with
    every stripped step followed by the separator).
    """

    def __init__(self, model: Any, tokenizer: Any, *, mode: Literal["separator", "classifier"],
                 separator: str = "<extra_0>", good_label: int = 1,
                 candidate_tokens: tuple[str, str] | None = None,
                 system_prompt: str | None = QWEN_PRM_SYSTEM_PROMPT,
                 format: Callable[[str, Sequence[str]], str] | None = None,
                 batch_size: int = 16, name: str | None = None):
        _check_choice(mode, ("separator", "classifier"), "PRM mode")
        self.model, self.tokenizer, self.mode = model.eval(), tokenizer, mode
        self.good_label, self.batch_size = good_label, batch_size
        self.system_prompt = system_prompt
        self.name = name or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
        self.separator = separator
        self.format = format or (self._format_separator if mode == "separator" else _format_plain)
        if mode == "separator":
            self.separator_id = self._single_token(separator, "separator")
        self.candidate_ids = (None if candidate_tokens is None else
                              [self._single_token(t, "candidate token") for t in candidate_tokens])
        self.sequences = 0          # sequences read by the model
        self.forward_passes = 0     # batched forward calls

    def _single_token(self, text: str, what: str) -> int:
        ids = self.tokenizer.convert_tokens_to_ids([text])
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if not ids or ids[0] is None or (ids[0] == unk and text != self.tokenizer.unk_token):
            raise ValueError(f"{what} {text!r} is not a single token in the vocabulary of PRM {self.name}; "
                             "pass the token the PRM was trained with")
        return int(ids[0])

    def _format_separator(self, prompt: str, steps: Sequence[str]) -> str:
        answer = "".join(s.strip() + self.separator for s in steps)
        if getattr(self.tokenizer, "chat_template", None):
            messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
            messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        return prompt.rstrip("\n") + "\n" + answer

    # -- the forward ---------------------------------------------------------------
    def _rows(self, texts: list[str]) -> list[tuple[Any, list[int]]]:
        """Per text: the logit rows the scores are read from — (#separators, C) at the
        separator tokens for ``separator``, (1, C) pooled for ``classifier`` — and the
        token ids. Texts are batched by length, right-padded with an attention mask."""
        import torch

        ids = [self.tokenizer(t)["input_ids"] for t in texts]
        limit = getattr(self.model.config, "max_position_embeddings", None)
        for t, row in zip(texts, ids):
            if limit is not None and len(row) > limit:
                raise ValueError(f"PRM {self.name}: input of {len(row)} tokens exceeds the model's "
                                 f"{limit} positions ({t[:60]!r}...); shorten the prompt or the steps")
        pad_id = getattr(self.model.config, "pad_token_id", None)
        # sequence classifiers pool the last non-pad token: without a pad id, one text per forward
        size = 1 if self.mode == "classifier" and pad_id is None else self.batch_size
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out: list[Any] = [None] * len(ids)
        device = next(self.model.parameters()).device
        for s in range(0, len(order), size):
            g = order[s:s + size]
            input_ids = torch.full((len(g), len(ids[g[-1]])), 0 if pad_id is None else pad_id, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for r, i in enumerate(g):
                input_ids[r, :len(ids[i])] = torch.tensor(ids[i])
                mask[r, :len(ids[i])] = 1
            with torch.no_grad():
                res = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device))
            logits = res.logits if hasattr(res, "logits") else res[0]
            self.forward_passes += 1
            self.sequences += len(g)
            for r, i in enumerate(g):
                if self.mode == "separator":
                    pos = [k for k, tok in enumerate(ids[i]) if tok == self.separator_id]
                    out[i] = logits[r, pos].float().cpu()
                else:
                    out[i] = logits[r:r + 1].float().cpu()
        return list(zip(out, ids))

    def _prob_good(self, logits: Any) -> np.ndarray:
        """p(good) from rows of logits (M, C)."""
        import torch

        if self.candidate_ids is not None:
            return torch.softmax(logits[:, self.candidate_ids], -1)[:, 0].numpy().astype(np.float64)
        if logits.shape[-1] == 1:
            return torch.sigmoid(logits[:, 0]).numpy().astype(np.float64)
        return torch.softmax(logits, -1)[:, self.good_label].numpy().astype(np.float64)

    def __call__(self, requests: Sequence[StepRequest]) -> list[np.ndarray]:
        if self.mode == "separator":
            texts = [self.format(prompt, steps) for prompt, steps, _ in requests]
            results = []
            for (prompt, steps, first), (rows, _) in zip(requests, self._rows(texts)):
                if len(rows) != len(steps):
                    raise ValueError(
                        f"PRM {self.name}: found {len(rows)} separators {self.separator!r} for {len(steps)} steps; "
                        "a step must not contain the separator (and the format must put one after each step)")
                results.append(self._checked(self._prob_good(rows[first:]), prompt, first))
            return results
        jobs = [(r, j) for r, (_, _, first) in enumerate(requests) for j in range(first, len(requests[r][1]))]
        texts = [self.format(requests[r][0], requests[r][1][:j + 1]) for r, j in jobs]
        probs = self._prob_good(_cat([rows for rows, _ in self._rows(texts)])) if texts else np.zeros(0)
        results, k = [], 0
        for prompt, steps, first in requests:
            n = len(steps) - first
            results.append(self._checked(probs[k:k + n], prompt, first))
            k += n
        return results

    def _checked(self, p: np.ndarray, prompt: str, first: int) -> np.ndarray:
        if np.isnan(p).any():
            j = first + int(np.flatnonzero(np.isnan(p))[0])
            raise PotentialError(f"PRM {self.name} returned NaN at step {j} (0-based) of the prompt "
                                 f"{prompt[:60]!r}; check the model weights and dtype (float16 overflow?)")
        return p


def _format_plain(prompt: str, steps: Sequence[str]) -> str:
    return prompt + "".join(steps)


def _cat(rows: list[Any]) -> Any:
    import torch

    return torch.cat(rows)


class _FunctionScorer:
    """Step scores from ``fn(prompt, steps) -> one probability per step``."""

    def __init__(self, fn: Callable[[str, tuple[str, ...]], Sequence[float]]):
        self.fn, self.name = fn, getattr(fn, "__name__", "fn")

    def __call__(self, requests: Sequence[StepRequest]) -> list[np.ndarray]:
        out = []
        for prompt, steps, first in requests:
            p = np.asarray(self.fn(prompt, steps), dtype=np.float64)
            if p.shape != (len(steps),):
                raise PotentialError(f"step checker {self.name} returned {p.size} scores for {len(steps)} steps "
                                     f"of the prompt {prompt[:60]!r}; return one probability per step")
            out.append(p[first:])
        return out


def _load_hf(path: str | Path, kind: str, device: str, dtype: Any, trust_remote_code: bool) -> tuple[Any, Any, str]:
    """Load model and tokenizer; ``kind`` auto-detected from the config's architecture."""
    import transformers

    if not Path(path).exists() and (str(path).startswith((".", "/", "~")) or str(path).count("/") != 1):
        raise FileNotFoundError(f"reward model path {str(path)!r} does not exist; pass a directory saved with "
                                "save_pretrained (config.json, weights, tokenizer) or a Hub id like 'org/name'")
    try:
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise FileNotFoundError(f"cannot load reward model {str(path)!r}: {e}") from e
    arch = " ".join(config.architectures or [])
    if kind == "auto":
        kind = ("classifier" if "SequenceClassification" in arch else
                "separator" if ("TokenClassification" in arch or "RewardModel" in arch or "CausalLM" in arch) else "")
        if not kind:
            raise ValueError(f"cannot tell how to read reward model {str(path)!r} (architectures: {arch or 'none'}); "
                             "pass kind='separator' or kind='classifier'")
    auto = (transformers.AutoModelForSequenceClassification if kind == "classifier" else
            transformers.AutoModelForTokenClassification if "TokenClassification" in arch else
            transformers.AutoModelForCausalLM if "CausalLM" in arch else transformers.AutoModel)
    model = auto.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code).to(device)
    if kind == "classifier" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # lets the classifier batch padded inputs
    return model, tokenizer, kind


# --- process reward models -----------------------------------------------------------

class ProcessRewardModel(Potential):
    """A PRM as a potential: reward = transform(aggregate(step probabilities)).

    ``scorer(requests) -> list of step-probability arrays`` (an ``HFStepScorer`` or any
    callable with that signature, e.g. an exact checker). ``prefix`` and ``complete``
    coincide: both score all the steps so far.
    """

    def __init__(self, scorer: Callable[[Sequence[StepRequest]], list[np.ndarray]], *,
                 aggregation: str = "last", transform: str = "log", name: str | None = None,
                 _cache: dict | None = None):
        _check_choice(aggregation, AGGREGATIONS, "aggregation")
        _check_choice(transform, TRANSFORMS, "transform")
        self.scorer, self.aggregation, self.transform = scorer, aggregation, transform
        self.name = name or f"PRM({getattr(scorer, 'name', type(scorer).__name__)}, {aggregation}, {transform})"
        self._cache: dict[tuple[str, tuple[str, ...]], float] = {} if _cache is None else _cache

    @classmethod
    def from_pretrained(cls, path: str | Path, *, kind: Literal["auto", "separator", "classifier"] = "auto",
                        aggregation: str = "last", transform: str = "log", device: str = "cpu",
                        dtype: Any = None, separator: str = "<extra_0>", good_label: int = 1,
                        candidate_tokens: tuple[str, str] | None = None,
                        system_prompt: str | None = QWEN_PRM_SYSTEM_PROMPT,
                        format: Callable[[str, Sequence[str]], str] | None = None,
                        batch_size: int = 16, trust_remote_code: bool = False) -> ProcessRewardModel:
        """Load a PRM from a local directory (or a Hub id when online). ``kind``: how to
        read it (auto: sequence classifiers -> ``classifier``, token classifiers,
        ``*ProcessRewardModel`` and causal LMs with ``candidate_tokens`` -> ``separator``).
        Qwen2.5-Math-PRM needs ``trust_remote_code=True``."""
        model, tokenizer, kind = _load_hf(path, kind, device, dtype, trust_remote_code)
        scorer = HFStepScorer(model, tokenizer, mode=kind, separator=separator, good_label=good_label,
                              candidate_tokens=candidate_tokens, system_prompt=system_prompt, format=format,
                              batch_size=batch_size, name=Path(str(path)).name)
        return cls(scorer, aggregation=aggregation, transform=transform)

    @classmethod
    def from_function(cls, fn: Callable[[str, tuple[str, ...]], Sequence[float]], *, aggregation: str = "last",
                      transform: str = "log", name: str | None = None) -> ProcessRewardModel:
        """A PRM from a Python step checker: ``fn(prompt, steps)`` gives the probability
        (or a bool: correct / not) of every step; e.g. an exact checker as a perfect PRM.
        With ``transform="log"`` a False step rejects the particle (log 0 = -inf)."""
        return cls(_FunctionScorer(fn), aggregation=aggregation, transform=transform, name=name)

    def configured(self, *, aggregation: str | None = None, transform: str | None = None) -> ProcessRewardModel:
        """The same model (and score cache) with another aggregation / transform."""
        return ProcessRewardModel(self.scorer, aggregation=aggregation or self.aggregation,
                                  transform=transform or self.transform, _cache=self._cache)

    def clear_cache(self) -> None:
        self._cache.clear()

    def counters(self) -> dict[str, int]:
        """Cumulative compute of the underlying model (if it counts)."""
        return {"reward_sequences": getattr(self.scorer, "sequences", 0),
                "reward_forward_passes": getattr(self.scorer, "forward_passes", 0)}

    def step_scores(self, xs: Any) -> list[np.ndarray]:
        """Probabilities of the scored steps of each Partial: all K steps, or for
        ``model`` aggregation the completion as one step. Only unseen prefixes reach
        the model, each once."""
        xs = _partials(xs, self)
        views = [(x.prompt, tuple(x.steps) if self.aggregation != "model" else
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
                for j, p in enumerate(probs, start=first):
                    self._cache[(prompt, steps[:j + 1])] = float(p)
        return [np.array([self._cache[(prompt, steps[:j + 1])] for j in range(len(steps))]) for prompt, steps in views]

    def prefix(self, xs: Any) -> np.ndarray:
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


# --- outcome rewards, verifiers, judges ------------------------------------------------

class OutcomeRewardModel(Potential):
    """Scores finished generations only: prefix = 0, complete = ``reward.complete``.

    ``reward`` is a Potential (e.g. a PRM used as an ORM, as in the PF paper's final
    pick) or a function of the batch of Partials returning log-values.
    """

    def __init__(self, reward: Potential | Callable[[list[Partial]], Any], *, name: str | None = None):
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
                 name: str | None = None):
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


JUDGE_TEMPLATE = "{prompt}{completion}\nIs this solution correct? Answer Yes or No.\nAnswer: "


class LLMJudge(Potential):
    """An LLM as judge: reward = log P(``yes`` | question + solution + ``template``),
    normalised against ``no`` (log P(yes) - log(P(yes) + P(no))) unless ``no`` is None.

    ``lm`` needs ``encode(text) -> list[int]`` and
    ``next_token_logprobs(contexts: list[list[int]]) -> (B, V)`` (any
    ``ppl_scaling.models.lm.LanguageModel``). Multi-token answers are scored token by
    token. The context / answer split is the longest common prefix of
    encode(text) and encode(text + answer), so BOS tokens and merges are handled.
    Finished generations only, unless ``on_prefix``. Scores are cached by text.
    """

    def __init__(self, lm: Any, *, template: str = JUDGE_TEMPLATE, yes: str = "Yes", no: str | None = "No",
                 on_prefix: bool = False, name: str | None = None):
        if "{completion}" not in template:
            raise ValueError("the judge template must contain '{completion}' (and usually '{prompt}')")
        self.lm, self.template, self.yes, self.no, self.on_prefix = lm, template, yes, no, on_prefix
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
        lp = self.lm.next_token_logprobs(queries)
        lp = np.asarray(lp.detach().cpu().float() if hasattr(lp, "detach") else lp, dtype=np.float64)
        out = np.zeros(len(texts))
        np.add.at(out, owners, lp[np.arange(len(queries)), targets])
        return out

    def _judge(self, xs: Any) -> np.ndarray:
        texts = [self.template.format(prompt=x.prompt, completion=x.completion) for x in _partials(xs, self)]
        new = sorted(set(texts) - self._cache.keys())
        if new:
            r = self._answer_logprobs(new, self.yes)
            if self.no is not None:
                r = r - np.logaddexp(r, self._answer_logprobs(new, self.no))
            self._cache.update(zip(new, r.tolist()))
        return np.array([self._cache[t] for t in texts])

    def prefix(self, xs: Any) -> np.ndarray:
        return self._judge(xs) if self.on_prefix else np.zeros(len(_partials(xs, self)))

    def complete(self, xs: Any) -> np.ndarray:
        return self._judge(xs)


# --- how a reward becomes an SMC run -----------------------------------------------------

@dataclass(frozen=True)
class Weighting:
    """A reward potential plus the FK shape and resampling rule that make it an SMC run.

    The step model computes r_t = ``potential.score(partials, finished)`` after every
    step and logG_t from ``shape`` (``ppl_scaling.shapes.FKShape``), so the final target
    is p_LM(x) exp(lam r(x)); ``ess_threshold`` and ``resampling`` go to ``smc``
    (``smc_kwargs()``).
    """

    potential: Potential
    shape: FKShape
    ess_threshold: float = 0.5
    resampling: str = "systematic"

    def smc_kwargs(self) -> dict[str, Any]:
        return {"ess_threshold": self.ess_threshold, "resampling": self.resampling}

    @classmethod
    def shaped(cls, potential: Potential, shape: str = "difference", lam: float = 1.0, *,
               ess_threshold: float = 0.5, resampling: str = "systematic") -> Weighting:
        """FK steering's shapes (``difference``, ``max``, ``sum``, ``last``) with
        adaptive resampling."""
        return cls(potential, FKShape(shape, lam), ess_threshold, resampling)

    @classmethod
    def pf_paper(cls, prm: ProcessRewardModel, temperature: float = 1.0, *,
                 aggregation: str | None = None) -> Weighting:
        """The particle filter of Puri et al. (2025), "A Probabilistic Inference Approach
        to Inference-Time Scaling of LLMs using Particle-Based Monte Carlo Methods".

        Reward r_t = logit(p_t), p_t the PRM score of the whole prefix after step t
        (``aggregation`` default: the PRM's own; the paper's code uses ``model``,
        its_hub ``last``); FK shape ``last`` with lam = 1 / temperature; multinomial
        resampling at every step. As an FK model: since weights reset at every
        resampling, particles are selected at step t with probabilities
        softmax(logit(p_t) / temperature) — exactly the paper's rule (odds
        (p_t / (1 - p_t))^(1/temperature)). The last potential carries the terminal
        correction of ``last``, so the weighted final particles target
        p_LM(x) (p(x) / (1 - p(x)))^(1/temperature) exactly; the paper's code omits
        that correction (its final weights are the plain softmax of the final logits),
        which leaves the over-selection of the intermediate steps in the result.
        """
        if not temperature > 0:
            raise ValueError(f"softmax temperature must be > 0, got {temperature}")
        return cls(prm.configured(aggregation=aggregation, transform="logit"),
                   FKShape("last", 1.0 / temperature), ess_threshold=1.0, resampling="multinomial")
