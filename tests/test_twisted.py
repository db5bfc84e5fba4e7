"""Twisted proposals at token level (``StepModel(..., twist=ψ)``, ``ppl_scaling.models.twist``).

On the bigram LM of test_step_model, against brute-force enumeration:

- with the optimal twist (the exact value function H, also the tilt's potential) every
  incremental weight is constant: ESS = N at every step and the evidence is exact;
- with non-optimal twists (the greedy φ, a tempered one, a twist that differs from the
  tilt) the target is unchanged: the unbiasedness identities over R independent runs,
      E[Z_hat / Z] = 1    and    E[(Z_hat / Z) Σ_i W_i 1{x_i = s}] = π(s),
  hold within 4.5 Monte Carlo standard errors;
- a hard 0/1 potential (``CharClass``) used as twist never proposes a rejected token, where
  the untwisted filter's particles die (ESS of both measured, same N and seed).
"""
from __future__ import annotations

import itertools
from functools import lru_cache

import numpy as np
import pytest

import ppl_scaling as pps
from ppl_scaling import Tilted
from ppl_scaling.errors import PotentialError
from ppl_scaling.models.step import StepModel
from ppl_scaling.models.toy import TOY_LM_PATH
from ppl_scaling.models.twist import CharClass, sample_twisted_tokens, token_log_potential, token_pieces
from ppl_scaling.models.types import Partial
from ppl_scaling.potentials import Potential
from test_step_model import (BIGRAM, CHARS, ABReward, BigramLM, assert_logp_matches_recompute, check_unbiased,
                             exact_posterior)


def q_table(temperature):
    q = BIGRAM ** (1.0 / temperature)
    return q / q.sum(1, keepdims=True)


class ValuePotential(Potential):
    """The exact value function of the tilted bigram target q_τ(x) exp(r(x)) with at most T steps:
    prefix(y) = log H(y) = log E_q[exp(r(x)) | y], complete(y) = r(y)."""

    def __init__(self, T, temperature=1.0):
        self.T, self.q, self.r = T, q_table(temperature), ABReward()

    def complete(self, partials):
        return self.r.complete(partials)

    def prefix(self, partials):
        return np.array([self._log_H(p.prompt, p.steps) for p in partials])

    @lru_cache(maxsize=None)  # noqa: B019 (test helper)
    def _log_H(self, prompt, steps):
        left = self.T - len(steps)
        prev = CHARS.index(steps[-1]) if steps else 0
        total = 0.0
        for k in range(1, left + 1):
            for toks in itertools.product([1, 2, 3], repeat=k):
                if 3 in toks[:-1] or (k < left and toks[-1] != 3):
                    continue
                prob, p = 1.0, prev
                for t in toks:
                    prob, p = prob * self.q[p, t], t
                full = Partial(prompt, steps + tuple(CHARS[t] if t != 3 else "" for t in toks), True)
                total += prob * np.exp(self.r.complete([full])[0])
        return float(np.log(total))


def only_a_posterior(T, temperature=1.0):
    """π ∝ q_τ(x) 1[x has no "b"], and its Z."""
    q = q_table(temperature)
    post = {}
    for k in range(1, T + 1):   # a^(k-1) EOS, or a^T / a^(T-1) EOS at the last step
        for last in ([3] if k < T else [1, 3]):
            seq = (1,) * (k - 1) + (last,)
            prob, p = 1.0, 0
            for t in seq:
                prob, p = prob * q[p, t], t
            post[tuple(CHARS[t] if t != 3 else "" for t in seq)] = prob
    Z = sum(post.values())
    return {s: v / Z for s, v in post.items()}, Z

# -- the optimal twist -----------------------------------------------------------------

def test_optimal_twist_gives_constant_weights_and_the_exact_evidence():
    T, N = 4, 32
    post, Z = exact_posterior(T, 1.0, "tempered", 1.0)
    H = ValuePotential(T)
    fk = Tilted(StepModel(BigramLM(), "^", step_delimiter=None, max_steps=T, twist=H), H)
    for seed in range(5):
        res = pps.smc(fk, N, ess_threshold=0.5, seed=seed)
        np.testing.assert_allclose(res.ess, N, rtol=1e-9)   # ESS = N at every step
        assert not res.resampled.any()
        assert res.log_evidence == pytest.approx(np.log(Z), abs=1e-9)   # zero-variance evidence
        assert np.isfinite(res.log_weights).all()
    ratio = check_unbiased(fk, post, Z, R=300, N=8, ess_threshold=0.5, seed=0)
    np.testing.assert_allclose(ratio, 1.0, atol=1e-9)


