"""Stop rules end runs early and really save tokens: adaptive self-consistency returns the
full run's majority answer (the exact rule), first-finish and token budgets stop where they
say; a stopped run keeps only finished particles and claims no log Z."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from ppl_scaling.cli import main
from ppl_scaling.models.evaluate import ARITHMETIC_CONFIG, arithmetic_task
from ppl_scaling.models.harness import MethodConfig, run_method
from ppl_scaling.stopping import AnswerSettled, FinishedCount, TokenBudget, any_of, beta_lead_probability

from llm_fixtures import exact_prm, toy_lm
from test_step_model import BigramLM

PROBLEMS = arithmetic_task(12).items


def test_beta_lead_probability_is_the_beta_tail():
    assert beta_lead_probability(3, 0) == pytest.approx(15 / 16)          # Beta(4, 1): 1 - 2^-4
    assert beta_lead_probability(0, 0) == pytest.approx(0.5)
    # Beta(3, 2): P(X > 1/2) = 1 - I_{1/2}(3, 2) = 11/16
    assert beta_lead_probability(2, 1) == pytest.approx(11 / 16)
    grid = np.linspace(0.5, 1, 200001)   # Beta(6, 3) density on [1/2, 1], integrated numerically
    dens = grid ** 5 * (1 - grid) ** 2 / (math.factorial(5) * math.factorial(2) / math.factorial(8))
    assert beta_lead_probability(5, 2) == pytest.approx(np.trapezoid(dens, grid), abs=1e-8)


def last_letter(completion: str) -> str | None:
    return completion[-1] if completion else None


BIGRAM_CONFIG = MethodConfig(step_delimiter=None, max_steps=8, max_step_tokens=1, temperature=1.0, stop=None,
                             extract=last_letter, key=str)


def test_adaptive_self_consistency_gives_the_full_runs_answer_with_fewer_tokens():
    """On the bigram LM (lengths vary: EOS has probability 0.2-0.3 per token) the exact rule
    stops as soon as the vote is decided; the answer is always the full run's."""
    lm, settled = BigramLM(), replace(BIGRAM_CONFIG, early_stop="settled")
    saved = stopped = 0
    for seed in range(40):
        full = run_method("self_consistency", lm, "^", budget=16, rng=np.random.default_rng(seed),
                          config=BIGRAM_CONFIG)
        early = run_method("self_consistency", lm, "^", budget=16, rng=np.random.default_rng(seed), config=settled)
        assert early.answer == full.answer                                  # exact: the vote was decided
        assert early.ledger.tokens <= full.ledger.tokens
        saved += full.ledger.tokens - early.ledger.tokens
        if early.result.info.get("stopped_early"):
            stopped += 1
            lw = early.result.log_weights
            assert np.isneginf(lw[~early.result.done]).all() and np.isnan(early.result.log_evidence)
    assert stopped >= 10 and saved > 0


def test_first_finished_and_token_budget_stop_where_they_say():
    lm = toy_lm()
    item = PROBLEMS[0]
    first = run_method("self_consistency", BigramLM(), "^", budget=8, rng=np.random.default_rng(1),
                       config=replace(BIGRAM_CONFIG, early_stop="finished:1"))
    done = first.result.done
    assert done.sum() >= 1 and first.result.info["stopped_early"]["unfinished"] == int((~done).sum())
    assert sum(a is not None for a in first.answers) >= 1
    budget = 60
    capped = run_method("particle_filtering", lm, item.prompt, prm=exact_prm(), budget=8,
                        rng=np.random.default_rng(1),
                        config=replace(ARITHMETIC_CONFIG, token_budget=budget))
    spent = capped.ledger.tokens + capped.ledger.reward_tokens
    one_step = 8 * ARITHMETIC_CONFIG.max_step_tokens           # the most one step can add
    assert budget <= spent < budget + one_step
    rule = any_of(None, TokenBudget(10), FinishedCount(2))
    assert rule is not None and any_of(None) is None


def test_stop_rules_refuse_bad_settings_and_methods_without_them(tmp_path, capsys):
    with pytest.raises(ValueError, match="confidence"):
        AnswerSettled(str, confidence=1.5)
    with pytest.raises(ValueError, match="positive integer"):
        FinishedCount(0)
    with pytest.raises(ValueError, match="early_stop 'sometimes'"):
        MethodConfig(early_stop="sometimes").stop_rule()
    out = tmp_path / "r.jsonl"
    assert main(["eval", "--methods", "beam_search", "--budgets", "2", "--problems", "1", "--early-stop", "settled",
                 "--out", str(out), "--no-progress"]) == 2
    assert "takes no stop rule" in capsys.readouterr().err
    assert main(["eval", "--methods", "self_consistency", "--budgets", "4", "--problems", "2", "--early-stop",
                 "settled:0.9", "--out", str(out), "--no-progress"]) == 0
