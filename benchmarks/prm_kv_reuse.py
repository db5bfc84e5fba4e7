"""PRM reward tokens per problem with and without KV reuse (``HFStepScorer(reuse_cache=...)``).

    python benchmarks/prm_kv_reuse.py [--particles 8] [--problems 10] [--steps 4,8,16,32]

1. ``toy``: ``METHODS["particle_filtering"]`` (``run_method``) on the toy task's test split,
   ``--problems`` per difficulty (1-5 operations: 2-6 steps), N = ``--particles``, with a
   separator PRM: a random ``LlamaForTokenClassification`` of the toy LM's size on its
   tokenizer plus the separator ``<extra_0>`` (the scores are arbitrary; the token counts are
   what is measured). Both runs use the same seed; the trajectories agree as long as the
   scores do (they are equal up to float rounding).
2. ``long``: SMC-like rounds without an LM, to see the growth in the number of steps: N
   particles, each round multinomial resampling then one random 12-character step per
   particle, scored by ``ProcessRewardModel.step_scores``; reward tokens and wall seconds
   (CPU, one thread) summed over K rounds.

Prints markdown tables: reward tokens per problem (mean), reuse off / on, and their ratio.
"""
from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch

from ppl_scaling.ledger import recording
from ppl_scaling.models import toy
from ppl_scaling.models.evaluate import ARITHMETIC_CONFIG
from ppl_scaling.models.harness import run_method
from ppl_scaling.models.hf import HFLanguageModel
from ppl_scaling.models.rewards import ProcessRewardModel
from ppl_scaling.models.scorers import HFStepScorer
from ppl_scaling.models.types import Partial


def separator_prm(path: str) -> tuple[object, object]:
    """A random token-classification PRM with the toy LM's architecture, saved in ``path``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForTokenClassification

    tok = AutoTokenizer.from_pretrained(toy.TOY_LM_PATH)
    tok.add_special_tokens({"additional_special_tokens": ["<extra_0>"]})
    tok.model_max_length = 2048
    cfg = LlamaConfig.from_pretrained(toy.TOY_LM_PATH, vocab_size=len(tok), num_labels=2,
                                      max_position_embeddings=2048, initializer_range=0.1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForTokenClassification(cfg).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


def toy_table(model: object, tok: object, particles: int, problems: int) -> list[str]:
    lm = HFLanguageModel.from_pretrained(toy.TOY_LM_PATH)
    rows = ["| operations | steps (mean) | reward tokens, reuse off | reuse on | off / on |", "|---|---|---|---|---|"]
    for difficulty in toy.DIFFICULTIES:
        chosen = [p for p in toy.load_split("test") if p.difficulty == difficulty][:problems]
        tokens, steps = {False: [], True: []}, []
        for reuse in (False, True):
            prm = ProcessRewardModel(HFStepScorer(model, tok, mode="separator", reuse_cache=reuse))
            for i, problem in enumerate(chosen):
                run = run_method("particle_filtering", lm, problem.prompt, prm=prm, budget=particles,
                                 rng=np.random.default_rng(i), config=ARITHMETIC_CONFIG)
                tokens[reuse].append(run.ledger.reward_tokens)
                if reuse:
                    steps.append(np.mean([len(x.steps) for x in run.result.particles.partials()]))
        off, on = np.mean(tokens[False]), np.mean(tokens[True])
        rows.append(f"| {difficulty} | {np.mean(steps):.1f} | {off:.0f} | {on:.0f} | {off / on:.2f} |")
    return rows


def long_table(model: object, tok: object, particles: int, ks: list[int]) -> list[str]:
    rows = ["| steps K | reward tokens, reuse off | reuse on | off / on | on / K | seconds, off | on |",
            "|---|---|---|---|---|---|---|"]
    for k in ks:
        spent, seconds = {}, {}
        for reuse in (False, True):
            prm = ProcessRewardModel(HFStepScorer(model, tok, mode="separator", reuse_cache=reuse))
            rng = np.random.default_rng(k)
            xs = [Partial("Q:12+34-5\n", ()) for _ in range(particles)]
            with recording() as led:
                for _ in range(k):
                    idx = rng.integers(0, particles, particles)
                    xs = [Partial(xs[i].prompt, xs[i].steps + ("".join(rng.choice(list("0123456789+-="), 11)) + "\n",))
                          for i in idx]
                    prm.step_scores(xs)
            spent[reuse], seconds[reuse] = led.reward_tokens, led.wall_s
        rows.append(f"| {k} | {spent[False]} | {spent[True]} | {spent[False] / spent[True]:.1f} | "
                    f"{spent[True] / k:.0f} | {seconds[False]:.2f} | {seconds[True]:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--problems", type=int, default=10)
    parser.add_argument("--steps", default="4,8,16,32")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as path:
        model, tok = separator_prm(path)
        print(f"particle_filtering on the toy task, N = {args.particles}, {args.problems} problems per difficulty\n")
        print("\n".join(toy_table(model, tok, args.particles, args.problems)))
        print(f"\nSMC-like rounds, N = {args.particles}, 12-token steps\n")
        print("\n".join(long_table(model, tok, args.particles, [int(k) for k in args.steps.split(",")])))


if __name__ == "__main__":
    main()
