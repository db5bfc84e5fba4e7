"""Key/value reuse for a separator PRM: stored prefixes and incremental forwards.

Under causal attention the keys and values of a token depend only on the tokens up to it
(and their positions), so the KV cache of a scored prefix can be kept and the next steps'
tokens fed on top of it: the scores equal those of a full forward over the whole text.
``ppl_scaling.models.scorers.HFStepScorer`` (mode ``separator``) uses this module.

``PrefixKVStore``: KV tensors keyed by the token ids of the prefix they encode (its
content, not a particle: resampled copies share one entry). Each entry has a group (its
prompt) and a depth (its number of steps). Eviction, so that the store holds about the
particles' last two generations of prefixes:

- At the end of a scorer call, for each prompt it scored, with D the largest number of
  steps among its requests (the SMC step), that prompt's entries of depth other than D - 1
  and D are dropped. A step's requests read parents of depth D - 1 and store prefixes of
  depth D, which the next step reads; the parents stay until the next step, since one SMC
  step may reach the scorer as two calls (``Potential.score`` scores finished particles
  through ``complete``, the others through ``prefix``). The prefixes of particles
  resampled away go one step later. Depths, not calls, age the entries, so runs on other
  prompts sharing the scorer (``models.lockstep``) do not, nor does a second call of a step.
- A prompt that no call scored in the last 4 x G calls (G: the prompts holding entries)
  is over (a live run scores each step, in at most 2 calls): its entries are dropped.
- The stored tokens never exceed ``max_tokens``: storing past it drops the least recently
  stored or read entries first (a prefix longer than the bound is not stored); entries read
  in a call are older than the ones it stores, so superseded parents go before new prefixes.

Entries are only ever reused, never required: a dropped one costs a recompute, the scores
are unchanged. Several runs on one prompt at once (at different steps) drop each other's
entries early.

Memory per stored token: layers x 2 x key-value heads x head dim x bytes of the dtype
(Qwen2.5-Math-PRM-7B in bfloat16: 28 x 2 x 4 x 128 x 2 = 56 KiB, so 7 GiB for the default
``max_tokens`` = 2**17).

``forward_with_past``: one batched forward of new tokens on top of stored prefixes of
different lengths. Row r has p_r cached and n_r new tokens; with P = max p_r and N = max n_r
its cache row is left-padded to P columns and its new tokens right-padded to N, the
attention mask (B, P + N) is 1 on columns [P - p_r, P + n_r) and the position ids of the new
tokens are p_r, p_r + 1, ... (explicit, so padding shifts nothing). Row r's KV after the
forward is columns [P - p_r, P + n_r) of the cache: its whole prefix, with no padding.
Full-attention ``DynamicCache`` models only (Llama, Qwen2; see ``full_attention``).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

__all__ = ["KV", "PrefixKVStore", "forward_with_past", "full_attention"]

KV = tuple[tuple[Any, Any], ...]  # per layer (keys, values), each a (1, heads, length, head dim) tensor


class PrefixKVStore:
    """KV caches of token prefixes, keyed by their token ids, each with its *group* (the
    prompt it belongs to) and *depth* (its number of steps); eviction rules in the module
    docstring."""

    def __init__(self, *, max_tokens: int | None = 2**17) -> None:
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                       or max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive integer or None, got {max_tokens!r}")
        self.max_tokens = max_tokens
        self.tokens, self.calls = 0, 0
        # key -> (kv, group, depth); least recently stored or read first
        self._entries: OrderedDict[tuple[int, ...], tuple[KV, str, int]] = OrderedDict()
        self._last_call: dict[str, int] = {}  # group -> the last call that scored it

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: tuple[int, ...]) -> bool:
        return key in self._entries

    def longest(self, ids: Sequence[int], ends: Sequence[int]) -> tuple[int, KV | None]:
        """The longest stored prefix ``ids[:e]`` over the candidate lengths ``ends``: (e, its
        KV), marked as recently used; (0, None) when none is stored."""
        for e in sorted(ends, reverse=True):
            key = tuple(ids[:e])
            if key in self._entries:
                self._entries.move_to_end(key)
                return e, self._entries[key][0]
        return 0, None

    def put(self, key: tuple[int, ...], kv: KV, group: str, depth: int) -> None:
        """Store ``kv`` for the prefix ``key``, then drop the least recently used entries while
        the stored tokens exceed ``max_tokens``."""
        if self.max_tokens is not None and len(key) > self.max_tokens:
            return
        self._drop(key)
        self._entries[key] = (kv, group, depth)
        self.tokens += len(key)
        while self.max_tokens is not None and self.tokens > self.max_tokens:
            self._drop(next(iter(self._entries)))

    def end_call(self, depths: dict[str, int]) -> None:
        """Close a scorer call; ``depths``: group -> the largest depth it scored in the call.
        Such a group keeps its entries of depth D - 1 and D only; a group that no call scored
        in the last 4 x (groups holding entries) calls loses all of its entries."""
        self.calls += 1
        self._last_call.update(dict.fromkeys(depths, self.calls))
        idle = 4 * max(1, len(self._last_call))
        for key, (_, group, depth) in list(self._entries.items()):
            if (group in depths and not depths[group] - 1 <= depth <= depths[group]
                    or self.calls - self._last_call.get(group, self.calls) >= idle):
                self._drop(key)
        held = {group for _, group, _ in self._entries.values()}
        self._last_call = {g: c for g, c in self._last_call.items() if g in held}

    def clear(self) -> None:
        """Drop every entry (frees their memory)."""
        self._entries.clear()
        self._last_call.clear()
        self.tokens = 0

    def _drop(self, key: tuple[int, ...]) -> None:
        if self._entries.pop(key, None) is not None:
            self.tokens -= len(key)


def full_attention(model: Any) -> bool:
    """Whether every attention layer of ``model`` attends to the whole context: no
    ``layer_types`` other than full attention, no active ``sliding_window`` (Mistral's applies
    to every layer; Qwen2's only with ``use_sliding_window``). A window counts mask columns,
    padding included, so a padded incremental forward would not equal a full one."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config(decoder=True)
    kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    return kinds == {"full_attention"} and window is None


def forward_with_past(model: Any, jobs: Sequence[tuple[KV | None, Sequence[int]]], *, pad_id: int,
                      cache_arg: str) -> tuple[Any, list[KV]]:
    """Feed each job's new token ids on top of its stored KV (None: nothing stored) in one
    batched forward (layout: module docstring). Returns the logits of the new positions
    (B, N, C), row r valid for its first n_r positions, and each row's KV of its whole
    prefix. ``cache_arg``: the name of the model's cache keyword (``cache`` in transformers
    >= 5.24, else ``past_key_values``). Every n_r must be >= 1."""
    import torch
    import torch.nn.functional as F
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    device = next(model.parameters()).device
    past = [0 if kv is None else int(kv[0][0].shape[2]) for kv, _ in jobs]
    new = [len(ids) for _, ids in jobs]
    if min(new) < 1:
        raise ValueError("forward_with_past needs at least one new token per row")
    B, P, N = len(jobs), max(past), max(new)
    input_ids = torch.full((B, N), pad_id, dtype=torch.long)
    mask = torch.zeros((B, P + N), dtype=torch.long)
    for r, (_, ids) in enumerate(jobs):
        input_ids[r, :new[r]] = torch.as_tensor(list(ids), dtype=torch.long)
        mask[r, P - past[r]:P + new[r]] = 1
    position_ids = torch.as_tensor(past, dtype=torch.long)[:, None] + torch.arange(N)[None, :]
    cache = DynamicCache()
    if P:
        template = next(kv for kv, _ in jobs if kv is not None)
        for layer, (k0, v0) in enumerate(template):
            keys = [k0.new_zeros((1, k0.shape[1], P, k0.shape[3])) if kv is None else
                    F.pad(kv[layer][0], (0, 0, P - p, 0)) for (kv, _), p in zip(jobs, past)]
            values = [v0.new_zeros((1, v0.shape[1], P, v0.shape[3])) if kv is None else
                      F.pad(kv[layer][1], (0, 0, P - p, 0)) for (kv, _), p in zip(jobs, past)]
            cache.update(torch.cat(keys), torch.cat(values), layer)
    with torch.no_grad():
        out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                    position_ids=position_ids.to(device), use_cache=True, **{cache_arg: cache})
    layers = cache.layers
    if not layers or any(type(layer) is not DynamicLayer or layer.keys.shape[2] != P + N for layer in layers):
        raise NotImplementedError(f"{type(model).__name__} did not fill the full-attention KV cache it was given; "
                                  "score it without reuse (HFStepScorer(..., reuse_cache=False))")
    kvs = [tuple((layer.keys[r:r + 1, :, P - past[r]:P + new[r]].clone(),
                  layer.values[r:r + 1, :, P - past[r]:P + new[r]].clone()) for layer in layers) for r in range(B)]
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits, kvs
