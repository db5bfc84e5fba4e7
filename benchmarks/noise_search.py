"""Noise search (Ma et al. 2025) versus random search, FK steering, best-of-N and SVDD at equal NFEs.

The bundled digits DDPM (``diffusion.toy``) with K scheduler steps. Every method gets a budget of
about n x K denoiser evaluations (NFEs; the ledger's ``nfe``, printed per method: search over
paths cannot always spend the budget exactly and gets at most it) and answers with one sample, its
particle of largest weight (``best_index``). Rewards of that answer:

    digit4   r(x) = log p(y = 4 | x) under the bundled reward classifier (what the methods maximise),
             with the held-out classifier's accuracy on "4" beside it
    ink      r(x) = brightness of x read in [-1, 1]: the mean pixel value in [0, 1], the amount of ink

Methods (``ppl_scaling.samplers``):

    random_search       n noises of the deterministic DDIM sampler (eta = 0), the best      n K NFEs
    zero_order          pivot + rounds x M neighbours sqrt(1 - s²) n + s ξ (M = 3, the
                        default s = 0.5), rounds = (n - 1) / M                              n K
    paths               search over paths: one path to level 2, then rounds of M branches
                        that renoise 2 levels and denoise 4 (levels 2, 4, 6, 8, 10 for
                        K = 10: 2 + 19 M NFEs), the largest M within the budget             <= n K
    best_of_n           n samples of the stochastic DDPM sampler, the best                  n K
    fk_steering         n particles, lam = 1, 10, 100 (difference shape, adaptive
                        resampling), the particle of largest weight                        n K
    svdd                one chain, n candidates per step (Li et al. 2024)                   n K

The noise searches run on DDIM (eta = 0), the others on DDPM: their base samplers differ, so
compare noise searches with random search and the others with best-of-N. For each reward and budget
the table gives the mean reward of the answer over R seeds with a 95% CI (1.96 standard errors) and,
for the noise searches, the paired difference to random search over the same seeds (± 1.96 SE);
4 significant digits, as log p(y = 4 | x) saturates near 0 once a clear 4 is found.

    .venv/bin/python benchmarks/noise_search.py                 # R = 32 seeds, n = 16 and 64, K = 10
    .venv/bin/python benchmarks/noise_search.py --rewards ink   # one reward
    .venv/bin/python benchmarks/noise_search.py --seeds 4 --budgets 4   # a smoke run
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from ppl_scaling.diffusion import toy
from ppl_scaling.diffusion.rewards import brightness
from ppl_scaling.result import SMCResult
from ppl_scaling.samplers.best_of_n import best_of_n
from ppl_scaling.samplers.fk_steering import fk_steering
from ppl_scaling.samplers.noise_search import random_search, search_over_paths, zero_order_search
from ppl_scaling.samplers.svdd import svdd

NOISE_SEARCHES = ("random_search", "zero_order", "paths")
START, BACKWARD, FORWARD = 2, 4, 2  # search over paths, in levels


def path_nfe(M: int, K: int) -> int:
    """NFEs of search over paths with one path and M branches (START, BACKWARD, FORWARD): START to
    reach the first level, then per round M (level gained + FORWARD) steps, + M for the x0
    prediction scored below the clean level K."""
    levels, nfe = [START], START
    while levels[-1] < K:
        i, k = levels[-1], min(levels[-1] - FORWARD + BACKWARD, K)
        nfe += M * (k - i + FORWARD) + (M if k < K else 0)
        levels.append(k)
    return nfe


def path_branches(n: int, K: int) -> int:
    """The largest number of branches M with ``path_nfe(M, K) <= n K``."""
    M = 1
    while path_nfe(M + 1, K) <= n * K:
        M += 1
    return M


def methods(n: int, K: int, ddpm: Any, ddim: Any) -> dict[str, Callable[[Any, int], SMCResult]]:
    """Each method at a budget of about n K NFEs: ``run(potential, seed) -> SMCResult``."""
    M, M_paths = 3, path_branches(n, K)
    return {
        "random_search": lambda p, s: random_search(ddim, n, potential=p, seed=s),
        "zero_order": lambda p, s: zero_order_search(ddim, M, potential=p, rounds=(n - 1) // M, seed=s),
        "paths": lambda p, s: search_over_paths(ddim, 1, potential=p, num_branches=M_paths, start=START,
                                                backward=BACKWARD, forward=FORWARD, seed=s),
        "best_of_n": lambda p, s: best_of_n(ddpm, n, potential=p, seed=s),
        "fk_steering lam=1": lambda p, s: fk_steering(ddpm, n, potential=p, lam=1.0, seed=s),
        "fk_steering lam=10": lambda p, s: fk_steering(ddpm, n, potential=p, lam=10.0, seed=s),
        "fk_steering lam=100": lambda p, s: fk_steering(ddpm, n, potential=p, lam=100.0, seed=s),
        "svdd": lambda p, s: svdd(ddpm, 1, potential=p, num_candidates=n, seed=s),
    }


def ci(values: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its 95% normal CI, 1.96 standard errors."""
    return float(values.mean()), float(1.96 * values.std(ddof=1) / np.sqrt(values.size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=32)
    parser.add_argument("--budgets", type=int, nargs="+", default=[16, 64], help="n: budgets of n x K NFEs")
    parser.add_argument("--rewards", nargs="+", default=["digit4", "ink"], choices=["digit4", "ink"])
    parser.add_argument("--steps", type=int, default=10, help="K, scheduler steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from diffusers import DDIMScheduler

    K = args.steps
    unet, scheduler = toy.load_digits_ddpm()
    ddpm = toy.digits_model(K, unet=unet, scheduler=scheduler)
    ddim = toy.digits_model(K, unet=unet, scheduler=DDIMScheduler.from_config(scheduler.config), eta=0.0,
                            allow_deterministic=True)
    judge = toy.load_eval_classifier()
    rewards = {"digit4": toy.digit_reward(4), "ink": brightness.in_range(-1.0, 1.0)}
    rewards = {name: rewards[name] for name in args.rewards}
    seeds = [1000 + r for r in range(args.seeds)]
    print(f"# noise search vs baselines, digits DDPM, K = {K}, R = {args.seeds} seeds, "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    for rname, reward in rewards.items():
        for n in args.budgets:
            print(f"\n## reward {rname}, budget n = {n} ({n * K} NFEs)\n")
            extra = " held-out acc |" if rname == "digit4" else ""
            print(f"| method | NFEs/run | reward calls/run | mean reward ± 95% CI | vs random search (paired) |"
                  f"{extra} s |")
            print("|---|---|---|---|---|" + ("---|" if extra else "") + "---|")
            base = None
            for name, run in methods(n, K, ddpm, ddim).items():
                t0 = time.perf_counter()
                results = [run(reward, s) for s in seeds]
                xs = torch.stack([res.particles.x[res.best_index] for res in results])
                r = reward(xs).double().numpy()
                mean, half = ci(r)
                paired = ""
                if name == "random_search":
                    base = r
                elif name in NOISE_SEARCHES:
                    d, dh = ci(r - base)
                    paired = f"{d:+.4g} ± {dh:.2g}"
                acc = ""
                if extra:
                    acc = f" {(toy.classify(xs, judge).argmax(-1) == 4).float().mean().item():.2f} |"
                nfe = np.mean([res.ledger.nfe for res in results])
                calls = np.mean([res.ledger.reward_calls for res in results])
                print(f"| {name} | {nfe:.0f} | {calls:.0f} | {mean:.4g} ± {half:.2g} | {paired} |{acc} "
                      f"{time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
