"""Particle filtering vs best-of-N and self-consistency at equal budget on the toy task.

    python scripts/llm_pf_vs_baselines.py [--budget 16] [--problems 200] [--prm PATH | --exact-prm]

Per held-out problem: one run of each particle filter (the PF paper preset, answer by
argmax final PRM score and, from the same particles, by majority vote; the adaptive
variant, answer by weighted vote) and one run of N samples from which best-of-N,
weighted best-of-N and self-consistency all select (the same samples: paired
comparisons). Prints accuracies and paired differences with standard errors.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ppl_scaling.models import toy
from ppl_scaling.models.evaluate import ARITHMETIC_CONFIG, job_rng, load_lm, load_prm
from ppl_scaling.models.harness import run_method
from ppl_scaling.models.rewards import ProcessRewardModel


def exact_prm() -> ProcessRewardModel:
    """The exact step checker as a PRM: p = 0.95 if every line so far is right, else 0.05."""
    def scorer(requests):
        return [np.array([0.95 if toy.check_steps(prompt, steps[:j + 1]) else 0.05
                          for j in range(first, len(steps))]) for prompt, steps, first in requests]
    return ProcessRewardModel(scorer, name="exact")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=int, default=16)
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--model", default=str(toy.TOY_LM_PATH))
    ap.add_argument("--prm", default=str(toy.TOY_PRM_PATH))
    ap.add_argument("--exact-prm", action="store_true", help="use the exact step checker as the PRM")
    args = ap.parse_args()
    torch.set_num_threads(1)
    N, cfg = args.budget, ARITHMETIC_CONFIG
    lm = load_lm(args.model)
    prm = exact_prm() if args.exact_prm else load_prm(args.prm)
    names = ("particle_filtering", "particle_filtering:majority_vote", "particle_filtering_adaptive",
             "best_of_n", "weighted_best_of_n", "self_consistency", "mean single-sample accuracy")
    hits: dict[str, list[float]] = {k: [] for k in names}
    start = time.process_time()
    for i, p in enumerate(toy.load_split("test")[: args.problems]):
        pf = run_method("particle_filtering", lm, p.prompt, prm=prm, budget=N,
                        rng=job_rng(0, p.id, "particle_filtering", N), config=cfg)
        hits["particle_filtering"].append(pf.answer == p.answer)
        hits["particle_filtering:majority_vote"].append(pf.select("majority_vote") == p.answer)
        ad = run_method("particle_filtering_adaptive", lm, p.prompt, prm=prm, budget=N,
                        rng=job_rng(0, p.id, "particle_filtering_adaptive", N), config=cfg)
        hits["particle_filtering_adaptive"].append(ad.answer == p.answer)
        s = run_method("best_of_n", lm, p.prompt, prm=prm, budget=N, rng=job_rng(0, p.id, "sampling", N), config=cfg)
        hits["best_of_n"].append(s.answer == p.answer)
        hits["weighted_best_of_n"].append(s.select("weighted_majority") == p.answer)  # weights: the PRM's p
        hits["self_consistency"].append(s.select("majority_vote") == p.answer)
        hits["mean single-sample accuracy"].append(float(np.mean([a == p.answer for a in s.answers])))
        if (i + 1) % 20 == 0:
            print(f"{i + 1} problems, {time.process_time() - start:.0f} CPU s", flush=True)
    H = {k: np.array(v, dtype=float) for k, v in hits.items()}
    print(f"\nN = {N}, {len(H['best_of_n'])} held-out test problems, PRM: {'exact' if args.exact_prm else args.prm}\n")
    print("| method | accuracy |\n|---|---|")
    for k, v in H.items():
        print(f"| {k} | {v.mean():.3f} ± {v.std(ddof=1) / np.sqrt(len(v)):.3f} |")
    print("\npaired differences:")
    for a in names[:3]:
        for b in names[3:6]:
            d = H[a] - H[b]
            se = d.std(ddof=1) / np.sqrt(len(d))
            print(f"  {a} - {b}: {d.mean():+.3f} ± {se:.3f}" + (f"  (z = {d.mean() / se:.1f})" if se > 0 else ""))


if __name__ == "__main__":
    main()
