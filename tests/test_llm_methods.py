"""Every method of ``ppl_scaling.samplers.METHODS`` run by name on the bundled toy task
(toy LM; a random classifier PRM loaded by path, and the exact step checker) through the
evaluation harness: one SMCResult each, a comparable budget, the documented answer rule,
the compute ledger; errors."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from ppl_scaling import aggregate
from ppl_scaling.models import toy
from ppl_scaling.models.evaluate import ARITHMETIC_CONFIG
from ppl_scaling.models.harness import MethodConfig, method_options, needs_reward, run_method
from ppl_scaling.samplers import METHODS
from llm_fixtures import exact_prm, random_prm, toy_lm

PROBLEM = toy.load_split("test")[3]
SAMPLING = ("best_of_n", "weighted_best_of_n", "self_consistency", "best_of_majority")
EVAL_METHODS = ("particle_filtering", "particle_filtering_adaptive", "particle_gibbs", "parallel_tempering",
                "best_of_n", "weighted_best_of_n", "self_consistency", "best_of_majority", "beam_search", "dvts")


def test_the_eval_method_names_are_registered():
    assert set(EVAL_METHODS) <= set(METHODS)
    assert [m for m in EVAL_METHODS if not needs_reward(m)] == ["self_consistency"]


@pytest.mark.parametrize("method", EVAL_METHODS)
def test_every_method_returns_an_smc_result_with_its_ledger(method):
    prm = random_prm()
    run = run_method(method, toy_lm(), PROBLEM.prompt, prm=prm, budget=12, rng=np.random.default_rng(0),
                     config=ARITHMETIC_CONFIG)
    res, n = run.result, len(run.answers)
    assert n == len(run.completions) == res.num_particles and 2 <= n <= 12
    assert run.completions == res.particles.completions()
    assert run.answers == [toy.extract_answer(c) for c in run.completions]
    if any(a is not None for a in run.answers):
        assert run.answer is not None and run.answer in run.answers
    else:
        assert run.answer is None
    assert run.answer == run.select()   # the method's own rule
    spent = run.ledger
    if method in SAMPLING:  # independent samples: the ledger holds exactly their tokens
        assert spent.tokens == res.particles.num_tokens.sum()
    assert spent.tokens > 0 and spent.forward_passes > 0 and spent.wall_s > 0
    assert (spent.reward_calls > 0) == needs_reward(method)
    assert (res.rewards is None) == (not needs_reward(method))
    if res.rewards is not None:  # final PRM scores are log-probabilities
        assert res.rewards.shape == (n,) and np.all(res.rewards <= 0)
    # budget N is comparable: at most ~N generations' worth of tokens (12 chars per step, 8 steps)
    assert spent.tokens <= 12 * 12 * 8
    rerun = run_method(method, toy_lm(), PROBLEM.prompt, prm=prm, budget=12, rng=np.random.default_rng(0),
                       config=ARITHMETIC_CONFIG)
    assert rerun.completions == run.completions and rerun.answer == run.answer  # seeded = reproducible
    assert rerun.ledger.tokens == spent.tokens and rerun.ledger.reward_calls == spent.reward_calls


def test_selection_rules_of_the_sampling_baselines():
    lm, prm = toy_lm(), random_prm()
    runs = {m: run_method(m, lm, PROBLEM.prompt, prm=prm, budget=16, rng=np.random.default_rng(1),
                          config=ARITHMETIC_CONFIG)
            for m in ("best_of_n", "weighted_best_of_n", "self_consistency")}
    assert runs["best_of_n"].completions == runs["self_consistency"].completions  # same samples, same seed
    bon, wbon, sc = runs["best_of_n"], runs["weighted_best_of_n"], runs["self_consistency"]
    scores = bon.result.rewards
    np.testing.assert_allclose(bon.result.log_weights, scores)   # weights = the final PRM score p
    assert bon.answer == aggregate.argmax_weight(bon.answers, scores)
    assert wbon.answer == aggregate.weighted_majority(wbon.answers, scores, key=int)
    assert sc.answer == aggregate.majority_vote(sc.answers, key=int)
    assert sc.ledger.reward_calls == 0 and bon.ledger.reward_calls == 16
    assert len(set(bon.answers) - {None}) >= 2, "the selection rules should have answers to choose from"
    bom = run_method("best_of_majority", lm, PROBLEM.prompt, prm=prm, budget=16, rng=np.random.default_rng(1),
                     config=ARITHMETIC_CONFIG)
    assert bom.completions == bon.completions and bom.result.info["selection_rule"] == "best_of_majority"
    np.testing.assert_allclose(bom.result.rewards, scores)   # N samples, the PRM's final reward
    assert bom.answer == aggregate.best_of_majority(bom.answers, scores, 0.2, key=int)
    assert bom.result.select(bom.answers, k=3, key=int) == aggregate.top_k("best_of_majority", bom.answers, scores, 3,
                                                                          key=int)


def test_particle_filtering_with_the_exact_checker_solves_the_problems():
    """With a perfect PRM, PF (N=8) solves almost every problem; one sample solves ~40%."""
    lm, prm = toy_lm(), exact_prm()
    problems = toy.load_split("test")[:8]
    pf = [run_method("particle_filtering", lm, p.prompt, prm=prm, budget=8, rng=np.random.default_rng(i),
                     config=ARITHMETIC_CONFIG).answer == p.answer for i, p in enumerate(problems)]
    assert sum(pf) >= 7, pf


def test_the_presets_read_the_prm_as_they_need():
    """PF paper: the PRM re-read as logit p (rewards of the run), answer by the highest final
    score; the harness reports the final scores as log p. Adaptive PF: the PRM read as log p."""
    lm, prm = toy_lm(), random_prm().configured(transform="logit")
    paper = run_method("particle_filtering", lm, PROBLEM.prompt, prm=prm, budget=8, rng=np.random.default_rng(2),
                       config=ARITHMETIC_CONFIG)
    assert paper.result.info["preset"] == "pf_paper" and paper.result.info["selection_rule"] == "argmax_reward"
    assert np.all(paper.result.rewards <= 0)   # log p, although the PRM was passed reading logit p
    assert paper.answer == aggregate.argmax_weight(paper.answers, paper.result.rewards)
    adaptive = run_method("particle_filtering_adaptive", lm, PROBLEM.prompt, prm=prm, budget=8,
                          rng=np.random.default_rng(2), config=ARITHMETIC_CONFIG)
    assert adaptive.result.info["selection_rule"] == "weighted_majority"
    np.testing.assert_allclose(adaptive.result.particles.reward, adaptive.result.rewards)  # the run read log p


def test_method_options_come_from_the_config():
    cfg = MethodConfig(softmax_temperature=0.5, beam_width=3, pg_sweeps=2, pt_lams=(1.0, 0.3), pt_sweeps=3)
    assert method_options("particle_filtering", cfg) == {"softmax_temperature": 0.5, "store_history": False}
    assert method_options("particle_filtering_adaptive", cfg) == {"lam": 2.0, "store_history": False}
    assert method_options("best_of_n", cfg) == {"store_history": False}
    assert method_options("dvts", cfg) == {"beam_width": 3, "store_history": False}
    assert method_options("particle_gibbs", cfg)["sweeps"] == 2
    assert method_options("parallel_tempering", cfg)["lams"] == (1.0, 0.3)


def test_search_width_and_dvts_budget():
    """Width M = min(beam_width, N); DVTS uses N rounded down to a multiple of M."""
    lm, prm = toy_lm(), random_prm()
    for method, budget, width, used in (("beam_search", 3, 4, 3), ("dvts", 3, 4, 3), ("dvts", 10, 4, 8)):
        cfg = replace(ARITHMETIC_CONFIG, beam_width=width)
        run = run_method(method, lm, PROBLEM.prompt, prm=prm, budget=budget, rng=np.random.default_rng(0),
                         config=cfg)
        assert run.result.num_particles == used, (method, budget)


def test_a_selection_suffix_changes_only_the_final_pick():
    lm, prm = toy_lm(), random_prm()
    a = run_method("particle_filtering", lm, PROBLEM.prompt, prm=prm, budget=8, rng=np.random.default_rng(3),
                   config=ARITHMETIC_CONFIG)
    b = run_method("particle_filtering:majority_vote", lm, PROBLEM.prompt, prm=prm, budget=8,
                   rng=np.random.default_rng(3), config=ARITHMETIC_CONFIG)
    assert b.completions == a.completions and b.method == "particle_filtering:majority_vote"
    assert b.answer == aggregate.majority_vote(b.answers, key=int) == a.select("majority_vote")
    c = run_method("self_consistency:best_of_majority", lm, PROBLEM.prompt, prm=prm, budget=8,
                   rng=np.random.default_rng(3), config=ARITHMETIC_CONFIG)
    assert c.result.rewards is not None and c.ledger.reward_calls == 0   # scored after the run, for the rule
    assert c.answer == aggregate.best_of_majority(c.answers, c.result.rewards, key=int)
    with pytest.raises(ValueError, match="unknown selection"):
        run_method("particle_filtering:best", lm, PROBLEM.prompt, prm=prm, budget=2, rng=np.random.default_rng(0))


def test_bad_requests_are_refused():
    lm = toy_lm()
    with pytest.raises(ValueError, match="unknown method"):
        run_method("mcts", lm, PROBLEM.prompt, prm=random_prm(), budget=4, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="'zero_order_search' is a diffusion method; LLM methods are"):
        run_method("zero_order_search", lm, PROBLEM.prompt, prm=random_prm(), budget=4, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="needs a reward model"):
        run_method("best_of_n", lm, PROBLEM.prompt, budget=4, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="budget"):
        run_method("self_consistency", lm, PROBLEM.prompt, budget=0, rng=np.random.default_rng(0))
    with pytest.raises(TypeError, match="Potential"):
        run_method("particle_filtering", lm, PROBLEM.prompt, prm=3.0, budget=4, rng=np.random.default_rng(0),
                   config=ARITHMETIC_CONFIG)


def test_presets_fall_back_in_the_harness_and_refuse_when_asked():
    """run_method (an evaluation sweeps budgets) lets PG / PT run the PF paper's filter on
    budgets too small for them, and says so; allow_fallback=False refuses them."""
    lm, prm = toy_lm(), random_prm()
    for method, budget in (("particle_gibbs", 3), ("parallel_tempering", 8)):
        run = run_method(method, lm, PROBLEM.prompt, prm=prm, budget=budget, rng=np.random.default_rng(0),
                         config=ARITHMETIC_CONFIG)
        assert run.result.info["fallback"] == "particle_filtering" and run.result.num_particles == budget
        with pytest.raises(ValueError, match="smallest budget.*'particle_filtering'"):
            run_method(method, lm, PROBLEM.prompt, prm=prm, budget=budget, rng=np.random.default_rng(0),
                       config=ARITHMETIC_CONFIG, allow_fallback=False)
    assert method_options("particle_gibbs", ARITHMETIC_CONFIG, allow_fallback=True)["allow_fallback"] is True
    assert "allow_fallback" not in method_options("best_of_n", ARITHMETIC_CONFIG, allow_fallback=True)


@pytest.mark.parametrize("method", ["particle_filtering", "particle_filtering_adaptive", "particle_gibbs",
                                    "parallel_tempering"])
def test_every_preset_takes_a_judge_without_configured(method):
    """An LLM judge (a Potential without ``configured``) is used as it is by every preset."""
    from ppl_scaling.models.rewards import LLMJudge

    judge = LLMJudge(toy_lm(), on_prefix=False)
    assert not hasattr(judge, "configured")
    run = run_method(method, toy_lm(), PROBLEM.prompt, prm=judge, budget=12, rng=np.random.default_rng(0),
                     config=ARITHMETIC_CONFIG)
    assert run.result.rewards is not None and np.all(run.result.rewards <= 0)
    assert run.result.info.get("fallback") is None and run.ledger.reward_calls > 0


def test_llm_runs_export_answers_rewards_and_lengths_to_arviz():
    from ppl_scaling.models.harness import llm_posterior_fields

    run = run_method("particle_filtering", toy_lm(), PROBLEM.prompt, prm=random_prm(), budget=6,
                     rng=np.random.default_rng(0), config=ARITHMETIC_CONFIG)
    for idata in (run.to_arviz(), run.result.to_arviz()):
        post = idata.posterior
        assert {"answer", "reward", "length"} <= set(post.data_vars)
        assert list(post["answer"].values[0]) == ["" if a is None else str(a) for a in run.answers]
        np.testing.assert_allclose(post["reward"].values[0], run.result.rewards)
        assert np.array_equal(post["length"].values[0], run.result.particles.num_tokens)
        assert idata.sample_stats["log_marginal_likelihood"].values[0] == run.result.log_evidence
    fields = llm_posterior_fields(run)
    assert set(fields) == {"answer", "reward", "length"} and fields["length"].shape == (6,)
