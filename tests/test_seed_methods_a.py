"""Methods from the seed papers (a): ``rpc``, ``first_finish``, ``multi_temperature``, ``a_star``.

Exact tests on the enumerable bigram LM of test_step_model (one token per step, at most T
steps), each against a law computed by enumeration; Monte Carlo checks over R independent runs
(fixed seeds) with a tolerance of 4.5 standard errors estimated from the runs (binomial
sqrt(pi (1 - pi) / R) for frequencies), as in test_step_model:

- rpc: the Perplexity Consistency score of an answer a from N draws of q has expectation
  Σ_{x -> a} p(x) (1 - (1 - q(x))^N) (distinct paths count once); the rule on a hand-made
  candidate set (duplicates, pruning) is checked value by value;
- first_finish: the winner is distributed as the shortest of n i.i.d. generations, ties broken
  uniformly: P(winner = x) = q(x | L = l) (S(l)^n - S(l + 1)^n), S(l) = P(L >= l);
- multi_temperature: with the balance heuristic, E[mean w] = 1 and
  E[(1 / N) Σ_i w_i 1{x_i = s}] = p(s); the vote within and across temperatures, by hand;
- a_star: uniform-cost search (h = 0) returns the enumerated most probable path; with the exact
  cost-to-go as heuristic it expands only that path's prefixes.

Then every method runs through ``run_method`` on the toy task (toy LM, random PRM), tiny budget.
"""
from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch

from ppl_scaling import aggregate
from ppl_scaling.models import toy
from ppl_scaling.models.evaluate import ARITHMETIC_CONFIG
from ppl_scaling.models.harness import run_method
from ppl_scaling.models.step import StepModel
from ppl_scaling.potentials import Potential
from ppl_scaling.samplers import METHODS, a_star, first_finish, multi_temperature, rpc
from ppl_scaling.samplers.multi_temperature import path_log_probs, split_budget
from test_step_model import BIGRAM, CHARS, BigramLM, exact_posterior
from llm_fixtures import random_prm, toy_lm

Z_MAX = 4.5


def tempered(table, temperature):
    q = table ** (1.0 / temperature)
    return q / q.sum(1, keepdims=True)


def generations(table, T):
    """Every generation of at most T one-token steps: {steps: (token ids, probability under table)}."""
    out = {}
    for k in range(1, T + 1):
        for toks in itertools.product([1, 2, 3], repeat=k):
            if 3 in toks[:-1] or (k < T and toks[-1] != 3):
                continue
            prob, prev = 1.0, 0
            for t in toks:
                prob, prev = prob * table[prev, t], t
            out[tuple(CHARS[t] if t != 3 else "" for t in toks)] = (toks, prob)
    return out


def bigram_model(T, temperature=1.0, lm=None):
    return StepModel(lm or BigramLM(), "^", step_delimiter=None, max_steps=T, temperature=temperature)


def count_a(completion):
    return str(completion.count("a"))


# -- rpc ---------------------------------------------------------------------------------

def test_perplexity_consistency_and_reasoning_pruning_on_a_hand_made_set():
    """Answer 7 has one path drawn three times, 5 one path, 3 six unlikely paths: the vote picks 3,
    Perplexity Consistency (p of distinct paths) 3 by 0.345 to 0.30, RPC prunes the six unlikely
    paths (low Weibull component, below the mean 0.1495) and picks 7."""
    p = np.array([0.30, 0.30, 0.30, 0.25, 0.07, 0.065, 0.06, 0.055, 0.05, 0.045])
    answers = ["7", "7", "7", "5", "3", "3", "3", "3", "3", "3"]
    paths = ["A", "A", "A", "B", "C", "D", "E", "F", "G", "H"]
    lp = np.log(p)
    scores = aggregate.perplexity_consistency_scores(answers, lp, paths)
    assert scores == pytest.approx({"7": 0.30, "5": 0.25, "3": 0.345})   # duplicates of A count once
    keep = aggregate.reasoning_pruning(lp)
    np.testing.assert_array_equal(keep, [True] * 4 + [False] * 6)
    np.testing.assert_array_equal(aggregate.reasoning_pruning(lp - 30.0), keep)   # scale-free
    assert aggregate.perplexity_consistency_scores(answers, lp, paths, prune=True) == pytest.approx(
        {"7": 0.30, "5": 0.25})
    assert aggregate.majority_vote(answers) == "3"
    assert aggregate.perplexity_consistency(answers, lp, paths) == "3"
    assert aggregate.rpc(answers, lp, paths) == "7"
    # a path without an answer scores nothing; too few paths are never pruned
    assert aggregate.perplexity_consistency([None, "1"], np.log([0.9, 0.1]), ["A", "B"]) == "1"
    assert aggregate.reasoning_pruning(np.log([0.9, 0.01])).all()


