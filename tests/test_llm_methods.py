"""The methods registry on the bundled toy task (toy LM; a random classifier PRM loaded
by path, and the exact step checker): every method runs with the same record, spends a
comparable budget, selects its answer as documented; errors."""
from __future__ import annotations

import numpy as np
import pytest

from ppl_scaling import aggregate
from ppl_scaling.models import toy
from ppl_scaling.models.evaluate import ARITHMETIC_CONFIG
from ppl_scaling.models.methods import METHODS, NEEDS_PRM, run_method
from llm_fixtures import exact_prm, random_prm, toy_lm

PROBLEM = toy.load_split("test")[3]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_returns_the_uniform_record(method):
    prm = random_prm()
    out = run_method(method, toy_lm(), PROBLEM.prompt, prm=prm, budget=12, rng=np.random.default_rng(0),
                     config=ARITHMETIC_CONFIG)
    n = len(out.answers)
    assert n == len(out.completions) == len(out.log_weights) and 2 <= n <= 12
    assert out.answer is None or out.answer in out.answers
    c = out.compute
    assert c["tokens"] > 0 and c["forward_passes"] > 0 and c["wall_s"] > 0
    assert (c["reward_calls"] > 0) == (method in NEEDS_PRM)
    assert (out.scores is None) == (method not in NEEDS_PRM)
    if out.scores is not None:  # final PRM scores are log-probabilities
        assert np.all(out.scores <= 0)
    # budget N is comparable: at most ~N generations' worth of tokens (12 chars per step, 8 steps)
    assert c["tokens"] <= 12 * 12 * 8
    rerun = run_method(method, toy_lm(), PROBLEM.prompt, prm=prm, budget=12, rng=np.random.default_rng(0),
                       config=ARITHMETIC_CONFIG)
    assert rerun.completions == out.completions and rerun.answer == out.answer  # seeded = reproducible


def test_selection_rules_of_the_sampling_baselines():
    lm, prm = toy_lm(), random_prm()
    outs = {m: run_method(m, lm, PROBLEM.prompt, prm=prm, budget=16, rng=np.random.default_rng(1),
                          config=ARITHMETIC_CONFIG)
            for m in ("best_of_n", "weighted_best_of_n", "self_consistency")}
    assert outs["best_of_n"].completions == outs["self_consistency"].completions  # same samples, same seed
    bon, wbon, sc = outs["best_of_n"], outs["weighted_best_of_n"], outs["self_consistency"]
    assert bon.answer == aggregate.argmax_weight(bon.answers, bon.scores)
    assert wbon.answer == aggregate.weighted_majority(wbon.answers, wbon.scores)
    assert sc.answer == aggregate.majority_vote(sc.answers)
    assert sc.compute["reward_calls"] == 0 and bon.compute["reward_calls"] == 16


def test_particle_filtering_with_the_exact_checker_solves_the_problems():
    """With a perfect PRM, PF (N=8) solves almost every problem; one sample solves ~40%."""
    lm, prm = toy_lm(), exact_prm()
    problems = toy.load_split("test")[:8]
    pf = [run_method("particle_filtering", lm, p.prompt, prm=prm, budget=8, rng=np.random.default_rng(i),
                     config=ARITHMETIC_CONFIG).answer == p.answer for i, p in enumerate(problems)]
    assert sum(pf) >= 7, pf


def test_a_selection_suffix_changes_only_the_final_pick():
    lm, prm = toy_lm(), random_prm()
    a = run_method("particle_filtering", lm, PROBLEM.prompt, prm=prm, budget=8, rng=np.random.default_rng(3),
                   config=ARITHMETIC_CONFIG)
    b = run_method("particle_filtering:majority_vote", lm, PROBLEM.prompt, prm=prm, budget=8,
                   rng=np.random.default_rng(3), config=ARITHMETIC_CONFIG)
    assert b.completions == a.completions and b.method == "particle_filtering:majority_vote"
    assert b.answer == aggregate.majority_vote(b.answers)
    with pytest.raises(ValueError, match="unknown selection"):
        run_method("particle_filtering:best", lm, PROBLEM.prompt, prm=prm, budget=2, rng=np.random.default_rng(0))


def test_bad_requests_are_refused():
    lm = toy_lm()
    with pytest.raises(ValueError, match="unknown method"):
        run_method("mcts", lm, PROBLEM.prompt, prm=random_prm(), budget=4, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="needs a reward model"):
        run_method("best_of_n", lm, PROBLEM.prompt, budget=4, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="budget"):
        run_method("self_consistency", lm, PROBLEM.prompt, budget=0, rng=np.random.default_rng(0))
    with pytest.raises(TypeError, match="ProcessRewardModel"):
        run_method("particle_filtering", lm, PROBLEM.prompt, prm=lambda xs: np.zeros(len(xs)), budget=4,
                   rng=np.random.default_rng(0), config=ARITHMETIC_CONFIG)
