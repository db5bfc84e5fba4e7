"""The bundled masked diffusion language model: a toy for steering text diffusion.

A 3-layer bidirectional transformer (``TextDenoiser``) over short templated restaurant
reviews ("the soup was cold but the waiter was friendly ."), stored in ``assets/text_mdm/``
and trained by ``scripts/train_text_diffusion.py``. Positive reviews are a minority of its
corpus; ``sentiment_reward`` (r(x) = #positive - #negative words) steers toward them::

    mdm, reward = review_model(num_steps=12)
    result = particle_filtering(mdm, 16, potential=reward, shape="difference", lam=2.0, seed=0)
    _, vocab = load_text_mdm()
    vocab.decode(result.particles.tokens)

(``particle_filtering`` from ``ppl_scaling.samplers.particle_filtering``; ``mdm`` is a
``MaskedDiffusionModel``, pure dynamics; the reward is a ``Potential`` of (N, L) tokens.)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ppl_scaling.potentials import Potential

from .masked import MaskedDiffusionModel

__all__ = ["TEXT_DIR", "TextDenoiser", "Vocabulary", "load_text_mdm", "sentiment_reward", "review_model"]

TEXT_DIR = Path(__file__).resolve().parent / "assets" / "text_mdm"


class TextDenoiser(nn.Module):
    """Bidirectional transformer encoder: tokens (N, L) -> logits (N, L, V) of the clean tokens.
    No time input: for absorbing-state diffusion the mask pattern tells the noise level."""

    def __init__(self, vocab_size: int, seq_len: int, d_model: int = 64, num_layers: int = 3,
                 num_heads: int = 4, d_ff: int = 128) -> None:
        super().__init__()
        self.config = {"vocab_size": vocab_size, "seq_len": seq_len, "d_model": d_model,
                       "num_layers": num_layers, "num_heads": num_heads, "d_ff": d_ff}
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Parameter(torch.zeros(seq_len, d_model))
        layer = nn.TransformerEncoderLayer(d_model, num_heads, d_ff, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.encoder(self.embed(tokens) + self.pos)))


@dataclass(frozen=True)
class Vocabulary:
    """Word-level vocabulary of the bundled corpus, with its grammar and sentiment lexicon.

    ``categories`` maps each word to its grammatical category; ``templates`` lists the
    category sequences of the grammar (padded with <pad> to ``seq_len``).
    """

    tokens: tuple[str, ...]
    seq_len: int
    categories: dict[str, str]
    templates: tuple[tuple[str, ...], ...]
    positive: frozenset[str]
    negative: frozenset[str]

    @property
    def pad_id(self) -> int:
        return self.tokens.index("<pad>")

    @property
    def mask_id(self) -> int:
        return self.tokens.index("<mask>")

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        """Words of ``text`` -> token ids, padded with <pad> to ``seq_len``."""
        words = text.split()
        unknown = [w for w in words if w not in self.tokens]
        if unknown:
            raise ValueError(f"words {unknown} are not in the vocabulary of {len(self)} tokens")
        if len(words) > self.seq_len:
            raise ValueError(f"{len(words)} words do not fit in seq_len={self.seq_len}")
        return [self.tokens.index(w) for w in words] + [self.pad_id] * (self.seq_len - len(words))

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """Sequences (N, L) -> strings (padding dropped, masks shown as '_')."""
        out = []
        for row in tokens.tolist():
            words = ["_" if i == self.mask_id else self.tokens[i] for i in row if i != self.pad_id]
            out.append(" ".join(words))
        return out

    def polarity(self) -> torch.Tensor:
        """(V,) +1 for positive words, -1 for negative words, 0 otherwise."""
        pol = torch.zeros(len(self.tokens))
        pol[[self.tokens.index(w) for w in self.positive]] = 1.0
        pol[[self.tokens.index(w) for w in self.negative]] = -1.0
        return pol

    def sentiment(self, tokens: torch.Tensor) -> torch.Tensor:
        """#positive - #negative words of each sequence (N, L) -> (N,) float."""
        return self.polarity().to(tokens.device)[tokens].sum(-1)

    def is_grammatical(self, tokens: torch.Tensor) -> torch.Tensor:
        """Whether each sequence's category sequence is one of the grammar's templates."""
        cats = [tuple(self.categories.get(self.tokens[i], "?") for i in row) for row in tokens.tolist()]
        allowed = set(self.templates)
        return torch.tensor([c in allowed for c in cats])

    def to_json(self) -> dict:
        return {"tokens": list(self.tokens), "seq_len": self.seq_len, "categories": self.categories,
                "templates": [list(t) for t in self.templates], "positive": sorted(self.positive),
                "negative": sorted(self.negative)}

    @classmethod
    def from_json(cls, d: dict) -> Vocabulary:
        return cls(tokens=tuple(d["tokens"]), seq_len=int(d["seq_len"]), categories=dict(d["categories"]),
                   templates=tuple(tuple(t) for t in d["templates"]), positive=frozenset(d["positive"]),
                   negative=frozenset(d["negative"]))


def load_text_mdm(path: str | Path = TEXT_DIR) -> tuple[TextDenoiser, Vocabulary]:
    """The bundled masked diffusion LM and its vocabulary, in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path / 'model.safetensors'} not found; train it with "
                                "`python scripts/train_text_diffusion.py` (make toy-models)")
    model = TextDenoiser(**json.loads((path / "config.json").read_text()))
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    model.eval().requires_grad_(False)
    return model, Vocabulary.from_json(json.loads((path / "vocab.json").read_text()))


def sentiment_reward(vocab: Vocabulary) -> Potential:
    """The potential with log-value r(x) = #positive - #negative sentiment words of the
    token sequences x (N, L) (a rule-based reward; ``Vocabulary.sentiment``)."""
    return Potential.from_callable(vocab.sentiment, name="sentiment")


def review_model(*, num_steps: int = 24, prompt: str | None = None,
                 **options: Any) -> tuple[MaskedDiffusionModel, Potential]:
    """The bundled model as ``MaskedDiffusionModel`` dynamics, its denoiser wrapped like any
    Hugging Face masked diffusion LM (``MaskedDiffusionModel.from_pretrained``; ``options``: its
    keyword arguments, e.g. ``schedule``, ``remasking``), conditioned on the first words
    ``prompt`` (e.g. "the soup was") when given, and
    ``sentiment_reward``, the potential that steers toward positive reviews:
    ``Tilted(*review_model(), shape=..., lam=...)`` or ``method(mdm, N, potential=reward)``."""
    model, vocab = load_text_mdm()
    ids = [] if prompt is None else vocab.encode(prompt)[: len(prompt.split())]
    mdm = MaskedDiffusionModel.from_pretrained(model, mask_token_id=vocab.mask_id, prompt=ids,
                                               gen_length=vocab.seq_len - len(ids), num_steps=num_steps, **options)
    return mdm, sentiment_reward(vocab)