def test_rpc_scores_match_their_enumerated_expectation():
    """N = 6 draws at temperature 0.7 (q != p), T = 3, answers = the number of a's: over R runs the
    mean Perplexity Consistency score of every answer is Σ_{x -> a} p(x) (1 - (1 - q(x))^N)."""
    T, N, R, tau = 3, 6, 400, 0.7
    gens_p, gens_q = generations(BIGRAM, T), generations(tempered(BIGRAM, tau), T)
    answers = sorted({count_a("".join(s)) for s in gens_p})
    exact = {a: sum(p * (1 - (1 - gens_q[s][1]) ** N) for s, (_, p) in gens_p.items() if count_a("".join(s)) == a)
             for a in answers}
    model, rng = bigram_model(T, tau), np.random.default_rng(0)
    got = np.zeros((R, len(answers)))
    for r in range(R):
        res = rpc(model, N, rng=rng)
        x = res.particles
        ans = [count_a(c) for c in x.completions()]
        scores = aggregate.perplexity_consistency_scores(ans, x.log_p, x.token_ids)
        got[r] = [scores.get(a, 0.0) for a in answers]
        if r < 20:   # the method's own rule is RPC on these candidates
            assert res.info["selection_rule"] == "rpc"
            assert res.select(ans) == aggregate.rpc(ans, x.log_p, x.token_ids)
            assert res.select(ans, "perplexity_consistency") == aggregate.perplexity_consistency(
                ans, x.log_p, x.token_ids)
    se = got.std(0, ddof=1) / np.sqrt(R)
    z = (got.mean(0) - np.array([exact[a] for a in answers])) / se
    assert np.abs(z).max() < Z_MAX, (z, exact)


def test_path_rules_need_path_log_probabilities():
    res = replace(first_finish(bigram_model(2), 3, seed=0), particles=np.zeros(3))
    with pytest.raises(ValueError, match="log_p"):
        res.select(["1", "2", "3"], "rpc")


# -- first_finish --------------------------------------------------------------------------

def test_first_finish_is_the_shortest_of_n_draws_and_stops_the_others():
    """n = 3, T = 4, temperature 1: the winner's law is P(winner = x) = q(x | L = l) (S(l)^n - S(l+1)^n);
    the run stops at the first finish (every particle has as many tokens as the winner, the ledger
    counts exactly those); the winner is the first finished particle (the tie rule)."""
    T, n, R = 4, 3, 1500
    gens = generations(BIGRAM, T)
    length = {s: len(toks) for s, (toks, _) in gens.items()}
    mass = {l: sum(p for s, (_, p) in gens.items() if length[s] == l) for l in range(1, T + 2)}
    S = {l: sum(mass[m] for m in range(l, T + 2)) for l in range(1, T + 2)}
    law = {s: p / mass[length[s]] * (S[length[s]] ** n - S[length[s] + 1] ** n) for s, (_, p) in gens.items()}
    assert sum(law.values()) == pytest.approx(1.0)
    model, rng = bigram_model(T), np.random.default_rng(1)
    wins: dict = {}
    ties = 0
    for _ in range(R):
        res = first_finish(model, n, rng=rng)
        x = res.particles
        done = np.flatnonzero(x.finished)
        assert res.best_index == done[0] and res.info["selection_rule"] == "argmax_weight"
        win = x.steps[res.best_index]
        assert np.all(x.num_tokens == length[win]) and res.ledger.tokens == n * length[win]
        ties += done.size > 1
        wins[win] = wins.get(win, 0) + 1
    assert ties > 100, "ties should be frequent enough to test the tie rule"
    for s, pi in law.items():
        if pi > 0.01:
            se = np.sqrt(pi * (1 - pi) / R)
            assert abs(wins.get(s, 0) / R - pi) < Z_MAX * se, (s, wins.get(s, 0) / R, pi)


