"""Compute-optimal allocation: the knapsack solver equals brute force; the policy follows the pilot's
agreement; `compute_optimal` runs the pilot then the chosen method and counts both."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from ppl_scaling.allocation import Option, Policy, agreement, allocate, bin_edges, bin_of, brute_force, solve
from ppl_scaling.cli import main
from ppl_scaling.models.evaluate import ARITHMETIC_CONFIG, arithmetic_task
from ppl_scaling.models.harness import run_method

from llm_fixtures import exact_prm, toy_lm


def random_table(rng, bins, per_bin):
    return [[Option(f"m{j}", int(rng.integers(1, 64)), float(rng.random()), float(rng.gamma(2.0, 50.0)))
             for j in range(per_bin)] for _ in range(bins)]


def test_solve_equals_brute_force_on_random_tables():
    rng = np.random.default_rng(0)
    feasible = 0
    for _ in range(300):
        bins, per_bin = int(rng.integers(1, 5)), int(rng.integers(1, 6))
        table = random_table(rng, bins, per_bin)
        w = rng.dirichlet(np.ones(bins))
        budget, fixed = float(rng.uniform(20, 200)), float(rng.uniform(0, 30))
        a, b = solve(table, w, budget, fixed), brute_force(table, w, budget, fixed)
        assert (a is None) == (b is None)
        if a is not None:
            feasible += 1
            assert a[1] == pytest.approx(b[1], abs=1e-12) and a[2] <= budget + 1e-9
            assert a[2] == pytest.approx(fixed + sum(wi * o.tokens for wi, o in zip(w, a[0])))
    assert feasible > 100


def test_bins_and_agreement():
    assert agreement(["1", "1", None, "2"]) == 0.5 and agreement([None, None]) == 0.0 and agreement([]) == 0.0
    assert agreement([1, 1.0, 2], key=int) == pytest.approx(2 / 3)
    signals = [0.25] * 5 + [0.5] * 3 + [1.0] * 12
    edges = bin_edges(signals, 3)
    counts = np.bincount([bin_of(s, edges) for s in signals])
    assert len(counts) == len(edges) + 1 and (counts > 0).all()           # no empty bin
    assert bin_edges([1.0] * 10, 3) == []                                  # one value: one bin


def rows_for(problems, method, budget, correct, tokens, agreement_of=None):
    return [{"problem_id": p, "method": method, "budget": budget, "correct": bool(correct(i)),
             "tokens": tokens, "reward_tokens": 0, "agreement": None if agreement_of is None else agreement_of(i)}
            for i, p in enumerate(problems)]


def test_allocate_spends_where_it_pays():
    """Easy problems (pilot agreement 1) are solved by the pilot itself; hard ones need the big
    method; at a budget that cannot pay the big method everywhere, it goes to the hard bin."""
    problems = [f"p{i}" for i in range(20)]
    easy = lambda i: i < 10                                               # noqa: E731
    rows = (rows_for(problems, "self_consistency", 4, easy, 40, lambda i: 1.0 if easy(i) else 0.5)
            + rows_for(problems, "particle_filtering", 16, lambda i: True, 300)
            + rows_for(problems, "best_of_n", 4, easy, 60))
    policy = allocate(rows, token_budget=40 + 150 + 1e-6, num_bins=2)
    assert policy.choice(1.0) == ("self_consistency", 4) and policy.choice(0.5) == ("particle_filtering", 16)
    assert policy.expected_accuracy == pytest.approx(1.0) and policy.expected_tokens == pytest.approx(190)
    cheap = allocate(rows, token_budget=41, num_bins=2)
    assert cheap.expected_accuracy == pytest.approx(0.5) and cheap.expected_tokens <= 41
    with pytest.raises(ValueError, match="no allocation fits"):
        allocate(rows, token_budget=10, num_bins=2)
    with pytest.raises(ValueError, match="no graded rows of the pilot"):
        allocate(rows, token_budget=500, pilot=("self_consistency", 8))
    assert Policy.from_json(json.loads(json.dumps(policy.to_json()))) == policy


def test_compute_optimal_runs_the_pilot_then_the_chosen_method(tmp_path):
    lm, prm = toy_lm(), exact_prm()
    item = arithmetic_task(1).items[0]
    always_pf = Policy(("self_consistency", 2), (), (("particle_filtering", 4),), 1e9, 0.0, 0.0)
    config = replace(ARITHMETIC_CONFIG, policy=always_pf)
    run = run_method("compute_optimal", lm, item.prompt, prm=prm, budget=1, rng=np.random.default_rng(0),
                     config=config)
    info = run.result.info["compute_optimal"]
    assert info["method"] == "particle_filtering" and info["budget"] == 4 and len(run.answers) == 4
    rng = np.random.default_rng(0)       # the same generator: the pilot, then the filter
    pilot = run_method("self_consistency", lm, item.prompt, budget=2, rng=rng, config=ARITHMETIC_CONFIG)
    pf = run_method("particle_filtering", lm, item.prompt, prm=prm, budget=4, rng=rng, config=ARITHMETIC_CONFIG)
    assert run.completions == pf.completions and run.answer == pf.answer
    assert run.ledger.tokens == pilot.ledger.tokens + pf.ledger.tokens
    only_pilot = replace(ARITHMETIC_CONFIG, policy=replace(always_pf, choices=(("self_consistency", 2),)))
    again = run_method("compute_optimal", lm, item.prompt, prm=prm, budget=1, rng=np.random.default_rng(0),
                       config=only_pilot)
    assert again.completions == pilot.completions and again.ledger.tokens == pilot.ledger.tokens
    with pytest.raises(ValueError, match="needs a policy"):
        run_method("compute_optimal", lm, item.prompt, prm=prm, budget=1, rng=np.random.default_rng(0),
                   config=ARITHMETIC_CONFIG)


def test_allocate_and_eval_from_the_command_line(tmp_path, capsys):
    val, policy, test = tmp_path / "val.jsonl", tmp_path / "policy.json", tmp_path / "test.jsonl"
    assert main(["eval", "--split", "validation", "--problems", "6", "--methods",
                 "self_consistency,particle_filtering", "--budgets", "2,4", "--out", str(val), "--no-progress"]) == 0
    assert main(["allocate", str(val), "--token-budget", "1000", "--pilot", "self_consistency:2", "--bins", "2",
                 "--out", str(policy)]) == 0
    assert "expected accuracy" in capsys.readouterr().out
    assert main(["eval", "--problems", "3", "--methods", "compute_optimal", "--budgets", "1", "--policy", str(policy),
                 "--out", str(test), "--no-progress"]) == 0
    header, *rows = [json.loads(line) for line in test.read_text().splitlines()]
    assert len(rows) == 3 and header["settings"]["policy"]["pilot"] == ["self_consistency", 2]
    assert main(["allocate", str(val), "--token-budget", "1", "--out", str(policy)]) == 2


def test_compute_optimal_runs_the_chosen_method_with_the_tasks_options():
    """The chosen method runs as the harness would run it: store_history only where taken
    (a_star, deep_prune keep none), the task's expensive verifier for verify_cascade, its
    judge for deep_prune."""
    lm, prm = toy_lm(), exact_prm()
    item = arithmetic_task(1).items[0]
    for method in ("a_star", "deep_prune", "verify_cascade"):
        policy = Policy(("self_consistency", 2), (), ((method, 2),), 1e9, 0.0, 0.0)
        run = run_method("compute_optimal", lm, item.prompt, prm=prm, budget=1, rng=np.random.default_rng(0),
                         config=replace(ARITHMETIC_CONFIG, policy=policy, store_history=True))
        assert run.result.info["compute_optimal"]["method"] == method
        if method == "verify_cascade":
            assert run.result.info["method"] == "compute_optimal" and run.ledger.reward_calls >= 1
