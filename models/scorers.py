"""Step scorers: what a process reward model reads, from a Hugging Face model or a function.

A step scorer is a callable ``scorer(requests) -> list[np.ndarray]``: for each request
``(prompt, steps, first)`` it returns p_j, j = first .. len(steps) - 1, the probability
that the solution is still correct after steps[j], given the prompt and the earlier
steps. ``ppl_scaling.models.rewards.ProcessRewardModel`` turns those into rewards.

Two ways to read p_j from a Hugging Face model (``HFStepScorer``):

* ``separator`` (Qwen2.5-Math-PRM style): the steps are joined with a separator token
  (``<extra_0>``) after each step, and p_j is read at the j-th separator from a
  token-classification head (probability of ``good_label``), or from an LM head as
  p(good token) / (p(good) + p(bad)) over ``candidate_tokens`` (Math-Shepherd style).
  One forward scores every step of a prefix.

  KV reuse (``reuse_cache=True``, the default, for full-attention models): p_j depends only
  on the tokens up to the j-th separator, so the scorer keeps the KV cache of each scored
  prefix, keyed by its token ids up to and including its last separator
  (``ppl_scaling.models.prm_cache.PrefixKVStore``; keyed by content, so resampled copies
  share an entry and nothing is reordered). A request (prompt, steps, first) tokenizes its
  whole text, takes the longest stored key that is a token prefix of it and ends at one of
  the separators of steps[:first], and feeds only the tokens after it, up to the last
  separator (the template's closing tokens after it cannot change a score). Rows of one
  prompt with nothing stored (the first step) first feed, once, their longest common token
  prefix before the first separator (the formatted prompt), then continue from it. Rows with
  different cached lengths share one left-padded forward. If the tokens of the text do not
  extend a stored key (a merge across the boundary), the row is computed from scratch, so
  the scores always equal a full recompute's. Eviction (``prm_cache``): a call scoring a
  prompt at step D (its requests' largest number of steps) keeps that prompt's prefixes of
  D - 1 and D steps only (the parents it read, the prefixes it stored); the prefixes of a
  prompt no recent call scored are dropped; at most ``max_cache_tokens`` tokens are stored,
  the least recently used dropped first. So an SMC run feeds each token of a particle's
  steps to the PRM once: reward tokens grow linearly in the number of steps instead of
  quadratically. ``reuse_cache=False``: every request re-reads its whole text.
* ``classifier`` (``AutoModelForSequenceClassification``): p_j = probability of the
  positive label for the text of the prefix ending at step j; one forward per prefix.

``FunctionScorer`` wraps a rule-based checker ``fn(prompt, steps) -> one probability or
bool per step`` (e.g. the toy task's exact checker). Context: ``HFStepScorer`` knows its
model's context length (``context_length``: the config's position limit, else the
tokenizer's real ``model_max_length``; ``hf_context_length``) and refuses a text too long to
score with ``ppl_scaling.models.lm.ContextLengthError``, naming the prompt, the step and the
lengths (a PRM cannot drop the question, so it never truncates; the check reads the whole
text, also when only its new tokens are fed). Compute: ``HFStepScorer`` records
``reward_tokens`` (the tokens it feeds the model: with KV reuse only the new ones, padding
excluded) in the compute ledger (``ppl_scaling.ledger``).
"""
from __future__ import annotations

import copy

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ppl_scaling.errors import PotentialError
from ppl_scaling.ledger import record

from .hf import resolve_context_length
from .lm import ContextLengthError
from .prm_cache import KV, PrefixKVStore, forward_with_past, full_attention

__all__ = ["HFStepScorer", "FunctionScorer", "StepRequest", "format_plain", "QWEN_PRM_SYSTEM_PROMPT", "MODES"]

MODES = ("separator", "classifier")
QWEN_PRM_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."

StepRequest = tuple[str, tuple[str, ...], int]  # (prompt, steps, first step to score)


