"""Train the bundled learned process reward model (PRM) of the toy task, imperfect on purpose.

    python scripts/train_toy_prm.py [--lm models/assets/toy_lm] [--out models/assets/toy_prm] [--seed 0]

Run after ``scripts/train_toy_lm.py``. The PRM is a ``LlamaForSequenceClassification``
(num_labels=2) with the toy LM's tokenizer and architecture plus one layer: the
LM's layers initialise the bottom (real PRMs are fine-tuned from a policy
model), and the fresh top layer can compare each written character with the
LM's prediction of it from the position before.
It reads a prefix ``prompt + steps so far`` ending at a step boundary and
predicts label 1 = "every step so far is correct"; p(label 1) is the step score.

Data: completions sampled from the toy LM at temperature 1 on fresh training
problems (never a held-out question), every prefix labelled by the exact step
checker ``toy.step_correctness``. Training is dense: one forward pass over a
whole sample gives, by causal attention, the classifier logits of each of its
prefixes; the loss covers the step boundaries (exact labels) and, as auxiliary
targets, every character (1 while the text is a prefix of the solution). A
second auxiliary loss keeps training the backbone as the LM (next-token loss
through the tied embeddings on fresh correct solutions): a verifier's binary
labels teach arithmetic far more slowly than the LM's digit targets. The
budget is fixed and short, so the PRM stays imperfect (false positives exist,
as with real PRMs). Held-out quality, on the LM's own samples for the test
split, goes to ``<out>/metrics.json``: step-level accuracy, AUC, false-positive
and false-negative rates, and the accuracy of best-of-n selection by the PRM's
last-step score.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ppl_scaling.models import toy
from ppl_scaling.rng import torch_global_seed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_toy_lm import encode_examples, llama_config, sample_completions  # noqa: E402


def step_cuts(completion: str) -> list[int]:
    """Character offsets of the step boundaries of ``completion``: after every
    "\\n", and at the end if a final line was cut off without one."""
    cuts = [i + 1 for i, ch in enumerate(completion) if ch == toy.STEP_DELIMITER]
    if completion and not completion.endswith(toy.STEP_DELIMITER):
        cuts.append(len(completion))
    return cuts


def step_prefixes(prompt: str, completion: str) -> list[str]:
    """``prompt + steps so far`` at every step boundary of ``completion``."""
    return [prompt + completion[:c] for c in step_cuts(completion)]


def labelled_prefixes(problems: list[toy.Problem], samples: list[list[str]]):
    """Every step prefix of every sample with its exact label (1 = all steps so far
    correct), and the flat index (problem-major) of the sample it comes from."""
    texts, labels, sample_of = [], [], []
    for i, (p, completions) in enumerate(zip(problems, samples)):
        for j, c in enumerate(completions):
            prefixes = step_prefixes(p.prompt, c)
            texts += prefixes
            labels += [int(f) for f in toy.step_correctness(p.question, c)]
            sample_of += [i * len(completions) + j] * len(prefixes)
    return texts, np.array(labels, dtype=np.int64), np.array(sample_of, dtype=np.int64)


def encode(tokenizer, texts: list[str]):
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True)


def token_labels(question: str, completion: str) -> list[int]:
    """A label per completion character: 1 while the text so far is a prefix of
    the correct solution, except at step boundaries, which carry the exact step
    label (a final line cut off without "\n" is judged as a whole line)."""
    solution = "".join(toy.solution_steps(question))
    agree = 0
    while agree < min(len(completion), len(solution)) and completion[agree] == solution[agree]:
        agree += 1
    labels = [1] * agree + [0] * (len(completion) - agree)
    for c, ok in zip(step_cuts(completion), toy.step_correctness(question, completion)):
        labels[c - 1] = int(ok)
    return labels


def dense_batch(tokenizer, prompts: list[str], completions: list[str], questions: list[str]):
    """Whole samples, right-padded, with the (row, token) position of every
    completion character, its label (``token_labels``) and whether it ends a
    step. The character tokenizer maps character j of the completion to token
    ``1 + len(prompt) + j`` (after <bos>), and causal attention makes the logits
    at a step boundary exactly those of the prefix ending there."""
    rows, where, labels, boundary = [], [], [], []
    for r, (prompt, completion, question) in enumerate(zip(prompts, completions, questions)):
        rows.append(tokenizer.encode(prompt + completion))
        where += [(r, len(prompt) + 1 + j) for j in range(len(completion))]
        labels += token_labels(question, completion)
        cuts = set(step_cuts(completion))
        boundary += [j + 1 in cuts for j in range(len(completion))]
    width = max(map(len, rows))
    input_ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x in rows])
    attention_mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in rows])
    return input_ids, attention_mask, torch.tensor(where).T, torch.tensor(labels), torch.tensor(boundary)


@torch.no_grad()
def prm_scores(model, tokenizer, texts: list[str], batch_size: int = 512) -> np.ndarray:
    """p(label 1 | prefix) for each text."""
    model.eval()
    out = []
    for s in range(0, len(texts), batch_size):
        logits = model(**encode(tokenizer, texts[s:s + batch_size])).logits
        out.append(torch.softmax(logits.float(), -1)[:, 1].numpy())
    return np.concatenate(out) if out else np.zeros(0)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a random positive > a random negative), ties count half
    (the Mann-Whitney statistic over average ranks)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    _, inverse, counts = np.unique(np.concatenate([pos, neg]), return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def minibatches(rng: np.random.Generator, n: int, size: int):
    """Endless minibatches of indices into n items: shuffled epochs, remainders dropped."""
    while True:
        order = rng.permutation(n)
        for s in range(0, n - size + 1, size):
            yield order[s:s + size]


def train(lm_path: Path, out: Path, *, seed: int, problems: int, samples: int, steps: int,
          batch_size: int, lr: float, extra_layers: int) -> tuple[dict, object, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForSequenceClassification

    rng = np.random.default_rng(seed)
    lm = AutoModelForCausalLM.from_pretrained(lm_path)
    tokenizer = AutoTokenizer.from_pretrained(lm_path)
    t0 = time.perf_counter()
    train_problems = toy.training_problems(rng, problems)
    completions = sample_completions(lm, tokenizer, [p.prompt for p in train_problems], samples, rng)
    data = [(p.prompt, c, p.question) for p, cs in zip(train_problems, completions) for c in cs]
    labels = np.concatenate([toy.step_correctness(q, c) for _, c, q in data]).astype(float)
    sample_s = time.perf_counter() - t0
    print(f"{len(data)} LM samples with {len(labels)} step prefixes ({labels.mean():.1%} correct) "
          f"in {sample_s:.0f}s", flush=True)

    n_lm = lm.config.num_hidden_layers
    config = llama_config(num_labels=2, num_hidden_layers=n_lm + extra_layers,
                          architectures=["LlamaForSequenceClassification"])
    with torch_global_seed(rng):
        model = LlamaForSequenceClassification(config)
    loaded = model.model.load_state_dict(lm.model.state_dict(), strict=False)
    assert not loaded.unexpected_keys and all(k.startswith("layers.") for k in loaded.missing_keys)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / steps)
    t0 = time.perf_counter()
    batches = minibatches(rng, len(data), batch_size)
    for step in range(steps):
        model.train()
        input_ids, attention_mask, (r, c), y, boundary = dense_batch(
            tokenizer, *zip(*(data[i] for i in next(batches))))
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        token_loss = torch.nn.functional.cross_entropy(model.score(hidden[r, c]), y, reduction="none")
        loss = token_loss.mean() + token_loss[boundary].mean()  # every character, and the steps again
        # Auxiliary: keep training the backbone as the LM (tied head) on fresh correct solutions.
        fresh = toy.training_problems(rng, batch_size)
        lm_ids, lm_mask, lm_labels = encode_examples(
            tokenizer, [p.prompt for p in fresh], [p.solution for p in fresh])
        lm_hidden = model.model(input_ids=lm_ids, attention_mask=lm_mask, output_hidden_states=True).hidden_states
        lm_logits = model.model.norm(lm_hidden[n_lm][:, :-1]) @ model.model.embed_tokens.weight.T
        loss = loss + torch.nn.functional.cross_entropy(lm_logits.flatten(0, 1), lm_labels[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % 50 == 0:
            print(f"step {step + 1:4d}  loss {loss.item():.4f}  {time.perf_counter() - t0:6.1f}s", flush=True)
    train_s = time.perf_counter() - t0

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {"parameters": sum(p.numel() for p in model.parameters()), "seed": seed,
            "train_problems": problems, "samples_per_problem": samples, "train_prefixes": len(labels),
            "train_positive_rate": float(labels.mean()), "steps": steps, "batch_size": batch_size, "lr": lr,
            "sample_s": round(sample_s, 1), "train_s": round(train_s, 1),
            "initialised_from": "toy LM backbone", "extra_layers": extra_layers, "auxiliary_lm_loss": True}
    return info, lm, tokenizer


def evaluate(prm, lm, tokenizer, problems: list[toy.Problem], rng: np.random.Generator, n: int) -> dict:
    """Step-level quality on held-out LM samples, and best-of-n selection by last-step score."""
    samples = sample_completions(lm, tokenizer, [p.prompt for p in problems], n, rng)
    texts, labels, sample_of = labelled_prefixes(problems, samples)
    scores = prm_scores(prm, tokenizer, texts)
    pred = scores > 0.5
    last = np.r_[sample_of[1:] != sample_of[:-1], True]
    final = np.full(len(problems) * n, -1.0)  # an empty completion scores below any prefix
    final[sample_of[last]] = scores[last]
    final = final.reshape(len(problems), n)
    correct = np.array([[toy.is_correct(c, p.answer) for c in cs] for p, cs in zip(problems, samples)])
    return {
        "prefixes": len(texts), "positive_rate": float(labels.mean()),
        "step_accuracy": float((pred == labels).mean()), "step_auc": auc(scores, labels),
        "false_positive_rate": float(pred[labels == 0].mean()),
        "false_negative_rate": float((~pred[labels == 1]).mean()),
        f"pass@1 ({n} samples)": float(correct.mean()),
        f"best_of_{n}_by_prm": float(correct[np.arange(len(problems)), final.argmax(1)].mean()),
        f"pass@{n}": float(correct.any(1).mean()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lm", type=Path, default=toy.TOY_LM_PATH)
    ap.add_argument("--out", type=Path, default=toy.TOY_PRM_PATH)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--problems", type=int, default=1024, help="training problems sampled from the LM")
    ap.add_argument("--samples", type=int, default=8, help="LM samples per training problem")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--extra-layers", type=int, default=1, help="fresh layers on top of the LM backbone")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not (args.lm / "config.json").exists():
        raise SystemExit(f"no toy LM at {args.lm}; run scripts/train_toy_lm.py first")

    info, lm, tokenizer = train(args.lm, args.out, seed=args.seed, problems=args.problems,
                                samples=args.samples, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                extra_layers=args.extra_layers)
    from transformers import AutoModelForSequenceClassification

    prm = AutoModelForSequenceClassification.from_pretrained(args.out)
    test = evaluate(prm, lm, tokenizer, toy.load_split("test"), np.random.default_rng(args.seed + 1), n=4)
    metrics = {"training": info, "test_lm_samples": test}
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