# -- multi_temperature -------------------------------------------------------------------

def test_group_vote_votes_within_then_across_groups():
    """Pooled, 5 has 6 votes to 7's 4; by temperature, 5 wins one group and 7 two."""
    answers = ["5", "5", "5", "5", "7", "7", "5", "7", "7", "5"]
    groups = [0.6] * 4 + [1.0] * 3 + [1.2] * 3
    assert aggregate.majority_vote(answers) == "5" and aggregate.group_vote(answers, groups) == "7"
    # one win each for 1, 2, 3: the most samples overall (1 and 2: three), then the first position
    assert aggregate.group_vote(["2", "1", "1", "2", "2", "1", "3", "3"], [0] * 3 + [1] * 3 + [2] * 2) == "2"
    assert aggregate.group_vote([None, None], [0, 1]) is None


def test_split_budget():
    assert split_budget(10, 4) == [3, 3, 2, 2] and split_budget(2, 4) == [1, 1, 0, 0]


def test_multi_temperature_balance_heuristic_targets_the_model():
    """Temperatures (0.5, 1.0, 2.0), N = 5 (2, 2, 1 samples), T = 3: E[mean w] = 1 and the weighted
    frequency of every likely generation is p(s); the re-scored log q of each sample at the
    temperature that drew it is the one recorded while sampling."""
    T, N, R, temps = 3, 5, 400, (0.5, 1.0, 2.0)
    post, _ = exact_posterior(T, 1.0, "model", 0.0)   # p(s), Z = 1
    keys = {s: i for i, s in enumerate(post)}
    model, rng = bigram_model(T), np.random.default_rng(2)
    ratio, mass = np.zeros(R), np.zeros((R, len(keys)))
    for r in range(R):
        res = multi_temperature(model, N, temperatures=temps, rng=rng)
        w = np.exp(res.log_weights)
        ratio[r] = w.mean()
        assert np.log(ratio[r]) == pytest.approx(res.log_evidence)
        for wi, s in zip(w, res.particles.steps):
            mass[r, keys[s]] += wi / N
        if r < 5:
            x, drawn = res.particles, res.info["groups"]
            np.testing.assert_array_equal(drawn, [0.5, 0.5, 1.0, 1.0, 2.0])
            _, log_q = path_log_probs(model, x.token_ids, temps)
            own = log_q[[temps.index(t) for t in drawn], np.arange(N)]
            np.testing.assert_allclose(own, x.log_q, atol=1e-5)
            assert res.ledger.tokens == x.num_tokens.sum() and res.ledger.forward_passes > 0
            ans = x.completions()
            assert res.select(ans) == aggregate.weighted_majority(ans, res.log_weights)   # the default rule
            assert res.select(ans, "group_vote") == aggregate.group_vote(ans, drawn)
    se = ratio.std(ddof=1) / np.sqrt(R)
    assert abs(ratio.mean() - 1.0) < Z_MAX * se, (ratio.mean(), se)
    pi = np.array(list(post.values()))
    big = pi > 0.01
    z = (mass.mean(0)[big] - pi[big]) / (mass.std(0, ddof=1)[big] / np.sqrt(R))
    assert np.abs(z).max() < Z_MAX, z


# -- a_star --------------------------------------------------------------------------------

PEAKED = np.array([[0.0, 0.6, 0.35, 0.05],    # BOS -> a
                   [0.0, 0.1, 0.85, 0.05],    # a -> b
                   [0.0, 0.3, 0.3, 0.4],      # b -> EOS
                   [0.25, 0.25, 0.25, 0.25]])


class PeakedLM(BigramLM):
    """A bigram LM whose most probable generation is "ab" (0.204), where uniform-cost search also
    expands the prefix "b" (0.35) before reaching it."""

    def next_token_logprobs(self, contexts):
        return torch.log(torch.as_tensor(PEAKED[[c[-1] for c in contexts]]))


