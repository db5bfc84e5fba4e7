"""The lockstep driver (``ppl_scaling.models.lockstep.run_many``) on the bundled toy task:
runs at any concurrency equal the same runs made one after another (answers, completions,
weights, rewards, ledgers), their step sampling really is merged, and a failing job stays
its own. Also the HF backend's merged call (``sample_steps_many``) against single calls."""
from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import numpy as np
import pytest
import torch

from ppl_scaling.ledger import recording
from ppl_scaling.models import toy
from ppl_scaling.models.evaluate import ARITHMETIC_CONFIG
from ppl_scaling.models.harness import run_method
from ppl_scaling.models.lm import ContextLengthError
from ppl_scaling.models.lockstep import Job, LockstepStats, run_many

from llm_fixtures import exact_prm, random_prm, toy_lm

PROBLEMS = toy.load_split("test")[:2]
METHODS = ("particle_filtering", "best_of_n", "beam_search", "self_consistency", "particle_gibbs")
BUDGETS = (4, 8)
CONFIG = replace(ARITHMETIC_CONFIG, temperature=0.8, top_k=20)   # tempered and truncated: log q != log p


def jobs(prompts=tuple(p.prompt for p in PROBLEMS), methods=METHODS, budgets=BUDGETS) -> list[Job]:
    specs = [(m, p, b) for p in prompts for m in methods for b in budgets]
    return [Job(m, p, b, np.random.default_rng([7, i])) for i, (m, p, b) in enumerate(specs)]


def summary(run) -> tuple:
    """Everything a run's evaluation row reads."""
    res = run.result
    return (run.answer, run.answers, run.completions, res.log_weights.tolist(),
            None if res.rewards is None else res.rewards.tolist(), repr(res.log_evidence),
            {k: v for k, v in run.ledger.as_dict().items() if k != "wall_s"})


def sequential(prm_name: str, specs: list[Job]) -> list[tuple]:
    prm = {"exact": exact_prm, "random": random_prm}[prm_name]()
    return [summary(run_method(j.method, toy_lm(), j.prompt, prm=prm, budget=j.budget, rng=j.rng, config=CONFIG))
            for j in specs]


@lru_cache(maxsize=None)
def expected(prm_name: str) -> list[tuple]:
    return sequential(prm_name, jobs())


class CountingLM:
    """The toy LM, counting the step-sampling calls that reach it."""

    def __init__(self, lm) -> None:
        self.lm, self.single, self.merged = lm, 0, 0

    def sample_steps(self, *args, **kwargs):
        self.single += 1
        return self.lm.sample_steps(*args, **kwargs)

    def sample_steps_many(self, *args, **kwargs):
        self.merged += 1
        return self.lm.sample_steps_many(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.lm, name)


@pytest.mark.parametrize("concurrency", [1, 3, 8])
def test_runs_in_lockstep_equal_the_runs_one_after_another(concurrency):
    stats = LockstepStats()
    runs = run_many(jobs(), toy_lm(), prm=exact_prm(), concurrency=concurrency, config=CONFIG, stats=stats)
    assert [summary(r) for r in runs] == expected("exact")
    assert stats.requests > 0 and stats.rows > 0
    if concurrency == 1:
        assert stats.merged_calls == stats.requests
    else:
        assert stats.merged_calls < stats.requests / 2 and stats.largest > 8


def test_a_shared_hf_reward_model_keeps_each_run_its_own():
    """The random classifier PRM (an HF scorer) is shared; every run keeps its own score cache."""
    runs = run_many(jobs(), toy_lm(), prm=random_prm(), concurrency=5, config=CONFIG)
    assert [summary(r) for r in runs] == expected("random")