def format_plain(prompt: str, steps: Sequence[str]) -> str:
    """The text a classifier PRM reads: prompt + the steps."""
    return prompt + "".join(steps)


class HFStepScorer:
    """Step probabilities from a Hugging Face model (see the module docstring).

    ``format(prompt, steps) -> str`` builds the text the model reads (``classifier``
    default: ``format_plain``; ``separator`` default: the tokenizer's chat template with
    ``system_prompt`` if it has one, else prompt + newline, with every stripped step
    followed by the separator). ``context_length`` overrides the model's (None: read it from
    the config / tokenizer). ``reuse_cache``, ``max_cache_tokens``: KV reuse
    in ``separator`` mode and its eviction (module docstring); the store is ``kv_store``
    (None without reuse: ``classifier`` mode, ``reuse_cache=False``, or a model with
    sliding-window attention).
    """

    def __init__(self, model: Any, tokenizer: Any, *, mode: Literal["separator", "classifier"],
                 separator: str = "<extra_0>", good_label: int = 1,
                 candidate_tokens: tuple[str, str] | None = None,
                 system_prompt: str | None = QWEN_PRM_SYSTEM_PROMPT,
                 format: Callable[[str, Sequence[str]], str] | None = None,
                 batch_size: int = 16, name: str | None = None, context_length: int | None = None,
                 reuse_cache: bool = True, max_cache_tokens: int | None = 2**17) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown PRM mode {mode!r}; choose one of {MODES}")
        self.context_length = resolve_context_length(context_length, model, tokenizer)
        self.model, self.tokenizer, self.mode = model.eval(), tokenizer, mode
        self.good_label, self.batch_size = good_label, batch_size
        self.system_prompt = system_prompt
        self.name = name or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
        self.separator = separator
        self.format = format or (self._format_separator if mode == "separator" else format_plain)
        if mode == "separator":
            self.separator_id = self._single_token(separator, "separator")
        self.candidate_ids = (None if candidate_tokens is None else
                              [self._single_token(t, "candidate token") for t in candidate_tokens])
        self.kv_store = (PrefixKVStore(max_tokens=max_cache_tokens)
                         if reuse_cache and mode == "separator" and full_attention(model) else None)
        # transformers >= 5.24 names the KV cache argument `cache` (`past_key_values` is deprecated there)
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def clear_cache(self) -> None:
        """Forget every stored KV (a new run starts from nothing: its reward tokens are its own)."""
        if self.kv_store is not None:
            self.kv_store = PrefixKVStore(max_tokens=self.kv_store.max_tokens)

    def fresh(self) -> HFStepScorer:
        """This scorer (the same model and tokenizer) with a KV store of its own: one per
        concurrent run, so that runs never read or evict each other's prefixes."""
        other = copy.copy(self)
        other.clear_cache()
        return other

    @classmethod
    def from_pretrained(cls, path: str | Path, *, kind: Literal["auto", "separator", "classifier"] = "auto",
                        device: str = "cpu", dtype: Any = None, trust_remote_code: bool = False,
                        **options: Any) -> HFStepScorer:
        """Load a scorer from a local directory (or a Hub id when online). ``kind``: how to
        read it (auto: sequence classifiers -> ``classifier``; token classifiers,
        ``*ProcessRewardModel`` and causal LMs with ``candidate_tokens`` -> ``separator``).
        ``options``: the constructor's keywords. Qwen2.5-Math-PRM needs ``trust_remote_code=True``."""
        model, tokenizer, kind = _load_hf(path, kind, device, dtype, trust_remote_code)
        options.setdefault("name", Path(str(path)).name)
        return cls(model, tokenizer, mode=kind, **options)

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
    def _encode(self, texts: list[str], where: Sequence[tuple[str, int]]) -> list[list[int]]:
        """The token ids of each text; a text longer than the context raises
        ``ContextLengthError``. ``where``: (prompt, last step) of each text, for the error."""
        ids = [list(self.tokenizer(t)["input_ids"]) for t in texts]
        limit = self.context_length
        for (prompt, step), row in zip(where, ids):
            if limit is not None and len(row) > limit:
                raise ContextLengthError(
                    f"PRM {self.name}: the prefix ending at step {step} (0-based) of the prompt {prompt[:60]!r} "
                    f"is {len(row)} tokens long, over the model's context length of {limit} tokens; "
                    "shorten the prompt or the steps (max_step_tokens, max_steps)", length=len(row), limit=limit)
        return ids

    def _rows(self, ids: list[list[int]]) -> list[Any]:
        """Per token row, the logit rows the scores are read from: (#separators, C) at the
        separator tokens for ``separator``, (1, C) pooled for ``classifier``. The whole rows
        are fed, batched by length, right-padded with an attention mask; records
        ``reward_tokens``."""
        import torch

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
            record(reward_tokens=int(mask.sum()))
            logits = res.logits if hasattr(res, "logits") else res[0]
            for r, i in enumerate(g):
                if self.mode == "separator":
                    pos = [k for k, tok in enumerate(ids[i]) if tok == self.separator_id]
                    out[i] = logits[r, pos].float().cpu()
                else:
                    out[i] = logits[r:r + 1].float().cpu()
        return out

    def _reused_rows(self, prompts: Sequence[str], ids: list[list[int]], firsts: Sequence[int]) -> list[Any]:
        """Per token row (``first`` < its number of separators), the logit rows at the
        separators of steps ``first``.., feeding only the tokens after the row's longest stored
        prefix that ends at a separator of steps[:first], up to its last separator; rows of one
        prompt with nothing stored share their prompt (module docstring). Identical rows are
        fed once."""
        sep, store = self.separator_id, self.kv_store
        keys = [tuple(row[:len(row) - row[::-1].index(sep)]) for row in ids]  # up to the last separator
        jobs: dict[tuple[int, ...], tuple[int, str]] = {}  # key -> (the smallest first step asked, prompt)
        depths: dict[str, int] = {}  # prompt -> its largest number of steps
        for key, first, prompt in zip(keys, firsts, prompts):
            jobs[key] = (min(first, jobs.get(key, (first,))[0]), prompt)
            depths[prompt] = max(depths.get(prompt, 0), key.count(sep))
        try:
            found = {key: store.longest(key, [k + 1 for k, tok in enumerate(key) if tok == sep][:first])
                     for key, (first, _) in jobs.items()}  # key -> (stored prefix length, its KV)
            self._share_prompts({key: prompt for key, (_, prompt) in jobs.items() if not found[key][0]}, found)
            rows = self._feed(sorted(jobs, key=len), {key: prompt for key, (_, prompt) in jobs.items()}, found)
        finally:
            store.end_call(depths)
        return [rows[key][1][first - rows[key][0]:] for key, first in zip(keys, firsts)]

    def _share_prompts(self, unmatched: dict[tuple[int, ...], str],
                       found: dict[tuple[int, ...], tuple[int, KV | None]]) -> None:
        """Rows of one prompt with nothing stored (``unmatched``: key -> prompt) share their
        longest common token prefix before the first separator: fed once and stored, the rows
        then start after it (``found`` updated)."""
        groups: dict[str, list[tuple[int, ...]]] = {}
        for key, prompt in unmatched.items():
            groups.setdefault(prompt, []).append(key)
        heads = {}  # shared prefix -> (prompt, the keys that start with it)
        for prompt, keys in groups.items():
            head = keys[0][:keys[0].index(self.separator_id)]
            for key in keys[1:]:
                head = head[:next((k for k, (a, b) in enumerate(zip(head, key)) if a != b), len(head))]
            if len(keys) > 1 and head:
                heads[head] = (prompt, keys)
        self._feed(list(heads), {head: prompt for head, (prompt, _) in heads.items()},
                   {head: (0, None) for head in heads})
        for head, (prompt, keys) in heads.items():
            for key in keys:
                found[key] = self.kv_store.longest(key, [len(head)])

    def _feed(self, keys: list[tuple[int, ...]], prompts: dict[tuple[int, ...], str],
              found: dict[tuple[int, ...], tuple[int, KV | None]]) -> dict[tuple[int, ...], tuple[int, Any]]:
        """Feed each key's tokens after its stored prefix (``found[key]`` = (length, KV)),
        ``batch_size`` rows a forward, and store each key's KV (with its prompt). Per key:
        (separators in the stored prefix, logit rows at the fed separators). Records
        ``reward_tokens`` (the fed tokens)."""
        sep, pad_id = self.separator_id, getattr(self.model.config, "pad_token_id", None)
        rows = {}
        for s in range(0, len(keys), self.batch_size):
            chunk = keys[s:s + self.batch_size]
            batch = [(found[key][1], key[found[key][0]:]) for key in chunk]
            logits, kvs = forward_with_past(self.model, batch, pad_id=0 if pad_id is None else pad_id,
                                            cache_arg=self.cache_arg)
            record(reward_tokens=sum(len(new) for _, new in batch))
            for r, (key, (_, new), kv) in enumerate(zip(chunk, batch, kvs)):
                pos = [k for k, tok in enumerate(new) if tok == sep]
                rows[key] = (key[:found[key][0]].count(sep), logits[r, pos].float().cpu())
                self.kv_store.put(key, kv, prompts[key], key.count(sep))
        return rows

    def _prob_good(self, logits: Any) -> np.ndarray:
        """p(good) from rows of logits (M, C): softmax over the candidate tokens, the
        sigmoid of a one-logit head, else softmax(logits)[good_label]."""
        import torch

        if self.candidate_ids is not None:
            return torch.softmax(logits[:, self.candidate_ids], -1)[:, 0].numpy().astype(np.float64)
        if logits.shape[-1] == 1:
            return torch.sigmoid(logits[:, 0]).numpy().astype(np.float64)
        return torch.softmax(logits, -1)[:, self.good_label].numpy().astype(np.float64)

    def __call__(self, requests: Sequence[StepRequest]) -> list[np.ndarray]:
        if self.mode == "separator":
            texts = [self.format(prompt, steps) for prompt, steps, _ in requests]
            ids = self._encode(texts, [(prompt, len(steps) - 1) for prompt, steps, _ in requests])
            for (prompt, steps, _), row in zip(requests, ids):
                if row.count(self.separator_id) != len(steps):
                    raise ValueError(
                        f"PRM {self.name}: found {row.count(self.separator_id)} separators {self.separator!r} for "
                        f"{len(steps)} steps; a step must not contain the separator (and the format must put one "
                        "after each step)")
            todo = [r for r, (_, steps, first) in enumerate(requests) if first < len(steps)]
            rows = ([] if not todo else
                    self._reused_rows([requests[r][0] for r in todo], [ids[r] for r in todo],
                                      [requests[r][2] for r in todo])
                    if self.kv_store is not None else
                    [logits[requests[r][2]:] for r, logits in zip(todo, self._rows([ids[r] for r in todo]))])
            results = [np.zeros(0) for _ in requests]
            for r, logits in zip(todo, rows):
                results[r] = self._checked(self._prob_good(logits), requests[r][0], requests[r][2])
            return results
        jobs = [(r, j) for r, (_, _, first) in enumerate(requests) for j in range(first, len(requests[r][1]))]
        texts = [self.format(requests[r][0], requests[r][1][:j + 1]) for r, j in jobs]
        where = [(requests[r][0], j) for r, j in jobs]
        probs = self._prob_good(_cat(self._rows(self._encode(texts, where)))) if texts else np.zeros(0)
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


def _cat(rows: list[Any]) -> Any:
    import torch

    return torch.cat(rows)


class FunctionScorer:
    """Step scores from ``fn(prompt, steps) -> one probability (or bool) per step``."""

    def __init__(self, fn: Callable[[str, tuple[str, ...]], Sequence[float]]) -> None:
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
