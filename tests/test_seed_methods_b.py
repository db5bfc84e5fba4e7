"""Seed-paper methods: rejection sampling with an imperfect verifier (fLaws), Solve-Detect-Verify's
verification cascade, DeepPrune, and verifier scaling (sampled verdicts at a fixed compute).

Exact checks run on synthetic attempts with known rates (success p, verifier TPR / FPR): measured
frequencies must match the closed forms of ``ppl_scaling.metrics`` within 4 Monte Carlo standard
errors, SE = sqrt(q (1 - q) / R) for a frequency q over R independent runs (for a mean of a
bounded count, its sample standard deviation / sqrt(R)); at 4 SE a correct implementation fails
one check in ~16 000. Every method also runs through ``run_method`` on the toy task."""
from __future__ import annotations

import functools

import numpy as np
import pytest

from llm_fixtures import ExactStepScorer, exact_prm, toy_lm
from ppl_scaling.fk import Dynamics
from ppl_scaling.ledger import recording, record
from ppl_scaling.metrics import (cascade_rates, majority_verdict_rate, rejection_sampling_accuracy,
                                 rejection_sampling_attempts)
from ppl_scaling.models import toy
from ppl_scaling.models.evaluate import ARITHMETIC_CONFIG
from ppl_scaling.models.harness import run_method
from ppl_scaling.models.rewards import ProcessRewardModel
from ppl_scaling.models.types import Partial
from ppl_scaling.potentials import Potential
from ppl_scaling.samplers import METHODS, self_consistency
from ppl_scaling.samplers.deep_prune import deep_prune
from ppl_scaling.samplers.rejection_sampling import rejection_sampling
from ppl_scaling.samplers.verifier_scaling import split, verifier_scaling
from ppl_scaling.samplers.verify_cascade import Cascade, verify_cascade

Z = 4.0  # tolerance in Monte Carlo standard errors


def within(measured: float, expected: float, se: float) -> None:
    assert abs(measured - expected) <= Z * se + 1e-12, (measured, expected, se)


def freq_se(q: float, R: int) -> float:
    return float(np.sqrt(max(q * (1 - q), 1e-12) / R))