def test_merged_calls_replace_the_single_ones():
    counting = CountingLM(toy_lm())
    specs = jobs(methods=("particle_filtering", "best_of_n"))
    for j in jobs(methods=("particle_filtering", "best_of_n")):
        run_method(j.method, counting, j.prompt, prm=exact_prm(), budget=j.budget, rng=j.rng, config=CONFIG)
    alone, counting.single = counting.single, 0
    stats = LockstepStats()
    run_many(specs, counting, prm=exact_prm(), concurrency=len(specs), config=CONFIG, stats=stats)
    assert counting.single == 0 and stats.requests == alone
    assert counting.merged == stats.merged_calls < alone / 3


def test_a_failing_job_leaves_the_others_alone():
    """A job refused inside a merged call (its context does not fit) and one refused before
    sampling: the others' runs are unchanged, the failures take their places."""
    long_prompt = "Q:" + "1+" * 55 + "1\n"            # fits the toy's 128 tokens, not with a step more
    specs = jobs(methods=("particle_filtering", "best_of_n"), budgets=(4,))
    bad = [Job("particle_filtering", long_prompt, 4, np.random.default_rng(1)),
           Job("best_of_n", PROBLEMS[0].prompt, 0, np.random.default_rng(2))]
    mixed = specs[:2] + bad[:1] + specs[2:] + bad[1:]
    ended: list[int] = []
    runs = run_many(mixed, toy_lm(), prm=exact_prm(), concurrency=4, config=CONFIG, return_exceptions=True,
                    on_done=lambda i, _: ended.append(i))
    assert sorted(ended) == list(range(len(mixed)))
    assert isinstance(runs[2], ContextLengthError) and isinstance(runs[-1], ValueError)
    good = [r for r in runs if not isinstance(r, Exception)]
    assert [summary(r) for r in good] == sequential("exact", jobs(methods=("particle_filtering", "best_of_n"),
                                                                  budgets=(4,)))
    with pytest.raises(ContextLengthError):
        run_many(mixed, toy_lm(), prm=exact_prm(), concurrency=4, config=CONFIG)


def test_the_hf_merged_call_equals_single_calls():
    """Parts of different lengths and sizes, merged: the same tokens and per-part ledgers as
    alone, log-probabilities equal to float rounding (the merged batch pads the rows
    differently), and caches that continue the same way."""
    lm = toy_lm()
    prompts = [lm.encode(p.prompt) for p in toy.load_split("test")[:3]]
    sizes = (3, 5, 2)
    settings = dict(step_delimiter=toy.STEP_DELIMITER, max_step_tokens=12, temperature=0.8, top_p=0.9)

    def contexts():
        return [lm.start([p]).take(np.zeros(n, int)) for p, n in zip(prompts, sizes)]

    alone = []
    for ctx, seed in zip(contexts(), range(3)):
        g, steps = torch.Generator().manual_seed(seed), []
        for _ in range(2):
            with recording() as spent:
                s = lm.sample_steps(ctx, generator=g, **settings)
            steps.append((s.token_ids, s.log_q, s.log_p, spent.tokens, spent.forward_passes, spent.prefill_tokens))
            ctx = s.contexts
        alone.append(steps)
    parts = [(c, torch.Generator().manual_seed(seed)) for c, seed in zip(contexts(), range(3))]
    merged: list[list] = [[] for _ in parts]
    for _ in range(2):
        with recording() as outside:
            out = lm.sample_steps_many(parts, **settings)
        assert outside.tokens == 0   # the merged call records nothing itself
        for steps, (s, spent) in zip(merged, out):
            steps.append((s.token_ids, s.log_q, s.log_p, spent.tokens, spent.forward_passes, spent.prefill_tokens))
        parts = [(s.contexts, g) for (s, _), (_, g) in zip(out, parts)]
    for got, want in zip(merged, alone):
        for (ids, log_q, log_p, *spent), (ids_, log_q_, log_p_, *spent_) in zip(got, want):
            assert ids == ids_ and spent == spent_
            np.testing.assert_allclose(log_q, log_q_, rtol=0, atol=1e-5)
            np.testing.assert_allclose(log_p, log_p_, rtol=0, atol=1e-5)
