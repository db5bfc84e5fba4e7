"""Seed-paper methods B on the toy arithmetic task: rejection sampling with the learned PRM as an
imperfect verifier (measured vs the fLaws closed form), the Solve-Detect-Verify cascade (learned
PRM -> exact checker), DeepPrune vs self-consistency, and verifier scaling at a fixed compute.

    OMP_NUM_THREADS=1 python benchmarks/seed_methods_b.py --problems 50 --seeds 2 --out /tmp/seed_b.json

Paired design: run s of problem i uses ``default_rng([seed, s, i])`` for every method. The closed
forms take per-problem p, TPR, FPR measured on an independent pool of ``--pool`` samples per problem
(self-consistency draws, graded by the answer; verdicts of the verifier on each).
"""
from __future__ import annotations

import argparse
import functools
import json
import time
from typing import Any

import numpy as np

from ppl_scaling.metrics import rejection_sampling_accuracy, rejection_sampling_attempts
from ppl_scaling.models import toy
from ppl_scaling.models.evaluate import ARITHMETIC_CONFIG, load_lm, load_prm
from ppl_scaling.models.harness import log_potential, run_method
from ppl_scaling.models.rewards import ProcessRewardModel
from ppl_scaling.samplers import METHODS
from ppl_scaling.samplers.deep_prune import deep_prune, same_last_step
from ppl_scaling.samplers.rejection_sampling import rejection_sampling
from ppl_scaling.samplers.verifier_scaling import verifier_scaling
from ppl_scaling.samplers.verify_cascade import Cascade, verify_cascade


def exact_checker() -> ProcessRewardModel:
    """The toy task's exact step checker as a verifier (phi = 1 if every step is right, else 0)."""
    return ProcessRewardModel.from_function(
        lambda prompt, steps: [toy.check_steps(prompt, steps[:j + 1]) for j in range(len(steps))], name="exact")


def pool_rates(lm: Any, problems: list, prm: Any, cascade: Cascade, size: int, seed: int) -> dict[str, np.ndarray]:
    """Per problem: p, the share of samples the cascade escalates, and TPR / FPR of the thresholded
    PRM (p > 1/2), of the cascade (_c) and of the exact checker alone (_x), on ``size`` samples."""
    out: dict[str, list[float]] = {k: [] for k in ("p", "tpr", "fpr", "tpr_c", "fpr_c", "tpr_x", "fpr_x", "unsure")}
    log_p = log_potential(prm)
    for i, prob in enumerate(problems):
        run = run_method("self_consistency", lm, prob.prompt, budget=size, rng=np.random.default_rng([seed, 99, i]),
                         config=ARITHMETIC_CONFIG)
        partials = run.result.particles.partials()
        correct = np.array([a == prob.answer for a in run.answers])
        fin = np.ones(len(partials), dtype=bool)
        phi = np.exp(log_p.score(partials, fin))
        accept = phi > 0.5
        accept_c = cascade.score(partials, fin) == 0.0
        accept_x = cascade.expensive.score(partials, fin) > np.log(0.5)
        out["p"].append(correct.mean())
        out["unsure"].append(np.mean((phi > cascade.low) & (phi < cascade.high)))
        for key, acc in (("", accept), ("_c", accept_c), ("_x", accept_x)):   # NaN: undefined (no correct / no wrong sample)
            out["tpr" + key].append(acc[correct].mean() if correct.any() else np.nan)
            out["fpr" + key].append(acc[~correct].mean() if (~correct).any() else np.nan)
    return {k: np.array(v) for k, v in out.items()}


def predicted(rates: dict[str, np.ndarray], k: int, key: str = "") -> float:
    """Mean over problems of the closed form; an undefined rate multiplies p = 0 or 1 - p = 0."""
    tpr, fpr = np.nan_to_num(rates["tpr" + key]), np.nan_to_num(rates["fpr" + key])
    return float(np.mean(rejection_sampling_accuracy(rates["p"], tpr, fpr, k)))


