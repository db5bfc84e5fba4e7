"""Masked (absorbing-state) discrete diffusion over token sequences, as a Feynman-Kac model.

The forward process masks each token of x0 independently: at time s in [0, 1] a token
is still visible with probability alpha_s = 1 - s (the linear schedule of MDLM,
Sahoo et al. 2024). The reverse process starts from the all-mask sequence and, over K
steps s_k = 1 - k/K, unmasks: from s_{k-1} to s_k each still-masked token is revealed
with probability (alpha_{s_k} - alpha_{s_{k-1}}) / (1 - alpha_{s_{k-1}}) = 1 / (K - k + 1),
its value drawn from the denoiser's prediction p_theta(x0_i | x_t) (the mask token
excluded); revealed tokens never change. The last step reveals all that remain.

``MaskedDiffusionModel`` is that reverse process as an FK model with T = K + 1 steps
(state t = the sequence after t unmasking steps: t = 0 all masked, t = K clean) and
potentials from an FK shape (``ppl_scaling.shapes``: difference / max / sum / last, with
the terminal correction) on intermediate rewards r_t of a predicted clean sequence:

    intermediate="argmax"   r_t = r(x0_hat), masked positions filled with the denoiser's
                            argmax (deterministic given x_t; the default: one reward call
                            per step and no extra randomness in the weights)
    intermediate="sample"   r_t = r(x0_i), one fill drawn from p_theta(x0 | x_t)
    intermediate="many"     r_t = (1/lam) log (1/n) Σ_i exp(lam r(x0_i)), n independent fills
                            (FK steering's "many-sample" estimate of the soft value
                            (1/lam) log E[exp(lam r(x0)) | x_t] under the model's
                            factorised x0 prediction)

and r_K = r(x) of the clean sequence itself, so the final target is
p_theta(x) exp(lam r(x)) for every shape. Each state carries the denoiser output at
its own tokens, so one step costs one denoiser evaluation per particle.

    model, vocab = load_text_mdm()
    fk = MaskedDiffusionModel(model, vocab.seq_len, vocab.mask_id, reward=sentiment_reward(vocab),
                              lam=2.0, num_steps=12)
    result = ppl_scaling.smc(fk, num_particles=16, seed=0)
    vocab.decode(result.particles.tokens)

The bundled model (``assets/text_mdm/``, trained by ``scripts/train_text_diffusion.py``)
is a 3-layer bidirectional transformer over short templated restaurant reviews
("the soup was cold but the waiter was friendly ."); positive reviews are a minority
of its corpus, and ``sentiment_reward`` (#positive - #negative words) steers toward them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ppl_scaling.fk import FeynmanKac
from ppl_scaling.rng import torch_generator
from ppl_scaling.shapes import FKShape
from ppl_scaling.state import take

from .model import CountedReward, soft_value

TEXT_DIR = Path(__file__).resolve().parent / "assets" / "text_mdm"
INTERMEDIATE = ("argmax", "sample", "many")


# -- the FK model -------------------------------------------------------------------------
@dataclass
class MaskedState:
    """A batch of N token sequences at one FK step (fields share the particle axis)."""

    tokens: torch.Tensor                  # (N, L) long; mask_id where still masked
    logp: torch.Tensor | None             # denoiser log-probabilities (N, L, V) at tokens; None when final
    reward: np.ndarray                    # latest evaluated intermediate reward (nan before the first)
    acc: dict[str, np.ndarray]            # FK shape accumulators
    log_potential: np.ndarray             # logG of this step

    @property
    def num_particles(self) -> int:
        return int(self.tokens.shape[0])

    def take(self, idx: np.ndarray) -> "MaskedState":
        return MaskedState(tokens=take(self.tokens, idx),
                           logp=None if self.logp is None else take(self.logp, idx),
                           reward=self.reward[idx], acc=take(self.acc, idx), log_potential=self.log_potential[idx])


class MaskedDiffusionModel(FeynmanKac):
    """FK model of a masked-diffusion sampler steered by ``reward``; see the module docstring.

    ``denoiser(tokens)``: (N, L) long -> logits (N, L, V) of the clean tokens.
    ``reward(tokens)`` (or ``reward(decode(tokens))``): (N, L) -> (N,) floats.
    ``reward=None`` or ``lam=0`` gives the base sampler with equal weights.
    ``temperature`` divides the logits of the reveal distribution (1 = the model).
    """

    def __init__(self, denoiser: Callable[[torch.Tensor], torch.Tensor], seq_len: int, mask_id: int, *,
                 reward: Callable[[Any], Any] | None = None, potential: str = "difference", lam: float = 1.0,
                 num_steps: int = 16, intermediate: str = "argmax", num_x0_samples: int = 4,
                 temperature: float = 1.0, decode: Callable[[torch.Tensor], Any] | None = None,
                 device: str | torch.device = "cpu") -> None:
        if not callable(denoiser):
            raise TypeError(f"denoiser must be callable as denoiser(tokens) -> logits, got {type(denoiser).__name__}")
        if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        if intermediate not in INTERMEDIATE:
            raise ValueError(f"intermediate must be one of {INTERMEDIATE}, got {intermediate!r}")
        if not isinstance(num_x0_samples, (int, np.integer)) or num_x0_samples < 1:
            raise ValueError(f"num_x0_samples must be a positive integer, got {num_x0_samples!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.denoiser = denoiser
        self.L, self.mask_id, self.K = int(seq_len), int(mask_id), int(num_steps)
        self.T = self.K + 1
        self.shape = FKShape(potential, float(lam))
        self.lam = float(lam)
        self.reward = None if reward is None else CountedReward(reward, decode)
        self.intermediate = intermediate
        self.num_x0_samples = int(num_x0_samples)
        self.temperature = float(temperature)
        self.device = torch.device(device)
        self.nfe = 0
        self.calls = 0

    # -- FK interface -------------------------------------------------------------------
    def M0(self, N: int, rng: np.random.Generator) -> MaskedState:
        return self._state(0, self._all_masked(N), self.shape.init(N), np.full(N, np.nan), rng)

    def M(self, t: int, xp: MaskedState, rng: np.random.Generator) -> MaskedState:
        return self._step(t, xp, rng)

    def logG(self, t: int, xp: MaskedState | None, x: MaskedState) -> np.ndarray:
        return x.log_potential

    def counters(self) -> dict[str, int]:
        return {"nfe": self.nfe, "denoiser_calls": self.calls,
                "reward_evals": 0 if self.reward is None else self.reward.evals,
                "reward_calls": 0 if self.reward is None else self.reward.calls}

    def sample(self, N: int, rng: np.random.Generator) -> torch.Tensor:
        """N sequences from the base sampler (no potentials): the plain reverse process."""
        x = self._state(0, self._all_masked(N), self.shape.init(N), np.full(N, np.nan), rng, score=False)
        for t in range(1, self.T):
            x = self._step(t, x, rng, score=False)
        return x.tokens

    # -- the reverse process ------------------------------------------------------------
    def predict(self, tokens: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (N, L, V) of the clean tokens, the mask token excluded."""
        with torch.no_grad():
            logits = self.denoiser(tokens)
        self.nfe += int(tokens.shape[0])
        self.calls += 1
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(tokens.shape):
            raise ValueError(f"denoiser must return logits of shape (N, L, V) = ({tokens.shape[0]}, {self.L}, V) "
                             f"for tokens of shape {tuple(tokens.shape)}; got "
                             f"{getattr(logits, 'shape', type(logits).__name__)}")
        if not 0 <= self.mask_id < logits.shape[-1]:
            raise ValueError(f"mask_id {self.mask_id} is outside the denoiser's vocabulary of {logits.shape[-1]} tokens")
        logits = logits.float() / self.temperature
        logits[..., self.mask_id] = -torch.inf
        return torch.log_softmax(logits, dim=-1)

    def fill(self, tokens: torch.Tensor, logp: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Masked positions filled from ``logp``: drawn with ``generator``, or the argmax if None."""
        if generator is None:
            draw = logp.argmax(-1)
        else:
            N, L, V = logp.shape
            draw = torch.multinomial(logp.exp().reshape(N * L, V), 1, generator=generator).reshape(N, L)
        return torch.where(tokens == self.mask_id, draw, tokens)

    def unmask(self, t: int, tokens: torch.Tensor, logp: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Reverse step t (1..K): reveal each masked token with probability 1 / (K - t + 1)."""
        reveal = torch.rand(tokens.shape, generator=generator, device=tokens.device) * (self.K - t + 1) < 1.0
        return torch.where(reveal, self.fill(tokens, logp, generator), tokens)

    # -- states and potentials ----------------------------------------------------------
    def _all_masked(self, N: int) -> torch.Tensor:
        return torch.full((N, self.L), self.mask_id, dtype=torch.long, device=self.device)

    def _step(self, t: int, xp: MaskedState, rng: np.random.Generator, score: bool = True) -> MaskedState:
        tokens = self.unmask(t, xp.tokens, xp.logp, torch_generator(rng, self.device.type))
        return self._state(t, tokens, xp.acc, xp.reward, rng, score)

    def _state(self, t: int, tokens: torch.Tensor, acc: dict, reward: np.ndarray,
               rng: np.random.Generator, score: bool = True) -> MaskedState:
        final = t == self.K
        logp = None if final else self.predict(tokens)
        state = MaskedState(tokens=tokens, logp=logp, reward=reward, acc=acc,
                            log_potential=np.zeros(tokens.shape[0]))
        if not score or self.reward is None or (self.lam == 0.0 and not final):
            return state
        r = self.reward(tokens) if final else self._intermediate(tokens, logp, rng)
        logG, acc = self.shape.step(acc, r, final=final)
        return replace(state, reward=r, acc=acc, log_potential=logG)

    def _intermediate(self, tokens: torch.Tensor, logp: torch.Tensor, rng: np.random.Generator) -> np.ndarray:
        if self.intermediate == "argmax":
            return self.reward(self.fill(tokens, logp, None), "reward of the argmax x0 prediction")
        g = torch_generator(rng, self.device.type)
        if self.intermediate == "sample":
            return self.reward(self.fill(tokens, logp, g), "reward of the sampled x0 prediction")
        n = self.num_x0_samples
        draws = self.fill(tokens.repeat_interleave(n, 0), logp.repeat_interleave(n, 0), g)
        r = self.reward(draws, "reward of the x0 draws").reshape(tokens.shape[0], n)
        return soft_value(r, self.lam)


# -- the bundled model ----------------------------------------------------------------------
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
    def from_json(cls, d: dict) -> "Vocabulary":
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


def sentiment_reward(vocab: Vocabulary) -> Callable[[torch.Tensor], torch.Tensor]:
    """r(x) = #positive - #negative sentiment words in x (a rule-based reward)."""
    polarity = vocab.polarity()

    def reward(tokens: torch.Tensor) -> torch.Tensor:
        return polarity.to(tokens.device)[tokens].sum(-1)

    return reward


def review_model(*, lam: float = 2.0, potential: str = "difference", num_steps: int = 24,
                 reward: Callable[[torch.Tensor], Any] | None = None, **kwargs: Any) -> MaskedDiffusionModel:
    """The bundled model as a ``MaskedDiffusionModel`` steered by ``reward``
    (default: ``sentiment_reward``, toward positive reviews)."""
    model, vocab = load_text_mdm()
    return MaskedDiffusionModel(model, vocab.seq_len, vocab.mask_id,
                                reward=sentiment_reward(vocab) if reward is None else reward,
                                potential=potential, lam=lam, num_steps=num_steps, **kwargs)