def test_optimal_twist_step_weights_are_zero_after_the_first():
    """The dynamics' own weight (log L - log H(x v)) cancels the tilt's (log H(x v) - log H(x))."""
    T = 4
    H = ValuePotential(T)
    fk = Tilted(StepModel(BigramLM(), "^", step_delimiter=None, max_steps=T, twist=H), H)
    rng = np.random.default_rng(0)
    x = fk.M0(16, rng)
    np.testing.assert_allclose(fk.logG(0, None, x), H.prefix([Partial("^")])[0], atol=1e-12)
    for t in range(1, T):
        xn = fk.M(t, x, rng)
        lg = fk.logG(t, x, xn)
        np.testing.assert_allclose(lg[~x.done], 0.0, atol=1e-12)
        x = xn


# -- non-optimal twists: the target is unchanged --------------------------------------------

def test_greedy_twist_is_unbiased():
    """ψ = φ = ABReward (not the value function): weights vary, evidence and posterior are exact."""
    T = 4
    post, Z = exact_posterior(T, 1.0, "tempered", 1.0)
    fk = Tilted(StepModel(BigramLM(), "^", step_delimiter=None, max_steps=T, twist=ABReward()), ABReward())
    check_unbiased(fk, post, Z, R=300, N=16, ess_threshold=0.5, seed=3)


def test_tempered_twist_with_model_target_is_unbiased():
    """τ = 0.6, target="model", ψ = ABReward ** 0.5 (token scores through Tempered), tilt lam = 1."""
    T = 4
    post, Z = exact_posterior(T, 0.6, "model", 1.0)
    gen = StepModel(BigramLM(), "^", step_delimiter=None, max_steps=T, temperature=0.6, target="model",
                    twist=ABReward() ** 0.5)
    check_unbiased(Tilted(gen, ABReward(), shape="max"), post, Z, R=300, N=16, ess_threshold=1.0, seed=4)


def test_twist_without_a_tilt_keeps_the_base_target():
    """A twist alone (no tilt) is only a proposal: the target stays q_τ (Z = 1)."""
    T = 3
    q = q_table(0.7)
    post = {}
    for k in range(1, T + 1):
        for toks in itertools.product([1, 2, 3], repeat=k):
            if 3 in toks[:-1] or (k < T and toks[-1] != 3):
                continue
            prob, p = 1.0, 0
            for t in toks:
                prob, p = prob * q[p, t], t
            post[tuple(CHARS[t] if t != 3 else "" for t in toks)] = prob
    gen = StepModel(BigramLM(), "^", step_delimiter=None, max_steps=T, temperature=0.7, twist=ABReward())
    check_unbiased(gen, post, 1.0, R=300, N=8, ess_threshold=0.5, seed=5)


# -- hard constraints -----------------------------------------------------------------------

def run_only_a(twisted, N=64, T=6, seed=0, ess_threshold=0.5):
    only_a = CharClass("a")
    gen = StepModel(BigramLM(), "^", step_delimiter=None, max_steps=T, twist=only_a if twisted else None)
    return pps.smc(Tilted(gen, only_a), N, ess_threshold=ess_threshold, seed=seed, store_history=True)


def test_hard_twist_never_proposes_a_rejected_token():
    res = run_only_a(True)
    for h in res.history:   # no particle ever holds a "b"
        assert all("b" not in "".join(s) for s in h.steps)
    assert np.isfinite(res.log_weights).all()
    plain = run_only_a(False)
    assert np.isneginf(plain.log_weights).any() or plain.resampled.any()
    assert any("b" in "".join(s) for h in plain.history for s in h.steps)   # the filter proposes them
    assert res.ess.min() > plain.ess.min()


def test_hard_twist_is_unbiased():
    T = 5
    post, Z = only_a_posterior(T)
    only_a = CharClass("a")
    fk = Tilted(StepModel(BigramLM(), "^", step_delimiter=None, max_steps=T, twist=only_a), only_a)
    check_unbiased(fk, post, Z, R=300, N=8, ess_threshold=0.5, seed=6)


def test_every_token_rejected_kills_the_particle():
    """ψ = 0 for every next token (L = 0): weight -inf, and the run says so."""
    never = Potential.from_callable(lambda ps: np.where([len(p.steps) >= 2 for p in ps], -np.inf, 0.0))
    gen = StepModel(BigramLM(), "^", step_delimiter=None, max_steps=4, twist=never)
    x = gen.M0(8, np.random.default_rng(0))
    x2 = gen.M(1, x, np.random.default_rng(1))
    lg = gen.logG(1, x, x2)
    assert np.isneginf(lg[~x.finished]).all() and (lg[x.finished] == 0).all()
    assert np.isfinite(gen.logpt(1, x, x2)[~x.finished]).all()   # drawn from q_τ: a real density


# -- token scores ---------------------------------------------------------------------------

