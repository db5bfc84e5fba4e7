"""Hugging Face transformers backend: batched step sampling with a KV cache per particle.

    lm = HFLanguageModel.from_pretrained("path/or/hub-id", device="cuda", dtype="bfloat16")
    ctx = lm.start([lm.encode(prompt)]).take(np.zeros(N, int))     # the prompt is encoded once
    s = lm.sample_steps(ctx, step_delimiter="\\n\\n", max_step_tokens=256, temperature=0.8, generator=g)
    s = lm.sample_steps(ctx, ..., temperature=0.8, top_p=0.95, top_k=50, min_p=0.05, generator=g)  # truncated

Sampling controls: as in ``ppl_scaling.models.lm`` (vLLM's semantics and order: temperature,
min-p, top-k, top-p), computed on the float32 logits of each position; ``log_q`` is the
sampled step's log-probability under the truncated, renormalised proposal.

What happens underneath (``KVContexts``):

- The cache holds every token of a row except the last one, the *pending* token, which
  the next forward pass feeds. Rows are right-aligned: row r's cached tokens are its last
  columns (``mask`` = 1), left padding before them; the pending token sits at position
  ``mask[r].sum()``. Positions and the attention mask are passed explicitly, so rows of
  different lengths share one batched forward pass.
- The prompt is encoded once; ``take`` with a single source row expands it without a copy.
  Resampling (``take(idx)``) index-selects cache rows: nothing is re-encoded from text.
- One forward pass per token for the rows still generating in this step
  (``sample_steps_many``: for the rows of several callers at once, each drawing from its own
  generator; ``ppl_scaling.models.lm``, merged calls). A row that has
  finished its step is fed a masked padding token while it shares the batch; once at least
  half of the batch has finished, the finished rows are split off, so the remaining rows
  run alone. At the end of the step all rows are re-packed right-aligned (a gather), which
  removes the masked holes. Particles that finished (EOS) are dropped by the caller
  (``StepModel``) and cost nothing afterwards.

Ledger (``ppl_scaling.ledger``): ``start`` records one forward pass and its rows' cached
tokens as ``prefill_tokens``; a step records one forward pass per token position, the
sampled ``tokens``, and the rows' pending tokens (fed by the step's first pass, not sampled
by it) as ``prefill_tokens``; ``next_token_logprobs`` (full recompute) one forward pass
and every context token as ``prefill_tokens``.

Context length (``lm.context_length``): the config's ``max_position_embeddings`` (or
``n_positions`` / ``max_sequence_length`` / ``seq_length``), else the tokenizer's
``model_max_length`` unless it is transformers' "unset" sentinel (huge), else unchecked;
``context_length=`` overrides it. ``start`` refuses a row longer than it, a step a row
whose context + ``max_step_tokens`` exceeds it (``ContextLengthError``), unless the model
was built with ``truncate="left"``: such rows are then re-encoded from their last tokens
(recorded as a forward pass and ``prefill_tokens``). ``next_token_logprobs`` likewise.

Only models whose cache is a plain full-attention ``DynamicCache`` (Llama, Qwen2, Mistral
without sliding windows, ...) take the fast path; others raise ``NotImplementedError``.
"""
from __future__ import annotations

import inspect

import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ppl_scaling.ledger import Ledger, record, recording

from .lm import (TRUNCATIONS, Contexts, MergingLanguageModel, RowGenerators, StepRecorder, StepSample,
                 check_sampling, fit_context, is_identity, measured, merge_eos, sample_tokens)

KV = tuple[tuple[torch.Tensor, torch.Tensor], ...]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
_UNSET_MAX_LENGTH = 10**9  # tokenizers without a limit report int(1e30) (transformers' VERY_LARGE_INTEGER)


def resolve_context_length(context_length: int | None, model: Any, tokenizer: Any = None) -> int | None:
    """``context_length`` if given (a positive integer, else ``ValueError``), else the model's own
    (``hf_context_length``)."""
    if context_length is None:
        return hf_context_length(model, tokenizer)
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
        raise ValueError(f"context_length must be a positive integer, got {context_length!r}")
    return context_length


