"""Train the bundled masked diffusion language model (offline, CPU, a few minutes).

    python scripts/train_text_diffusion.py [--steps 3000] [--batch 128] [--threads 1] [--out diffusion/assets/text_mdm]

Corpus: short restaurant reviews drawn from a small templated grammar, generated
fresh for every batch. Each review has a latent sentiment (positive with probability
0.3); its sentiment words agree with it except for independent 10% flips, and a "but"
review turns the first clause around. So positive reviews (#positive > #negative
words) are a minority the model learns, and steering can raise their share.

Training is MDLM's (Sahoo et al. 2024) continuous-time ELBO for the linear schedule:
mask each token with probability s ~ U(0, 1), predict the masked tokens, weight the
cross-entropy by 1/s. Writes ``model.safetensors``, ``config.json``, ``vocab.json``
and ``metrics.json`` (loss, and the grammatical / positive shares of 1024 samples
at 12, 24 and 48 reverse steps against the corpus).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ppl_scaling.diffusion.masked import MaskedDiffusionModel
from ppl_scaling.diffusion.text_toy import TEXT_DIR, TextDenoiser, Vocabulary
from ppl_scaling.rng import torch_generator, torch_global_seed

SEQ_LEN = 12
P_POSITIVE = 0.3
P_FLIP = 0.1
WORDS = {
    "DET": ["the"],
    "NOUN": ["food", "pizza", "pasta", "soup", "coffee", "dessert", "service", "waiter", "staff", "music",
             "room", "place"],
    "BE": ["was"],
    "INT": ["very", "really", "quite", "so"],
    "ADJ+": ["great", "good", "excellent", "delicious", "friendly", "lovely", "fresh", "perfect"],
    "ADJ-": ["bad", "awful", "terrible", "bland", "rude", "cold", "slow", "dirty"],
    "PRON": ["i", "we"],
    "VERB+": ["loved", "enjoyed", "liked"],
    "VERB-": ["hated", "disliked"],
    "AND": ["and"],
    "BUT": ["but"],
    "IT": ["it"],
    "DOT": ["."],
    "COMMA": [","],
    "BANG": ["!"],
}
# A = sentiment adjective, V = sentiment verb, A~ = adjective of the opposite sentiment.
TEMPLATES = [
    "DET NOUN BE A DOT",
    "DET NOUN BE INT A DOT",
    "DET NOUN BE A AND DET NOUN BE A DOT",
    "DET NOUN BE A~ BUT DET NOUN BE A DOT",
    "PRON V DET NOUN DOT",
    "PRON V DET NOUN COMMA IT BE A DOT",
    "PRON V DET NOUN AND DET NOUN DOT",
    "A NOUN AND A NOUN BANG",
]


def vocabulary() -> Vocabulary:
    tokens = ["<pad>", "<mask>"] + [w for ws in WORDS.values() for w in ws]
    categories = {w: c.rstrip("+-") for c, ws in WORDS.items() for w in ws}
    categories["<pad>"] = "PAD"

    def cats(template: str) -> tuple[str, ...]:
        cs = [{"A": "ADJ", "A~": "ADJ", "V": "VERB"}.get(c, c) for c in template.split()]
        return tuple(cs + ["PAD"] * (SEQ_LEN - len(cs)))

    return Vocabulary(tokens=tuple(tokens), seq_len=SEQ_LEN, categories=categories,
                      templates=tuple(cats(t) for t in TEMPLATES),
                      positive=frozenset(WORDS["ADJ+"] + WORDS["VERB+"]),
                      negative=frozenset(WORDS["ADJ-"] + WORDS["VERB-"]))


def pick(words: list[str], rng: np.random.Generator) -> str:
    return words[int(rng.integers(len(words)))]


def review(rng: np.random.Generator) -> str:
    """One review from the grammar (see the module docstring)."""
    sentiment = rng.random() < P_POSITIVE
    words = []
    for slot in pick(TEMPLATES, rng).split():
        if slot in ("A", "A~", "V"):
            positive = (sentiment if slot != "A~" else not sentiment) != (rng.random() < P_FLIP)
            kind = ("ADJ" if slot != "V" else "VERB") + ("+" if positive else "-")
            words.append(pick(WORDS[kind], rng))
        else:
            words.append(pick(WORDS[slot], rng))
    return " ".join(words)


def corpus(vocab: Vocabulary, n: int, rng: np.random.Generator) -> torch.Tensor:
    return torch.tensor([vocab.encode(review(rng)) for _ in range(n)])


def train(model: TextDenoiser, vocab: Vocabulary, rng: np.random.Generator, *, steps: int, batch: int = 256) -> list:
    g = torch_generator(rng)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    losses, start = [], time.perf_counter()
    for step in range(steps):
        x0 = corpus(vocab, batch, rng)
        # stratified mask rates s in (0, 1] (a low-variance estimate of the ELBO's time integral)
        s = ((torch.arange(batch) + torch.rand(batch, generator=g)) / batch).clamp_min(1e-3)[:, None]
        masked = torch.rand(x0.shape, generator=g) < s
        logits = model(torch.where(masked, vocab.mask_id, x0))
        ce = F.cross_entropy(logits.transpose(1, 2), x0, reduction="none")
        loss = (ce * masked / s).sum() / x0.numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 250 == 0 or step == steps - 1:
            print(f"  step {step:5d}  ELBO loss/token {np.mean(losses[-250:]):.4f}  "
                  f"{time.perf_counter() - start:6.1f} s", flush=True)
    model.eval()
    return losses


def shares(vocab: Vocabulary, tokens: torch.Tensor) -> dict:
    return {"grammatical": round(float(vocab.is_grammatical(tokens).float().mean()), 4),
            "positive": round(float((vocab.sentiment(tokens) > 0).float().mean()), 4),
            "mean_sentiment": round(float(vocab.sentiment(tokens).mean()), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=TEXT_DIR)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from safetensors.torch import save_file

    rng = np.random.default_rng(args.seed)
    vocab = vocabulary()
    with torch_global_seed(rng):
        model = TextDenoiser(len(vocab), SEQ_LEN)
    start = time.perf_counter()
    losses = train(model, vocab, rng, steps=args.steps, batch=args.batch)
    seconds = time.perf_counter() - start

    n = 1024
    data = corpus(vocab, n, rng)
    samples = {K: MaskedDiffusionModel(model, SEQ_LEN, vocab.mask_id, num_steps=K).sample(n, rng) for K in (12, 24, 48)}
    metrics = {
        "params": sum(p.numel() for p in model.parameters()), "train_steps": args.steps, "batch": args.batch,
        "train_seconds": round(seconds, 1), "final_elbo_loss_per_token": round(float(np.mean(losses[-200:])), 4),
        "corpus": shares(vocab, data),
        "samples": {f"num_steps={K}": {"num_samples": n, **shares(vocab, x)} for K, x in samples.items()},
        "sample_examples": vocab.decode(samples[24][:8]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(args.out / "model.safetensors"))
    (args.out / "config.json").write_text(json.dumps(model.config, indent=2) + "\n")
    (args.out / "vocab.json").write_text(json.dumps(vocab.to_json(), indent=1) + "\n")
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