class Attempts(Dynamics):
    """One-step synthetic solver: an attempt is correct w.p. ``p``; ``u`` and ``v`` are uniforms
    that fix how the verifiers see it (so the verifiers are deterministic functions of the value,
    as potentials must be). Each attempt records 10 tokens."""

    T = 1

    def __init__(self, p: float) -> None:
        self.p = p

    def M0(self, N: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        record(tokens=10 * N)
        return {"correct": rng.random(N) < self.p, "u": rng.random(N), "v": rng.random(N)}


def rate_verifier(tpr: float, fpr: float, key: str = "u") -> Potential:
    """Accepts (log-value 0) a correct attempt w.p. tpr, a wrong one w.p. fpr, else -inf."""
    return Potential.from_callable(
        lambda xs: np.where(xs[key] < np.where(xs["correct"], tpr, fpr), 0.0, -np.inf))


# --------------------------------------------------------------------------- rejection sampling

@pytest.mark.parametrize("p,tpr,fpr", [(0.3, 0.8, 0.15), (0.6, 0.6, 0.4)])
def test_rejection_sampling_matches_the_flaws_closed_form(p, tpr, fpr):
    rng, R = np.random.default_rng(11), 1500
    model, verifier = Attempts(p), rate_verifier(tpr, fpr)
    for k in (1, 4, 16):
        runs = [rejection_sampling(model, k, potential=verifier, rng=rng) for _ in range(R)]
        correct = np.array([r.particles["correct"][r.info["chosen"]] for r in runs])
        accepted = np.array([r.info["accepted"] for r in runs])
        attempts = np.array([r.info["attempts"] for r in runs])
        q = float(rejection_sampling_accuracy(p, tpr, fpr, k))
        within(correct.mean(), q, freq_se(q, R))
        q0 = float(rejection_sampling_accuracy(p, tpr, fpr, k, fallback="abstain"))
        within((correct & accepted).mean(), q0, freq_se(q0, R))
        within(attempts.mean(), float(rejection_sampling_attempts(p, tpr, fpr, k)),
               max(attempts.std(), 0.01) / np.sqrt(R))
        assert all(r.ledger.tokens == 10 * r.info["attempts"] == 10 * r.ledger.reward_calls for r in runs)


def test_rejection_sampling_ceiling_and_penalty():
    """k -> inf: accuracy a / (a + b) (the false-positive ceiling). With a penalty for false
    positives one problem's utility (a - c b) S_k is monotone in k, but over problems of mixed
    difficulty the optimal k is finite (the paper's Fig. 1b)."""
    p, tpr, fpr = 0.2, 0.9, 0.1
    a, b = p * tpr, (1 - p) * fpr
    assert float(rejection_sampling_accuracy(p, tpr, fpr, 2000)) == pytest.approx(a / (a + b))
    assert float(rejection_sampling_accuracy(p, tpr, 0.0, 2000)) == pytest.approx(1.0)
    one = [float(rejection_sampling_accuracy(0.05, 0.9, 0.1, k, fallback="abstain", penalty=1.0)) for k in (1, 5, 25)]
    assert one[0] > one[1] > one[2]   # a < c b: every extra sample hurts
    mixed = [float(np.mean(rejection_sampling_accuracy([0.5, 0.05], 0.9, [0.05, 0.1], k, fallback="abstain",
                                                       penalty=1.0))) for k in range(1, 30)]
    assert int(np.argmax(mixed)) + 1 == 5
    with pytest.raises(ValueError, match="probability"):
        rejection_sampling_accuracy(1.2, 0.5, 0.5, 3)


def test_rejection_sampling_stops_at_the_first_accepted_and_falls_back():
    xs = {"correct": np.array([False, True, True]), "u": np.array([0.9, 0.1, 0.1]), "v": np.zeros(3)}

    class Fixed(Dynamics):
        T = 1

        def M0(self, N, rng):
            i = int(rng.integers(3))
            return {k: v[[i]] for k, v in xs.items()}

    verifier = rate_verifier(0.5, 0.5)
    res = rejection_sampling(Fixed(), 50, potential=verifier, seed=0)
    assert res.info["accepted"] and res.particles["correct"][res.info["chosen"]]
    assert res.info["chosen"] == res.info["attempts"] - 1 and np.isfinite(res.log_weights).sum() == 1
    never = Potential.from_callable(lambda xs: np.log(0.1 + 0.8 * xs["u"]))   # phi < 0.9: never accepted
    best = rejection_sampling(Fixed(), 6, potential=never, threshold=0.9, fallback="best", seed=1)
    assert not best.info["accepted"] and best.info["attempts"] == 6
    assert best.rewards[best.info["chosen"]] == best.rewards.max()
    batched = rejection_sampling(Attempts(0.5), 7, potential=rate_verifier(0.0, 0.0), batch=3, seed=0)
    assert batched.info["attempts"] == 7 and batched.info["chosen"] == 6   # rounds of 3, 3, 1; the last
    with pytest.raises(ValueError, match="fallback"):
        rejection_sampling(Attempts(0.5), 2, potential=verifier, fallback="first")


# --------------------------------------------------------------------------- verification cascade

def cascade_potentials(h1: float, u1: float, h0: float, u0: float, tpr_e: float, fpr_e: float):
    """Cheap tier: phi = 0.9 (sure yes) w.p. h, 0.5 (unsure) w.p. u, else 0.1, by ``u``; the
    expensive tier decides by ``v``."""
    def cheap(xs):
        h, u = np.where(xs["correct"], h1, h0), np.where(xs["correct"], u1, u0)
        return np.log(np.select([xs["u"] < h, xs["u"] < h + u], [0.9, 0.5], 0.1))
    return Potential.from_callable(cheap), rate_verifier(tpr_e, fpr_e, key="v")


def test_verify_cascade_accuracy_and_escalations_match_closed_forms():
    p, k, R = 0.35, 4, 1500
    h1, u1, h0, u0, tpr_e, fpr_e = 0.5, 0.3, 0.1, 0.3, 0.95, 0.05
    cheap, expensive = cascade_potentials(h1, u1, h0, u0, tpr_e, fpr_e)
    rates = cascade_rates(p, accept=(h1, h0), unsure=(u1, u0), expensive=(tpr_e, fpr_e))
    rng, model = np.random.default_rng(5), Attempts(p)
    runs = [verify_cascade(model, k, potential=cheap, expensive=expensive, rng=rng) for _ in range(R)]
    correct = np.mean([r.particles["correct"][r.info["chosen"]] for r in runs])
    q = float(rejection_sampling_accuracy(p, rates["tpr"], rates["fpr"], k))
    within(correct, q, freq_se(q, R))
    cheap_calls = sum(r.info["cheap_calls"] for r in runs)
    expensive_calls = sum(r.info["expensive_calls"] for r in runs)
    e = float(rates["escalation"])
    within(expensive_calls / cheap_calls, e, freq_se(e, cheap_calls))
    within(cheap_calls / R, float(rejection_sampling_attempts(p, rates["tpr"], rates["fpr"], k)),
           np.std([r.info["cheap_calls"] for r in runs]) / np.sqrt(R))
    assert all(r.ledger.escalated_calls == r.info["expensive_calls"] for r in runs)


def test_cascade_only_escalates_the_unsure_band():
    xs = {"correct": np.array([True, True, False, False]), "u": np.array([0.1, 0.6, 0.6, 0.95]),
          "v": np.array([0.5, 0.5, 0.5, 0.5])}
    cheap, expensive = cascade_potentials(0.5, 0.3, 0.5, 0.3, 1.0, 0.0)
    with recording() as spent:
        verdict = Cascade(cheap, expensive).score(xs, True)
    # phi = 0.9 (accept), 0.5 (escalate: correct), 0.5 (escalate: wrong), 0.1 (reject)
    np.testing.assert_array_equal(verdict, [0.0, 0.0, -np.inf, -np.inf])
    assert (spent.reward_calls, spent.escalated_calls) == (4, 2)
    assert (Cascade(cheap, expensive).score(xs, False) == 0).all()   # no verdict before completion
    with pytest.raises(ValueError, match="low <= high"):
        Cascade(cheap, expensive, low=0.9, high=0.1)


# --------------------------------------------------------------------------- DeepPrune

class Traces(Dynamics):
    """Synthetic reasoning traces fixed at M0 (so pruning cannot change the others): a final
    answer in 0..3 and a length of 2..T steps; each move reveals one step of an unfinished trace
    and records one token. The view is (answer, steps so far) per trace."""

    T = 6

    def M0(self, N, rng):
        record(tokens=N)
        return {"answer": rng.choice(4, size=N, p=[0.4, 0.3, 0.2, 0.1]),
                "length": rng.integers(2, self.T + 1, size=N), "steps": np.ones(N, dtype=np.int64)}

    def M(self, t, xp, rng):
        moving = xp["steps"] < xp["length"]
        record(tokens=int(moving.sum()))
        return {**xp, "steps": xp["steps"] + moving}

    def done(self, t, x):
        return x["steps"] >= x["length"]

    def view(self, t, x):
        return list(zip(x["answer"].tolist(), x["steps"].tolist()))


def oracle(a, b) -> bool:
    return a[0] == b[0]


def test_deep_prune_with_a_perfect_judge_is_self_consistency_for_fewer_tokens():
    model, saved = Traces(), 0
    for seed in range(25):
        pruned = deep_prune(model, 12, judge=oracle, seed=seed)
        full = self_consistency(model, 12, seed=seed)
        np.testing.assert_array_equal(pruned.particles.base["answer"], full.particles["answer"])   # same samples
        answers = full.particles["answer"].tolist()
        assert pruned.select(answers) == full.select(answers)
        kept = np.isfinite(pruned.log_weights)
        assert len({answers[i] for i in np.flatnonzero(kept)}) == kept.sum()   # one trace per answer kept
        assert np.exp(pruned.log_weights[kept]).sum() == pytest.approx(12)       # every trace votes once
        assert pruned.ledger.tokens <= full.ledger.tokens
        saved += full.ledger.tokens - pruned.ledger.tokens
    assert saved > 0


def test_deep_prune_without_redundancy_is_self_consistency():
    model = Traces()
    res = deep_prune(model, 10, judge=lambda a, b: 0.0, seed=3)
    full = self_consistency(model, 10, seed=3)
    assert res.info["pruned"] == 0 and res.ledger.tokens == full.ledger.tokens
    assert res.info["judge_calls"] == res.ledger.reward_calls > 0
    late = deep_prune(model, 10, judge=oracle, min_step=4, seed=3)
    early = deep_prune(model, 10, judge=oracle, seed=3)
    assert early.ledger.tokens <= late.ledger.tokens <= full.ledger.tokens
    with pytest.raises(ValueError, match="min_step"):
        deep_prune(model, 4, judge=oracle, min_step=0)


# --------------------------------------------------------------------------- verifier scaling

def test_compute_split():
    assert [split(8, v) for v in (0, 1, 3, 7, 20)] == [8, 4, 2, 1, 1]
    assert split(12, 2, verify_cost=0.5) == 6
    with pytest.raises(ValueError, match="verifications"):
        split(8, -1)


def prob_verifier(tpr: float, fpr: float) -> Potential:
    """A sampled verifier's yes-probability: tpr for a correct attempt, fpr for a wrong one."""
    def log_yes(xs):
        with np.errstate(divide="ignore"):
            return np.log(np.where(xs["correct"], tpr, fpr))
    return Potential.from_callable(log_yes)


@pytest.mark.parametrize("V", [1, 3, 5])
def test_majority_of_sampled_verdicts_matches_the_binomial_tail(V):
    tpr, fpr, S, R = 0.7, 0.35, 40, 60
    rng, model = np.random.default_rng(V), Attempts(0.5)
    hits = {True: [], False: []}
    for _ in range(R):
        res = verifier_scaling(model, S * (1 + V), potential=prob_verifier(tpr, fpr), verifications=V, rng=rng)
        assert res.info["solutions"] == S and res.info["compute"] == S * (1 + V)
        for c, y in zip(res.particles["correct"], res.info["yes_votes"]):
            hits[bool(c)].append(y > V / 2)
    for c, rate in ((True, tpr), (False, fpr)):
        q = float(majority_verdict_rate(rate, V))
        within(np.mean(hits[c]), q, freq_se(q, len(hits[c])))


def test_verifier_scaling_votes_with_verdict_weights():
    res = verifier_scaling(Attempts(0.5), 8, potential=prob_verifier(1.0, 0.0), verifications=1, seed=0)
    correct = res.particles["correct"].tolist()
    assert res.info["solutions"] == 4 and res.select(correct) == any(correct)   # a perfect verifier
    sc = verifier_scaling(Attempts(0.5), 8, potential=prob_verifier(1.0, 0.0), verifications=0, seed=0)
    assert sc.info["solutions"] == 8 and (sc.log_weights == 0).all() and sc.ledger.reward_calls == 0


# --------------------------------------------------------------------------- the toy task, through run_method

@pytest.fixture
def registered(monkeypatch):
    for name, fn in {"rejection_sampling": rejection_sampling, "verifier_scaling": verifier_scaling,
                     "verify_cascade": functools.partial(verify_cascade, expensive=exact_prm()),
                     "deep_prune": functools.partial(deep_prune, judge=toy.same_predicted_answer)}.items():
        monkeypatch.setitem(METHODS, name, fn)


def test_the_methods_run_through_the_harness_on_the_toy_task(registered):
    problem, lm = toy.load_split("test")[3], toy_lm()
    unsure = ProcessRewardModel(ExactStepScorer(good=0.6, bad=0.05))   # correct steps fall in the band: escalated
    for method, prm in (("rejection_sampling", exact_prm()), ("verify_cascade", unsure),
                        ("deep_prune", exact_prm()), ("verifier_scaling", exact_prm())):
        run = run_method(method, lm, problem.prompt, prm=prm, budget=4, rng=np.random.default_rng(0),
                         config=ARITHMETIC_CONFIG)
        assert run.result.info["method"] == method and run.ledger.tokens > 0, method
        assert len(run.answers) == run.result.num_particles
        if method == "verify_cascade" and run.result.info["accepted"]:   # escalated to the exact checker
            assert run.ledger.escalated_calls >= 1 and run.answer == problem.answer
    exact = run_method("rejection_sampling", lm, problem.prompt, prm=exact_prm(), budget=6,
                       rng=np.random.default_rng(0), config=ARITHMETIC_CONFIG)
    if exact.result.info["accepted"]:   # the exact checker accepts correct solutions only
        assert exact.answer == problem.answer
    assert exact.ledger.reward_calls == exact.result.info["attempts"] == exact.result.num_particles


def test_the_toy_judge_predicts_from_running_totals():
    q = "Q:24+5-4-7\n"   # 24, 29, 25, 18
    assert toy.predicted_answer(q, ["24+5=29\n"]) == 18
    assert toy.predicted_answer(q, ["24+5=30\n", "30-4=26\n"]) == 19
    assert toy.predicted_answer(q, ["24+5=29\n", "29-4=25\n", "25-7=18\n", "A:17\n"]) == 17
    assert toy.predicted_answer(q, ["2"]) is None and toy.predicted_answer(q, []) is None
    a, b = (Partial(q, ("24+5=29\n",), False), Partial(q, ("24+6=29\n",), False))
    assert toy.same_predicted_answer(a, b) and not toy.same_predicted_answer(a, Partial(q, ("24+5=28\n",), False))


def test_deep_prune_saves_tokens_on_the_toy_task(registered):
    problem, lm = toy.load_split("test")[0], toy_lm()
    pruned = run_method("deep_prune", lm, problem.prompt, prm=exact_prm(), budget=8, rng=np.random.default_rng(1),
                        config=ARITHMETIC_CONFIG)
    full = run_method("self_consistency", lm, problem.prompt, budget=8, rng=np.random.default_rng(1),
                      config=ARITHMETIC_CONFIG)
    assert pruned.result.info["pruned"] > 0 and pruned.ledger.tokens < full.ledger.tokens