def test_charclass_token_scores_match_scoring_every_extension():
    lm = BigramLM()
    pieces = token_pieces(lm, 4)
    assert pieces == ["", "a", "b", ""]   # BOS decodes to nothing, EOS is ""
    for cc in (CharClass("a"), CharClass("a", after="b"), CharClass("b", after="ab")):
        partials = [Partial("^", s) for s in [(), ("a",), ("b",), ("a", "b"), ("b", "b"), ("a", "a")]]
        fin = np.zeros((len(partials), 4), bool)
        fin[:, 3] = True
        fast = token_log_potential(cc, partials, pieces, fin)
        slow = token_log_potential(Potential.from_callable(cc.prefix), partials, pieces, fin)
        np.testing.assert_array_equal(fast, slow)


def test_product_and_tempered_token_scores():
    lm = BigramLM()
    pieces = token_pieces(lm, 4)
    partials = [Partial("^", s) for s in [(), ("a",), ("b", "b")]]
    fin = np.zeros((3, 4), bool)
    a, r = CharClass("a"), ABReward()
    both = token_log_potential(a * r ** 2.0, partials, pieces, fin)
    expected = token_log_potential(a, partials, pieces, fin) + 2.0 * token_log_potential(r, partials, pieces, fin)
    np.testing.assert_array_equal(both, expected)


def test_sample_twisted_tokens_distribution():
    import torch

    logp = torch.log(torch.tensor([[0.5, 0.3, 0.2]] * 20000, dtype=torch.float64))
    psi = np.array([[0.0, np.log(2.0), -np.inf]] * 20000)
    tok, lq, lp, corr = sample_twisted_tokens(logp, psi, 1.0, torch.Generator().manual_seed(0))
    freq = np.bincount(tok.numpy(), minlength=3) / 20000
    np.testing.assert_allclose(freq, [0.5 / 1.1, 0.6 / 1.1, 0.0], atol=0.015)
    np.testing.assert_allclose(corr.numpy(), np.log(1.1) - psi[0][tok.numpy()])


def test_bad_twists():
    lm = BigramLM()
    with pytest.raises(NotImplementedError, match="one token per step"):
        StepModel(lm, "^", step_delimiter="\n", twist=ABReward())
    with pytest.raises(TypeError):
        StepModel(lm, "^", step_delimiter=None, twist=3.0)

    class BadShape:
        def next_token_log_potential(self, partials, pieces, finished):
            return np.zeros((len(partials), 2))

    with pytest.raises(PotentialError, match="shape"):
        pps.smc(StepModel(lm, "^", step_delimiter=None, max_steps=2, twist=BadShape()), 4, seed=0)


def test_no_twist_leaves_the_state_unchanged():
    x = pps.smc(StepModel(BigramLM(), "^", step_delimiter=None, max_steps=3), 8, seed=0).particles
    assert x.log_r is None


# -- backends: HF (generic next_token_logprobs path) and the toy task ---------------------

@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from ppl_scaling.models.hf import HFLanguageModel
    from tiny_llama import build_tiny_llama

    return HFLanguageModel.from_pretrained(build_tiny_llama(tmp_path_factory.mktemp("tiny_llama")))


def test_twisted_proposal_on_an_hf_model(tiny_lm):
    allowed = CharClass("ab")
    gen = StepModel(tiny_lm, "ab", step_delimiter=None, max_steps=6, temperature=0.9, twist=allowed)
    res = pps.smc(Tilted(gen, allowed), 8, ess_threshold=1.0, seed=0)
    x = res.particles
    assert all(set(c) <= {"a", "b"} for c in x.completions())
    assert np.isfinite(res.log_weights).all()
    assert_logp_matches_recompute(tiny_lm, gen.prompt_ids, x)
    plain = pps.smc(Tilted(gen, allowed), 8, ess_threshold=0.0, seed=0)   # no resampling: every token is kept
    assert plain.ledger.tokens == plain.particles.num_tokens.sum()
    assert plain.ledger.forward_passes == plain.particles.num_tokens.max()   # one batched call per token


@pytest.mark.skipif(not (TOY_LM_PATH / "config.json").exists(), reason="the toy LM is not trained (make toy-models)")
def test_toy_task_digits_after_the_answer_marker():
    """Only digits (and the newline) after "A:": twisted, no particle dies."""
    from ppl_scaling.models.hf import HFLanguageModel
    from ppl_scaling.models.toy import load_split

    lm = HFLanguageModel.from_pretrained(TOY_LM_PATH)
    problem = next(p for p in load_split("test") if p.difficulty == 2)
    digits = CharClass("0123456789\n", after="A:")
    gen = StepModel(lm, problem.prompt, step_delimiter=None, max_steps=40, stop=r"A:-?\d+\n", twist=digits)
    res = pps.smc(Tilted(gen, digits), 8, seed=0)
    assert np.isfinite(res.log_weights).all()
    for c in res.particles.completions():
        if "A:" in c:
            assert set(c.split("A:", 1)[1]) <= set("0123456789\n")
