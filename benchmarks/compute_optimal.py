"""Compute-optimal allocation (Snell et al. 2024) against uniform methods on the toy arithmetic task.

    OMP_NUM_THREADS=1 python benchmarks/compute_optimal.py --val-problems 100 --test-problems 100 \\
        --token-budgets 250,450,800 --out-dir /tmp/compute_optimal

1. every option (method, N) of ``--options`` runs on the first ``--val-problems`` problems of the
   *validation* split (the pilot, self_consistency N=4, among them);
2. ``allocate`` solves a policy (a method and N per pilot-agreement bin) at each mean token budget T
   (generated + reward tokens per problem, the pilot's included), from the validation rows only;
3. ``compute_optimal`` with each policy, and every uniform option, run on the first ``--test-problems``
   problems of the *test* split;
4. per T, compute_optimal is compared with the most accurate uniform option whose mean test tokens are
   at most compute_optimal's (chosen on the test split: the baseline's best case) and with the uniform
   option validation would pick (the most accurate whose mean validation tokens are at most T):
   paired bootstrap 95 % CI over problems and the exact McNemar p (``models.report.compare_methods``).

Each (problem, method, N) run has its own generator (``evaluate.job_rng``); the results files in
``--out-dir`` (one per split, one per policy) make a rerun resume where it stopped.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ppl_scaling.allocation import PILOT, Policy, agreement, allocate, bin_of
from ppl_scaling.models import toy
from ppl_scaling.models.evaluate import arithmetic_task, evaluate, job_rng, load_lm, load_prm, with_config
from ppl_scaling.models.harness import run_method
from ppl_scaling.models.report import Paired, compare_methods

DEFAULT_OPTIONS = ("self_consistency=1,4,16", "best_of_n=4", "weighted_best_of_n=4,16", "particle_filtering=4,16",
                   "beam_search=4,16", "a_star=2,4,8")
Option = tuple[str, int]


def parse_options(specs: list[str]) -> dict[str, list[int]]:
    """``["method=N,N", ...]`` -> {method: [N, ...]}."""
    out: dict[str, list[int]] = {}
    for spec in specs:
        method, _, budgets = spec.partition("=")
        out.setdefault(method.strip(), []).extend(int(b) for b in budgets.split(",") if b.strip())
    return out


def cost(row: dict[str, Any]) -> float:
    """A run's compute: generated plus reward tokens (what ``allocate`` budgets)."""
    return float(row.get("tokens", 0)) + float(row.get("reward_tokens", 0))


