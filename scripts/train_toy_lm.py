"""Train the bundled toy LM: a tiny Llama that solves toy arithmetic about a third of the time.

    python scripts/train_toy_lm.py [--out models/assets/toy_lm] [--seed 0] [--threads 1]

The model (``LlamaForCausalLM``, hidden 128, 4 heads of dim 32 so vLLM can load
it, 3 layers, tied embeddings, ~0.6M parameters) sees fresh random problems each
step (never a held-out question), with the loss on the completion only; AdamW
with a cosine schedule. Training stops at the first checkpoint whose exact
validation score reaches ``--target``: the mean over the validation split of
p(correct completion), computed by teacher forcing. That is the probability of
a fully correct solution at temperature 1, a lower bound on single-sample answer
accuracy (a wrong step sometimes still ends on the right answer, ~+0.07 here).
The criterion has no sampling noise, so the same command gives the same
weights, and it lands the model where inference-time scaling matters
(pass@1 ~ 1/3, pass@16 > 0.8).

It then samples 16 completions per held-out test problem (batched, KV cache,
left padding) and writes pass@1, pass@16 (unbiased estimator) and
majority-vote@16, overall and by difficulty, to ``<out>/metrics.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ppl_scaling.metrics import pass_at_k
from ppl_scaling.models import toy
from ppl_scaling.models.tokenizer import VOCAB, build_tokenizer
from ppl_scaling.rng import torch_global_seed

MAX_NEW_TOKENS = 64


def llama_config(**overrides):
    """The toy Llama configuration (vocabulary = the character tokenizer's)."""
    from transformers import LlamaConfig

    kwargs = dict(vocab_size=len(VOCAB), hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=4, head_dim=32, max_position_embeddings=128,
                  tie_word_embeddings=True, bos_token_id=VOCAB["<bos>"], eos_token_id=VOCAB["<eos>"],
                  pad_token_id=VOCAB["<pad>"])
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def encode_examples(tokenizer, prompts: list[str], completions: list[str], *, add_eos: bool = True):
    """Right-padded ``input_ids, attention_mask, labels`` for prompt + completion
    (+ EOS); labels are -100 outside the completion."""
    rows, label_rows = [], []
    for prompt, completion in zip(prompts, completions):
        p = tokenizer.encode(prompt)  # <bos> prompt
        c = tokenizer.encode(completion, add_special_tokens=False) + ([tokenizer.eos_token_id] if add_eos else [])
        rows.append(p + c)
        label_rows.append([-100] * len(p) + c)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in label_rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return input_ids, attention_mask, labels


@torch.no_grad()
def completion_logprobs(model, tokenizer, prompts: list[str], completions: list[str]) -> np.ndarray:
    """log p(completion | prompt) of each pair, by teacher forcing (EOS not included)."""
    input_ids, attention_mask, labels = encode_examples(tokenizer, prompts, completions, add_eos=False)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    target = labels[:, 1:]
    logp = torch.log_softmax(logits.float(), dim=-1)
    token_lp = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_lp * (target != -100)).sum(-1).numpy()


