"""Hugging Face masked diffusion LMs as the denoiser of ``MaskedDiffusionModel``.

``HFDenoiser(model, mask_id)`` is a callable tokens (N, L) -> logits (N, L, V): any model whose
forward takes the token ids first and returns logits over the vocabulary for every
position (``out.logits``, ``out[0]`` or the tensor itself) with bidirectional attention.
``MaskedDiffusionModel.from_pretrained(path_or_model, gen_length=..., prompt=..., ...)``
builds one and the dynamics around it. The prompt is conditioned on by keeping its tokens
unmasked (they are never redrawn); the mask id comes from ``mask_token_id``, else the
tokenizer's ``mask_token_id``, else the config's ``mask_token_id``, else (``model_type ==
"mdlm"``) the last vocabulary entry.

What each family needs (and the ``MaskedDiffusionModel`` options that reproduce its
reference sampler; temperature must be > 0, see ``masked``):

- LLaDA (``GSAI-ML/LLaDA-8B-*``, ``LLaDAModelLM``, ``trust_remote_code=True``; loaded with
  ``AutoModel``): bidirectional Llama-like, logits at all positions, no time input, mask id
  126336 (``<|mdm_mask|>``, ``config.mask_token_id``). Prompt: the chat-templated ids.
  ``schedule="fixed", remasking="low_confidence", block_length=32`` (semi-autoregressive
  blocks; ``num_steps`` a multiple of the number of blocks).
- MDLM (``kuleshov-group/mdlm-owt``, ``trust_remote_code=True``, ``AutoModelForMaskedLM``;
  its remote code imports ``flash_attn``): a DiT with an absorbing state, x0 predicted from
  x_t; forward(input_ids, timesteps=sigma) with MDLM's log-linear noise
  sigma(s) = -log(1 - (1 - eps) s) (eps = 1e-3) at the state's time s = 1 - t/K; checkpoints
  trained without time conditioning (``config.time_conditioning = False``, mdlm-owt) zero it
  themselves. Mask id 50257 = vocab_size - 1 (GPT-2 tokenizer, which has no mask token: pass
  ``tokenizer=AutoTokenizer.from_pretrained("gpt2")`` for string prompts).
  ``schedule="binomial", remasking="random"`` (the defaults) is MDLM's ancestral sampler.
- Masked LMs (``AutoModelForMaskedLM``: BERT, ModernBERT, ...): not diffusion models but they
  predict masked tokens; ``[MASK]`` from the tokenizer; a reasonable stand-in, e.g. with
  ``prompt="[CLS] ... [SEP]"`` ids or a template that ends in ``[SEP]``.
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["HFDenoiser", "mdlm_sigma"]


def mdlm_sigma(s: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """MDLM's log-linear total noise sigma(s) = -log(1 - (1 - eps) s), so alpha_s = exp(-sigma(s))."""
    return -torch.log1p(-(1.0 - eps) * s)


class HFDenoiser:
    """``model`` as a denoiser: ``self(tokens[, s])`` -> logits (N, L, V) (module docstring).

    ``time_conditioning``: call the model as model(tokens, timesteps=mdlm_sigma(s)) (default:
    whether its forward takes ``timesteps``); ``batch_size``: at most this many sequences per
    forward pass. ``mask_id`` and ``tokenizer`` (optional) travel with it.
    """

    def __init__(self, model: Any, mask_id: int, *, tokenizer: Any = None, time_conditioning: bool | None = None,
                 batch_size: int | None = None) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable as model(input_ids), got {type(model).__name__}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model = model.eval() if hasattr(model, "eval") else model
        self.mask_id = int(mask_id)
        self.tokenizer = tokenizer
        forward = getattr(model, "forward", model)
        self.time_conditioning = ("timesteps" in inspect.signature(forward).parameters if time_conditioning is None
                                  else bool(time_conditioning))
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are (CPU for a model without any)."""
        if isinstance(self.model, torch.nn.Module):
            param = next(self.model.parameters(), None)
            if param is not None:
                return param.device
        return torch.device("cpu")

    @classmethod
    def from_pretrained(cls, model: Any, *, tokenizer: Any = None, mask_token_id: int | None = None,
                        trust_remote_code: bool = False, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, time_conditioning: bool | None = None,
                        batch_size: int | None = None) -> HFDenoiser:
        """``model``: a path or hub id (loaded with ``AutoModelForMaskedLM``, else ``AutoModel``,
        which is LLaDA's mapping) or a loaded model; moved to ``device`` unless None.
        ``tokenizer``: a tokenizer, its path, or None (loaded from ``model``'s path when it has one)."""
        if isinstance(model, (str, os.PathLike)):
            from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

            kwargs = {"trust_remote_code": trust_remote_code, **({} if dtype is None else {"dtype": dtype})}
            path = str(model)
            try:
                model = AutoModelForMaskedLM.from_pretrained(path, **kwargs)
            except ValueError:   # no masked-LM mapping (LLaDA maps AutoModel to its LM)
                model = AutoModel.from_pretrained(path, **kwargs)
            if tokenizer is None:
                try:
                    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
                except (OSError, ValueError):   # a checkpoint without one (MDLM's use GPT-2's)
                    tokenizer = None
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), trust_remote_code=trust_remote_code)
        if isinstance(model, torch.nn.Module):
            model = model.requires_grad_(False) if device is None else model.to(device).requires_grad_(False)
        mask_id = mask_token_id if mask_token_id is not None else _mask_id(model, tokenizer)
        return cls(model, mask_id, tokenizer=tokenizer, time_conditioning=time_conditioning, batch_size=batch_size)

    def __call__(self, tokens: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (N, L, V) at ``tokens`` (N, L); ``s`` (N,): the diffusion time, used when
        ``time_conditioning``."""
        if self.time_conditioning and s is None:
            raise ValueError("this denoiser is time-conditioned: call it as denoiser(tokens, s)")
        device = self.device
        n = self.batch_size or tokens.shape[0]
        out = []
        with torch.no_grad():
            for i in range(0, tokens.shape[0], n):
                kwargs = {"timesteps": mdlm_sigma(s[i:i + n].float()).to(device)} if self.time_conditioning else {}
                out.append(logits_of(self.model(tokens[i:i + n].to(device), **kwargs)))
        return out[0] if len(out) == 1 else torch.cat(out)

    def encode(self, prompt: str | Sequence[int] | torch.Tensor | None) -> list[int]:
        """Token ids of ``prompt``: a string through the tokenizer, ids as they are, [] for None."""
        if prompt is None:
            return []
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a string prompt needs a tokenizer: pass tokenizer=... or token ids")
            return list(self.tokenizer(prompt)["input_ids"])
        return [int(i) for i in torch.as_tensor(prompt).flatten().tolist()]


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a model output: ``out.logits``, ``out[0]`` of a tuple, or ``out`` itself."""
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


def _mask_id(model: Any, tokenizer: Any) -> int:
    config = getattr(model, "config", None)
    for source in (tokenizer, config):
        mask_id = getattr(source, "mask_token_id", None)
        if mask_id is not None:
            return int(mask_id)
    if getattr(config, "model_type", None) == "mdlm":   # the absorbing state is the last entry
        return int(config.vocab_size) - 1
    raise ValueError(f"no mask token id in the tokenizer or the config of {type(model).__name__}: "
                     "pass mask_token_id=...")