def summary(rows: list[dict[str, Any]]) -> dict[Option, tuple[float, float, int]]:
    """(method, N) -> (accuracy, mean tokens, problems) over the graded rows."""
    cells: dict[Option, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if isinstance(r.get("correct"), bool):
            cells[(r["method"], int(r["budget"]))].append(r)
    return {k: (float(np.mean([r["correct"] for r in v])), float(np.mean([cost(r) for r in v])), len(v))
            for k, v in sorted(cells.items())}


def best_within(table: dict[Option, tuple[float, float, int]], limit: float) -> Option | None:
    """The most accurate option whose mean tokens are at most ``limit`` (ties: the cheaper)."""
    fits = [(acc, -tok, opt) for opt, (acc, tok, _) in table.items() if tok <= limit + 1e-9]
    return max(fits)[2] if fits else None


def paired(co_rows: list[dict[str, Any]], uniform_rows: list[dict[str, Any]], option: Option,
           resamples: int, seed: int) -> Paired:
    """compute_optimal against one uniform option on the problems both graded."""
    rows = [{**r, "method": "compute_optimal", "budget": 1} for r in co_rows]
    rows += [{**r, "method": "uniform", "budget": 1} for r in uniform_rows
             if (r["method"], int(r["budget"])) == option]
    (result,) = compare_methods(rows, "compute_optimal", "uniform", resamples=resamples, seed=seed)
    return result


def run_options(task: Any, lm: Any, prm: Any, options: dict[str, list[int]], out: Path, seed: int,
                progress: bool) -> list[dict[str, Any]]:
    """Every (method, N) of ``options`` on ``task`` into ``out`` (resumable); all its rows."""
    rows: list[dict[str, Any]] = []
    for method, budgets in options.items():
        rows = evaluate(task, lm, prm, [method], budgets, out, seed=seed, model_name=str(toy.TOY_LM_PATH),
                        prm_name=str(toy.TOY_PRM_PATH), progress=progress, device="cpu")
    return rows


def pilot_bins(task: Any, lm: Any, policy: Policy, seed: int) -> dict[str, int]:
    """Each problem's agreement bin under ``policy``, replaying the pilot of its compute_optimal run (the
    pilot runs first with the run's generator, ``job_rng``, so it draws the same samples)."""
    bins = {}
    for item in task.items:
        pilot = run_method(policy.pilot[0], lm, item.prompt, budget=policy.pilot[1], config=task.config,
                           rng=job_rng(seed, item.id, "compute_optimal", 1))
        bins[item.id] = bin_of(agreement(pilot.answers, pilot.key), policy.edges)
    return bins


def bin_accuracy(rows: list[dict[str, Any]], bins: dict[str, int], b: int) -> float:
    """Accuracy of ``rows`` on the problems of bin ``b``."""
    return float(np.mean([r["correct"] for r in rows if bins[r["problem_id"]] == b] or [np.nan]))


def bin_lines(t: float, policy: Policy, bins: dict[str, int], co_rows: list[dict[str, Any]],
              test_rows: list[dict[str, Any]], best: Option | None) -> list[str]:
    """Per agreement bin: its validation and test shares, compute_optimal's test accuracy and choice,
    and the test accuracy of the uniform option ``best`` there."""
    best_rows = [r for r in test_rows if (r["method"], int(r["budget"])) == best]
    out = []
    for b, (choice, share) in enumerate(zip(policy.choices, policy.bin_shares)):
        test_share = float(np.mean([v == b for v in bins.values()]))
        out.append(f"| {t:g} | {b} | {share:.2f} | {test_share:.2f} | {bin_accuracy(co_rows, bins, b):.3f} "
                   f"| {fmt_option(choice)} | {fmt_option(best)}: {bin_accuracy(best_rows, bins, b):.3f} |")
    return out


def fmt_option(option: Option | None) -> str:
    return "—" if option is None else f"{option[0]} N={option[1]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--val-problems", type=int, default=100)
    ap.add_argument("--test-problems", type=int, default=100)
    ap.add_argument("--options", nargs="+", default=list(DEFAULT_OPTIONS), metavar="METHOD=N,N",
                    help="the uniform options (method and its budgets); the pilot is added if missing")
    ap.add_argument("--token-budgets", default="250,450,800",
                    help="mean tokens per problem (generated + reward, pilot included) to allocate at")
    ap.add_argument("--bins", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resamples", type=int, default=10_000)
    ap.add_argument("--out-dir", default="/tmp/compute_optimal")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    options = parse_options(args.options)
    if PILOT[1] not in options.get(PILOT[0], []):
        options.setdefault(PILOT[0], []).append(PILOT[1])
    budgets = [float(t) for t in args.token_budgets.split(",")]
    lm, prm = load_lm(toy.TOY_LM_PATH, device="cpu"), load_prm(toy.TOY_PRM_PATH, device="cpu")
    progress = not args.no_progress
    clock: dict[str, float] = {}

    start = time.perf_counter()
    val_rows = run_options(arithmetic_task(args.val_problems, split="validation"), lm, prm, options,
                           out / "validation.jsonl", args.seed, progress)
    clock["validation"] = time.perf_counter() - start
    policies: dict[float, Policy] = {}
    for t in budgets:
        try:
            policies[t] = allocate(val_rows, t, pilot=PILOT, num_bins=args.bins)
        except ValueError as e:
            print(f"T={t:g}: {e}")
            continue
        (out / f"policy_{t:g}.json").write_text(json.dumps(policies[t].to_json(), indent=1) + "\n")

    start = time.perf_counter()
    test_task = arithmetic_task(args.test_problems, split="test")
    test_rows = run_options(test_task, lm, prm, options, out / "test.jsonl", args.seed, progress)
    clock["test_uniform"] = time.perf_counter() - start
    start = time.perf_counter()
    co_rows = {t: evaluate(with_config(test_task, policy=p), lm, prm, ["compute_optimal"], [1],
                           out / f"test_compute_optimal_{t:g}.jsonl", seed=args.seed,
                           model_name=str(toy.TOY_LM_PATH), prm_name=str(toy.TOY_PRM_PATH), progress=progress,
                           device="cpu")
               for t, p in policies.items()}
    clock["test_compute_optimal"] = time.perf_counter() - start

    val_table, test_table = summary(val_rows), summary(test_rows)
    lines = ["| option | validation acc | validation tokens | test acc | test tokens |", "|---|---|---|---|---|"]
    for opt in test_table:
        va, vt, _ = val_table[opt]
        ta, tt, _ = test_table[opt]
        lines.append(f"| {fmt_option(opt)} | {va:.3f} | {vt:.0f} | {ta:.3f} | {tt:.0f} |")
    lines += ["", "| T | policy (bins: low → high agreement; shares on validation) | predicted acc / tokens "
              "(validation) | compute_optimal test acc / tokens | baseline | baseline acc / tokens | CO − baseline "
              "[95 % CI] | CO only / baseline only | McNemar p |", "|---|---|---|---|---|---|---|---|---|"]
    report: dict[str, Any] = {"options": options, "validation": {fmt_option(k): v for k, v in val_table.items()},
                              "test": {fmt_option(k): v for k, v in test_table.items()}, "budgets": {},
                              "wall_s": clock}
    for t, policy in policies.items():
        co = [r for r in co_rows[t] if isinstance(r.get("correct"), bool)]
        co_acc, co_tok = float(np.mean([r["correct"] for r in co])), float(np.mean([cost(r) for r in co]))
        choices = ", ".join(f"{fmt_option(c)} ({s:.0%})" for c, s in zip(policy.choices, policy.bin_shares))
        edges = ", ".join(f"{e:g}" for e in policy.edges)
        entry: dict[str, Any] = {"policy": policy.to_json(), "compute_optimal": (co_acc, co_tok)}
        for label, option in (("best uniform at ≤ CO test tokens (picked on test)", best_within(test_table, co_tok)),
                              ("validation's pick at ≤ T", best_within(val_table, t))):
            if option is None:
                lines.append(f"| {t:g} | {choices} | | {co_acc:.3f} / {co_tok:.0f} | {label}: none fits | | | | |")
                continue
            pr = paired(co, test_rows, option, args.resamples, args.seed)
            ua, ut, _ = test_table[option]
            lines.append(f"| {t:g} | {choices}; edges [{edges}] | {policy.expected_accuracy:.3f} / "
                         f"{policy.expected_tokens:.0f} | {co_acc:.3f} / {co_tok:.0f} | {label}: {fmt_option(option)} "
                         f"| {ua:.3f} / {ut:.0f} | {pr.diff:+.3f} [{pr.ci[0]:+.3f}, {pr.ci[1]:+.3f}] | "
                         f"{pr.only_a} / {pr.only_b} | {pr.p_value:.3g} |")
            entry[label] = {"option": fmt_option(option), "acc": ua, "tokens": ut, "diff": pr.diff, "ci": pr.ci,
                            "only_co": pr.only_a, "only_baseline": pr.only_b, "p": pr.p_value, "n": pr.n}
        report["budgets"][f"{t:g}"] = entry
    lines += ["", "| T | bin | validation share | test share | compute_optimal test acc | its choice | test acc of "
              "the best uniform at ≤ CO tokens |", "|---|---|---|---|---|---|---|"]
    bins_by_edges: dict[tuple[float, ...], dict[str, int]] = {}   # the policies share their edges: one replay
    for t, policy in policies.items():
        if policy.edges not in bins_by_edges:
            bins_by_edges[policy.edges] = pilot_bins(test_task, lm, policy, args.seed)
        best = best_within(test_table, report["budgets"][f"{t:g}"]["compute_optimal"][1])
        lines += bin_lines(t, policy, bins_by_edges[policy.edges], co_rows[t], test_rows, best)
    (out / "summary.json").write_text(json.dumps(report, indent=1) + "\n")
    print("\n".join(lines))
    print("wall s:", {k: round(v) for k, v in clock.items()})


if __name__ == "__main__":
    main()