def exact_score(model, tokenizer, problems: list[toy.Problem]) -> dict[str, float]:
    """Mean p(correct completion) (~ pass@1) and mean 1-(1-p)^16 (~ pass@16)."""
    model.eval()
    p = np.exp(completion_logprobs(model, tokenizer, [q.prompt for q in problems], [q.solution for q in problems]))
    return {"p_correct": float(p.mean()), "pass16_estimate": float((1 - (1 - p) ** 16).mean())}


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: list[str], num_samples: int, rng: np.random.Generator,
                       *, temperature: float = 1.0, batch_size: int = 256) -> list[list[str]]:
    """``num_samples`` completions per prompt, sampled at ``temperature`` with
    ``model.generate`` (KV cache, left padding); randomness drawn from ``rng``."""
    model.eval()
    tokenizer.padding_side = "left"
    flat = [p for p in prompts for _ in range(num_samples)]
    texts: list[str] = []
    for start in range(0, len(flat), batch_size):
        enc = tokenizer(flat[start:start + batch_size], return_tensors="pt", padding=True)
        with torch_global_seed(rng):
            out = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=MAX_NEW_TOKENS, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [texts[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]


def majority_answer(completions: list[str]) -> int | None:
    """The most frequent extracted answer (ties: first seen); None if no answer."""
    answers = [a for a in map(toy.extract_answer, completions) if a is not None]
    return Counter(answers).most_common(1)[0][0] if answers else None


def evaluate(model, tokenizer, problems: list[toy.Problem], rng: np.random.Generator, n: int = 16) -> dict:
    """pass@1, pass@n and majority-vote@n at temperature 1, overall and by difficulty."""
    samples = sample_completions(model, tokenizer, [p.prompt for p in problems], n, rng)
    rows = []
    for p, completions in zip(problems, samples):
        c = sum(toy.is_correct(s, p.answer) for s in completions)
        majority = majority_answer(completions) == p.answer
        rows.append((p.difficulty, pass_at_k(n, c, 1), pass_at_k(n, c, n), majority))

    def summary(sel):
        return {"problems": len(sel), "pass@1": float(np.mean([r[1] for r in sel])),
                f"pass@{n}": float(np.mean([r[2] for r in sel])),
                f"majority@{n}": float(np.mean([r[3] for r in sel]))}

    return {**summary(rows), "by_difficulty": {str(d): summary([r for r in rows if r[0] == d])
                                               for d in toy.DIFFICULTIES}}


def train(out: Path, *, seed: int, target: float, max_steps: int, batch_size: int, lr: float,
          eval_every: int) -> dict:
    from transformers import GenerationConfig, LlamaForCausalLM

    rng = np.random.default_rng(seed)
    tokenizer = build_tokenizer()
    with torch_global_seed(rng):
        model = LlamaForCausalLM(llama_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = 50
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, max_steps) / max_steps))))
    validation = toy.load_split("validation")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"toy LM: {n_params:,} parameters; stop when validation p(correct) >= {target}", flush=True)

    t0, step, score = time.perf_counter(), 0, {"p_correct": 0.0}
    while step < max_steps:
        model.train()
        batch = toy.training_problems(rng, batch_size)
        input_ids, attention_mask, labels = encode_examples(
            tokenizer, [p.prompt for p in batch], [p.solution for p in batch])
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        if step % eval_every == 0:
            score = exact_score(model, tokenizer, validation)
            print(f"step {step:5d}  loss {loss.item():.4f}  val p(correct) {score['p_correct']:.3f}  "
                  f"pass@16~{score['pass16_estimate']:.3f}  {time.perf_counter() - t0:6.1f}s", flush=True)
            if score["p_correct"] >= target:
                break
    else:
        raise RuntimeError(f"validation p(correct) {score['p_correct']:.3f} never reached {target} "
                           f"in {max_steps} steps; raise --max-steps or lower --target")
    train_s = time.perf_counter() - t0

    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
        max_new_tokens=MAX_NEW_TOKENS)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"parameters": n_params, "steps": step, "train_s": round(train_s, 1), "seed": seed,
            "batch_size": batch_size, "lr": lr, "max_steps": max_steps, "target": target,
            "validation": score}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=toy.TOY_LM_PATH)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--target", type=float, default=0.26, help="validation p(correct) at which to stop")
    ap.add_argument("--max-steps", type=int, default=2000, help="cosine schedule length and step limit")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=10)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    training = train(args.out, seed=args.seed, target=args.target, max_steps=args.max_steps,
                     batch_size=args.batch_size, lr=args.lr, eval_every=args.eval_every)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.out)
    tokenizer = AutoTokenizer.from_pretrained(args.out)
    t0 = time.perf_counter()
    test = evaluate(model, tokenizer, toy.load_split("test"), np.random.default_rng(args.seed + 1))
    test["eval_s"] = round(time.perf_counter() - t0, 1)
    metrics = {"training": training, "test_temperature_1": test}
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