class CostToGo(Potential):
    """The exact heuristic of -log p: prefix(y) = log max_z p(z) - log p(y) over the complete
    generations z that extend y (at most T steps), complete = 0."""

    def __init__(self, T):
        self.gens = generations(PEAKED, T)

    def prefix(self, partials):
        return np.array([np.log(max(p for s, (_, p) in self.gens.items() if s[:len(y)] == y and len(s) > len(y)))
                         - np.log(self._prob(y)) for y in (part.steps for part in partials)])

    def _prob(self, y):
        prob, prev = 1.0, 0
        for ch in y:
            t = CHARS.index(ch)
            prob, prev = prob * PEAKED[prev, t], t
        return prob

    def complete(self, partials):
        return np.zeros(len(partials))


def test_a_star_returns_the_most_probable_generation():
    """h = 0 (admissible): uniform-cost search returns the enumerated mode "ab" after expanding the
    root, "a", "ab" and "b"; the exact cost-to-go as heuristic expands only the mode's prefixes."""
    T = 4
    gens = generations(PEAKED, T)
    best = max(gens, key=lambda s: gens[s][1])
    assert best == ("a", "b", "")
    model = bigram_model(T, lm=PeakedLM())
    res = a_star(model, 256, num_children=64, seed=3)   # up to 16 expansions; 64 draws: every child appears
    assert res.info["goal_found"] and res.particles.steps[0] == best
    assert res.log_weights[0] == pytest.approx(np.log(gens[best][1]), abs=1e-5)
    assert res.info["expansions"] == 4 and res.rewards is None
    guided = a_star(model, 256, potential=CostToGo(T), num_children=64, seed=3)
    assert guided.particles.steps[0] == best and guided.info["expansions"] == len(best) == 3
    assert guided.rewards is not None and guided.ledger.reward_calls > 0


def test_a_star_budget_spent_without_a_goal():
    """One expansion (the root: "a", "b" unfinished, "" finished): no goal was popped, and the
    cheapest finished node, "", is returned although "a" is cheaper."""
    res = a_star(bigram_model(4, lm=PeakedLM()), 1, num_children=64, max_expansions=1, seed=0)
    assert not res.info["goal_found"] and res.info["expansions"] == 1
    assert res.particles.steps[0] == ("",) and res.done[0]
    with pytest.raises(ValueError, match="num_children"):
        a_star(bigram_model(2), 4, num_children=0)


# -- through the harness -------------------------------------------------------------------

PROBLEM = toy.load_split("test")[3]
NEW = ("rpc", "first_finish", "multi_temperature", "a_star")


@pytest.mark.parametrize("method", NEW)
def test_the_methods_run_by_name_on_the_toy_task(method):
    assert method in METHODS
    run = run_method(method, toy_lm(), PROBLEM.prompt, prm=random_prm(), budget=4, rng=np.random.default_rng(0),
                     config=ARITHMETIC_CONFIG)
    res = run.result
    assert run.answers == [toy.extract_answer(c) for c in run.completions]
    assert run.answer == run.select() and res.info["method"] == method
    assert res.ledger.tokens > 0 and res.ledger.wall_s > 0
    rerun = run_method(method, toy_lm(), PROBLEM.prompt, prm=random_prm(), budget=4, rng=np.random.default_rng(0),
                       config=ARITHMETIC_CONFIG)
    assert rerun.completions == run.completions and rerun.answer == run.answer
    if method == "first_finish":   # the same first steps as self-consistency, then stopped
        sc = run_method("self_consistency", toy_lm(), PROBLEM.prompt, budget=4, rng=np.random.default_rng(0),
                        config=ARITHMETIC_CONFIG)
        assert res.ledger.tokens == res.particles.num_tokens.sum() <= sc.ledger.tokens
        lengths = res.particles.num_tokens[res.done]   # the winner: the fewest tokens of the first to finish
        assert res.particles.num_tokens[res.best_index] == lengths.min()
    if method == "rpc":   # a rule over any LLM method's candidates
        bon = run_method("best_of_n:rpc", toy_lm(), PROBLEM.prompt, prm=random_prm(), budget=4,
                         rng=np.random.default_rng(0), config=ARITHMETIC_CONFIG)
        assert bon.completions == run.completions and bon.answer == run.answer