def mean_ci(x: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its normal 95 % interval."""
    x = np.asarray(x, dtype=np.float64)
    return float(x.mean()), float(1.96 * x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--pool", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/seed_b.json")
    args = ap.parse_args()

    problems = toy.load_split("test")[:args.problems]
    lm, prm, exact = load_lm(toy.TOY_LM_PATH, device="cpu"), load_prm(toy.TOY_PRM_PATH, device="cpu"), exact_checker()
    cascade = Cascade(log_potential(prm), exact)
    runs = {  # name: (registered method, budget, reward model)
        "self_consistency": ("self_consistency", 8, None),
        "best_of_n (learned PRM)": ("best_of_n", 8, prm),
        **{f"rejection_sampling k={k} (learned PRM > 0.5)": ("rejection_sampling", k, prm) for k in (1, 2, 4, 8)},
        "rejection_sampling k=8 (exact checker)": ("rejection_sampling", 8, exact),
        "verify_cascade k=8 (learned PRM -> exact)": ("verify_cascade", 8, prm),
        "deep_prune N=8 (toy running-total judge)": ("deep_prune", 8, exact),   # the reward model is ignored
        "deep_prune N=8 (same_last_step judge)": ("deep_prune_same_last_step", 8, exact),
        **{f"verifier_scaling C=8 V={v} (S={8 // (1 + v)})": (f"verifier_scaling_v{v}", 8, prm) for v in (0, 1, 3, 7)},
    }
    # the methods configured as run here (the harness has no options for judge, expensive, verifications)
    METHODS.update({"rejection_sampling": rejection_sampling, "verify_cascade": functools.partial(verify_cascade, expensive=exact),
                    "deep_prune": functools.partial(deep_prune, judge=toy.same_predicted_answer),
                    "deep_prune_same_last_step": functools.partial(deep_prune, judge=same_last_step),
                    **{f"verifier_scaling_v{v}": functools.partial(verifier_scaling, verifications=v) for v in (0, 1, 3, 7)}})
    start = time.perf_counter()
    rows: dict[str, dict[str, list[float]]] = {}
    for label, (name, budget, verifier) in runs.items():
        cols: dict[str, list[float]] = {k: [] for k in ("correct", "tokens", "reward_calls", "escalated", "pruned")}
        for i, prob in enumerate(problems):
            for s in range(args.seeds):
                run = run_method(name, lm, prob.prompt, prm=verifier, budget=budget,
                                 rng=np.random.default_rng([args.seed, s, i]), config=ARITHMETIC_CONFIG)
                answer, ledger, info = run.answer, run.ledger, run.result.info
                cols["correct"].append(float(answer == prob.answer))
                cols["tokens"].append(ledger.tokens)
                cols["reward_calls"].append(ledger.reward_calls)
                cols["escalated"].append(ledger.escalated_calls)
                cols["pruned"].append(info.get("pruned", 0))
        rows[label] = cols
        print(label, {k: round(float(np.mean(v)), 3) for k, v in cols.items()}, flush=True)
    rates = pool_rates(lm, problems, prm, cascade, args.pool, args.seed)
    closed = {f"rejection_sampling k={k} (learned PRM > 0.5)": predicted(rates, k) for k in (1, 2, 4, 8)}
    closed["verify_cascade k=8 (learned PRM -> exact)"] = predicted(rates, 8, "_c")
    closed["rejection_sampling k=8 (exact checker)"] = predicted(rates, 8, "_x")
    attempts = rejection_sampling_attempts(rates["p"], np.nan_to_num(rates["tpr_c"]), np.nan_to_num(rates["fpr_c"]), 8)
    summary = {"problems": args.problems, "seeds": args.seeds, "pool": args.pool, "wall_s": time.perf_counter() - start,
               "rates": {k: float(np.nanmean(v)) for k, v in rates.items()}, "closed_form": closed,
               "ceiling_learned": predicted(rates, 10_000),
               "cascade_escalation_share": float((attempts * rates["unsure"]).sum() / attempts.sum()),
               "per_problem_rates": {k: v.tolist() for k, v in rates.items()},
               "per_run": rows,
               "rows": {label: {k: mean_ci(v) for k, v in cols.items()} for label, cols in rows.items()},
               "paired": {}}
    sc = rows["self_consistency"]
    for label in rows:
        if label.startswith(("deep_prune", "verifier_scaling")):
            summary["paired"][label] = {k: mean_ci(np.subtract(rows[label][k], sc[k])) for k in ("correct", "tokens")}
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({k: summary[k] for k in ("rates", "closed_form", "ceiling_learned", "cascade_escalation_share",
                                              "wall_s")}, indent=1))


if __name__ == "__main__":
    main()