def hf_context_length(model: Any, tokenizer: Any = None) -> int | None:
    """The context length of a transformers model: its (text) config's position limit, else
    the tokenizer's ``model_max_length`` when it is a real value (not the huge "unset"
    sentinel), else None (unknown)."""
    config = getattr(model, "config", model)
    configs = [config]
    if hasattr(config, "get_text_config"):
        try:
            configs.insert(0, config.get_text_config(decoder=True))
        except (TypeError, ValueError, AttributeError):
            pass
    for cfg in configs:
        for key in _POSITION_KEYS:
            value = getattr(cfg, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and 0 < value < _UNSET_MAX_LENGTH:
                return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < _UNSET_MAX_LENGTH:
        return value
    return None


class KVContexts(Contexts):
    """Token rows with their KV-cache rows (layout in the module docstring)."""

    def __init__(self, ids: Sequence[Sequence[int]], kv: KV | None, mask: torch.Tensor,
                 pending: torch.Tensor) -> None:
        super().__init__(ids)
        self.kv, self.mask, self.pending = kv, mask, pending

    def take(self, idx: Sequence[int] | np.ndarray) -> "KVContexts":
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if is_identity(idx, len(self)):
            return self
        ids = [self.ids[i] for i in idx]
        if len(self) == 1 and len(idx) > 0:  # one shared row (the prompt): views, no copy
            n = len(idx)
            kv = None if self.kv is None else tuple(
                (k.expand(n, *k.shape[1:]), v.expand(n, *v.shape[1:])) for k, v in self.kv)
            return KVContexts(ids, kv, self.mask.expand(n, -1), self.pending.expand(n))
        t = torch.as_tensor(idx, device=self.mask.device)
        kv = None if self.kv is None else tuple((k.index_select(0, t), v.index_select(0, t)) for k, v in self.kv)
        return KVContexts(ids, kv, self.mask.index_select(0, t), self.pending.index_select(0, t))

    def extend(self, new_ids: Sequence[Sequence[int]]) -> Contexts:
        raise TypeError("KVContexts grow through HFLanguageModel.sample_steps, which updates their cache")

    @classmethod
    def concat(cls, parts: Sequence["KVContexts"]) -> "KVContexts":
        parts = [p for p in parts if len(p)]
        if len(parts) == 1:
            return parts[0]
        if not parts:
            raise ValueError("concat needs at least one non-empty KVContexts")
        W = max(p.mask.shape[1] for p in parts)
        template = next((p.kv for p in parts if p.kv is not None), None)
        padded = [_left_pad(p.kv if p.kv is not None or template is None else _empty_like(template, len(p)),
                            p.mask, W) for p in parts]
        kv = None if template is None else tuple(
            (torch.cat([kv_[i][0] for kv_, _ in padded]), torch.cat([kv_[i][1] for kv_, _ in padded]))
            for i in range(len(template)))
        return KVContexts([r for p in parts for r in p.ids], kv, torch.cat([m for _, m in padded]),
                          torch.cat([p.pending for p in parts]))


def _empty_like(kv: KV, n: int) -> KV:
    return tuple((k.new_zeros((n, k.shape[1], 0, k.shape[3])), v.new_zeros((n, v.shape[1], 0, v.shape[3])))
                 for k, v in kv)


def _left_pad(kv: KV | None, mask: torch.Tensor, W: int) -> tuple[KV | None, torch.Tensor]:
    """Pad ``W - L`` masked zero columns on the left."""
    extra = W - mask.shape[1]
    if extra <= 0:
        return kv, mask
    if kv is not None:
        kv = tuple((F.pad(k, (0, 0, extra, 0)), F.pad(v, (0, 0, extra, 0))) for k, v in kv)
    return kv, F.pad(mask, (extra, 0))


def _pack(kv: KV, mask: torch.Tensor, W: int) -> tuple[KV, torch.Tensor]:
    """Right-align every row's unmasked columns into width ``W`` (>= the longest row),
    dropping masked holes; the valid columns keep their order."""
    kv, mask = _left_pad(kv, mask, W)
    L = mask.shape[1]
    if bool((mask[:, 1:] >= mask[:, :-1]).all()):  # already right-aligned: trim
        return tuple((k[:, :, L - W:], v[:, :, L - W:]) for k, v in kv), mask[:, L - W:]
    # A stable sort of the 0/1 mask lists each row's masked columns first, then its valid ones in order.
    order = torch.sort(mask.to(torch.int8), dim=1, stable=True).indices[:, L - W:]

    def gather(x: torch.Tensor) -> torch.Tensor:
        return x.gather(2, order[:, None, :, None].expand(x.shape[0], x.shape[1], W, x.shape[3]))

    return tuple((gather(k), gather(v)) for k, v in kv), mask.gather(1, order)


def _as_cache(kv: KV | None) -> Any:
    """A fresh ``DynamicCache`` over the tensors ``kv`` (no copy; the forward pass
    concatenates new columns into new tensors, leaving ``kv`` untouched)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache()
    if kv is not None:
        for k, v in kv:
            layer = DynamicLayer()
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
            cache.layers.append(layer)
    return cache


def _cache_tensors(cache: Any) -> KV:
    from transformers.cache_utils import DynamicLayer

    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        kinds = sorted({type(layer).__name__ for layer in cache.layers})
        raise NotImplementedError(f"HFLanguageModel's step sampler needs full-attention DynamicCache layers; "
                                  f"this model produced {kinds}")
    return tuple((layer.keys, layer.values) for layer in cache.layers)


class HFLanguageModel(MergingLanguageModel):
    """A transformers causal LM and its tokenizer, with a KV-cached batched step sampler.
    ``context_length``: override the model's (module docstring); ``truncate="left"``: drop the
    oldest tokens of a row that does not fit instead of raising ``ContextLengthError``."""

    def __init__(self, model: Any, tokenizer: Any, *, context_length: int | None = None,
                 truncate: str | None = None) -> None:
        cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:
            raise NotImplementedError(f"{type(model).__name__} uses attention layers {sorted(kinds)}; "
                                      "HFLanguageModel supports full attention only")
        self.model, self.tokenizer = model.eval(), tokenizer
        # transformers >= 5.24 names the KV cache argument `cache` (`past_key_values` is deprecated there)
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.device = next(model.parameters()).device
        self.eos_token_id = merge_eos(tokenizer.eos_token_id,
                                      getattr(getattr(model, "generation_config", None), "eos_token_id", None))
        self.pad_token_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
        if truncate not in TRUNCATIONS:
            raise ValueError(f"truncate must be one of {TRUNCATIONS}, got {truncate!r}")
        self.context_length = resolve_context_length(context_length, model, tokenizer)
        self.truncate = truncate
        self._delimiter_tokens: dict[str, torch.Tensor | None] = {}

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype | None = None, *, context_length: int | None = None,
                        truncate: str | None = None) -> "HFLanguageModel":
        """Load ``AutoModelForCausalLM`` and ``AutoTokenizer`` from a local directory or a hub id.
        ``dtype`` (e.g. "bfloat16") defaults to the checkpoint's own dtype; ``context_length``,
        ``truncate`` as in the constructor."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        name = str(name_or_path)
        path = Path(name).expanduser()
        if not path.exists() and (not _HUB_ID.match(name) or isinstance(name_or_path, Path)):
            raise FileNotFoundError(f"model path {name!r} does not exist; pass a directory holding config.json "
                                    "and the weights, or a Hugging Face hub id such as 'Qwen/Qwen2.5-0.5B'")
        if isinstance(dtype, str) and dtype != "auto":
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32' or 'bfloat16'")
            dtype = getattr(torch, dtype)
        source = str(path) if path.exists() else name
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype if dtype is not None else "auto")
        except OSError as e:
            raise OSError(f"could not load a causal LM from {name!r}: it is not a local directory and the "
                          f"Hugging Face hub could not provide it (offline?). Original error: {e}") from e
        return cls(model.to(device), tokenizer, context_length=context_length, truncate=truncate)

    # -- the minimal interface ---------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _padded(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded input ids, attention mask and position ids of ``rows``."""
        L = max(len(r) for r in rows)
        ids = torch.full((len(rows), L), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), L), dtype=torch.long)
        for i, r in enumerate(rows):
            if len(r):
                ids[i, L - len(r):] = torch.as_tensor(list(r))
                mask[i, L - len(r):] = 1
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        return ids.to(self.device), mask.to(self.device), pos.to(self.device)

    @torch.no_grad()
    def next_token_logprobs(self, contexts: list[list[int]]) -> torch.Tensor:
        """Full recompute (no cache) of log p(next token | context) for each context."""
        contexts, _ = fit_context(contexts, 0, self.context_length, truncate=self.truncate, who=self._who)
        ids, mask, pos = self._padded(contexts)
        record(forward_passes=1, prefill_tokens=sum(len(c) for c in contexts))
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        return torch.log_softmax(logits[:, -1].float(), dim=-1)

    # -- the fast path -----------------------------------------------------------------
    @torch.no_grad()
    def start(self, ids: Sequence[Sequence[int]]) -> KVContexts:
        """Encode the rows ``ids`` (all but each row's last token go into the cache)."""
        if len(ids) == 0 or any(len(r) == 0 for r in ids):
            raise ValueError("every context needs at least one token (e.g. BOS); got an empty one")
        ids, _ = fit_context(ids, 0, self.context_length, truncate=self.truncate, who=self._who)
        pending = torch.as_tensor([r[-1] for r in ids], dtype=torch.long, device=self.device)
        prefixes = [list(r[:-1]) for r in ids]
        if max(len(p) for p in prefixes) == 0:
            return KVContexts(ids, None, torch.zeros((len(ids), 0), dtype=torch.long, device=self.device), pending)
        inp, mask, pos = self._padded(prefixes)
        cache = _as_cache(None)
        self.model(input_ids=inp, attention_mask=mask, position_ids=pos, use_cache=True, **{self.cache_arg: cache})
        record(forward_passes=1, prefill_tokens=sum(len(p) for p in prefixes))
        return KVContexts(ids, _cache_tensors(cache), mask, pending)

    @property
    def _who(self) -> str:
        return f"HFLanguageModel({getattr(self.model.config, '_name_or_path', '') or type(self.model).__name__})"

    def _fit(self, contexts: KVContexts, new_tokens: int) -> KVContexts:
        """``contexts`` with room for ``new_tokens`` more tokens per row: refuse
        (``ContextLengthError``) or, with ``truncate="left"``, re-encode the rows that do
        not fit from their last tokens."""
        rows, cut = fit_context(contexts.ids, new_tokens, self.context_length, truncate=self.truncate,
                                who=self._who)
        if not cut:
            return contexts
        cut_set = set(cut)
        kept = [r for r in range(len(contexts)) if r not in cut_set]
        fresh = self.start([rows[r] for r in cut])
        order = np.empty(len(contexts), dtype=np.int64)
        order[kept + cut] = np.arange(len(contexts))
        return KVContexts.concat([contexts.take(kept), fresh]).take(order)

    def _may_end(self, delimiter: str) -> torch.Tensor | None:
        """Per vocabulary id: can this token complete ``delimiter``? (None: check every token.)
        A token that completes it decodes, on its own, to text containing the delimiter's
        last character; the shortcut is skipped for delimiters ending in a space, which
        some tokenizers attach to the next token."""
        if delimiter not in self._delimiter_tokens:
            table = None
            if not delimiter.endswith(" "):
                V = self.model.get_output_embeddings().weight.shape[0]
                n = min(V, len(self.tokenizer))
                pieces = self.tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=True)
                may = [delimiter[-1] in s or s == "" or "\ufffd" in s for s in pieces]
                table = torch.tensor(may + [True] * (V - n))
            self._delimiter_tokens[delimiter] = table
        return self._delimiter_tokens[delimiter]

    def sample_steps_many(self, parts: Sequence[tuple[Contexts, torch.Generator]], *, step_delimiter: str | None,
                          max_step_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                          top_k: int | None = None, min_p: float = 0.0) -> list[tuple[StepSample, Ledger]]:
        """One step for the rows of every part in shared forward passes, each part's tokens drawn
        from its own generator (``RowGenerators``) as ``sample_steps`` on that part alone would
        draw them; each part's new cache is re-packed to its own width, the layout it would
        have alone. Ledger per part (stand-alone rule): one forward pass per token position at
        which one of its rows was still generating, its rows' pending tokens (and any rows it
        re-encodes to fit) as ``prefill_tokens``, its sampled ``tokens``. Float caveat: a row's
        logits in a merged batch (other rows, other padding) may differ from its logits alone
        in the last bits, so ``log_q`` / ``log_p`` agree to rounding and the sampled tokens
        agree unless a draw falls within rounding of a boundary."""
        return measured(self._sample_steps_many, parts, step_delimiter, max_step_tokens,
                        *check_sampling(temperature, top_p, top_k, min_p))[0]

    @torch.no_grad()
    def _sample_steps_many(self, parts: Sequence[tuple[Contexts, torch.Generator]], step_delimiter: str | None,
                           max_step_tokens: int, temperature: float, top_p: float, top_k: int | None,
                           min_p: float) -> list[tuple[StepSample, Ledger]]:
        if not all(isinstance(c, KVContexts) for c, _ in parts):
            raise TypeError("HFLanguageModel.sample_steps needs KVContexts from HFLanguageModel.start(...)")
        n_iter = 1 if step_delimiter is None else max_step_tokens
        costs = [Ledger() for _ in parts]
        fitted = []
        for (c, _), cost in zip(parts, costs):
            with recording(into=cost):
                fitted.append(self._fit(c, n_iter) if len(c) else c)
        sizes = [len(c) for c in fitted]
        bounds = np.r_[0, np.cumsum(sizes)].tolist()
        R = bounds[-1]
        rec = StepRecorder(self, R, step_delimiter)
        if R == 0:
            return [(rec.result(c), cost) for c, cost in zip(fitted, costs)]
        gens = RowGenerators([g for _, g in parts], np.repeat(np.arange(len(parts)), sizes))
        contexts = KVContexts.concat(fitted)
        may_end = None if step_delimiter is None else self._may_end(step_delimiter)
        cache = _as_cache(contexts.kv)
        mask, pending = contexts.mask, contexts.pending.clone()
        pos = mask.sum(1)
        rows = torch.arange(R, device=self.device)
        live = torch.ones(R, dtype=torch.bool, device=self.device)
        split = []  # (rows, kv, mask, pending) of rows split off the batch
        for k in range(n_iter):
            mask = torch.cat([mask, live.to(mask.dtype)[:, None]], dim=1)
            inp = torch.where(live, pending, torch.full_like(pending, self.pad_token_id))
            logits = self.model(input_ids=inp[:, None], attention_mask=mask, position_ids=pos[:, None],
                                use_cache=True, **{self.cache_arg: cache}).logits[:, -1]
            li = live.nonzero().squeeze(1)
            sampled = rows[li].cpu().numpy()
            row_gens = gens.take(sampled)
            tok, log_q, log_p = sample_tokens(logits[li], temperature, row_gens, top_p=top_p, top_k=top_k,
                                              min_p=min_p)
            pending[li], pos[li] = tok, pos[li] + 1
            check = None if may_end is None else may_end[tok.cpu()].numpy()
            still = np.empty(len(sampled), dtype=bool)
            for g, a, b in row_gens.segments():
                with recording(into=costs[g]):  # k = 0 feeds the pending tokens
                    record(forward_passes=1, prefill_tokens=sizes[g] if k == 0 else 0)
                    still[a:b] = rec.add(sampled[a:b], tok[a:b], log_q[a:b], log_p[a:b],
                                         None if check is None else check[a:b])
            live[li] = torch.as_tensor(still, device=self.device)
            if not live.any():
                break
            if k + 1 < n_iter and 2 * int(live.sum()) <= len(live):
                keep, drop = live.nonzero().squeeze(1), (~live).nonzero().squeeze(1)
                kv = _cache_tensors(cache)
                split.append((rows[drop], tuple((k_[drop], v_[drop]) for k_, v_ in kv), mask[drop], pending[drop]))
                cache.batch_select_indices(keep)
                rows, mask, pending, pos, live = rows[keep], mask[keep], pending[keep], pos[keep], live[keep]
        split.append((rows, _cache_tensors(cache), mask, pending))
        kv, mask, pending = _merge(split)
        ids = [old + tuple(new) for old, new in zip(contexts.ids, rec.ids)]
        step = rec.result(KVContexts(ids, kv, mask, pending))
        if len(parts) == 1:
            return [(step, costs[0])]
        out = []
        for c, cost, a, b in zip(fitted, costs, bounds, bounds[1:]):
            if a == b:
                out.append((StepRecorder(self, 0, step_delimiter).result(c), cost))
                continue
            m = mask[a:b]
            own_kv, own_mask = _pack(tuple((k_[a:b], v_[a:b]) for k_, v_ in kv), m, int(m.sum(1).max()))
            out.append((step.rows(a, b, KVContexts(ids[a:b], own_kv, own_mask, pending[a:b])), cost))
        return out


def _merge(parts: list[tuple[torch.Tensor, KV, torch.Tensor, torch.Tensor]]) -> tuple[KV, torch.Tensor, torch.Tensor]:
    """Re-pack the parts right-aligned to a common width and restore the original row order."""
    W = max(int(m.sum(1).max()) for _, _, m, _ in parts)
    packed = [_pack(kv, m, W) for _, kv, m, _ in parts]
    if len(parts) == 1:
        (kv, mask), rows, pending = packed[0], parts[0][0], parts[0][3]
        if is_identity(rows.cpu().numpy(), len(rows)):
            return kv, mask, pending
    rows = torch.cat([p[0] for p in parts])
    inv = torch.empty_like(rows)
    inv[rows] = torch.arange(len(rows), device=rows.device)
    kv = tuple((torch.cat([p[0][i][0] for p in packed]).index_select(0, inv),
                torch.cat([p[0][i][1] for p in packed]).index_select(0, inv)) for i in range(len(packed[0][0])))
    mask = torch.cat([m for _, m in packed]).index_select(0, inv)
    return kv, mask, torch.cat([p[3] for p in parts]).index_select(0, inv)
