"""Sampling controls (temperature, top-p, top-k, min-p): validation, the truncated proposal
against an explicit computation (bigram LM, tiny HF Llama), vLLM's order of operations,
SMC exactness over the truncated proposal (enumeration), and what the engines are sent.

The reference ``explicit_proposal`` is written independently of ``process_logprobs``: in
float64, descending order, "the mass above a token" for top-p. vLLM's order (its
``Sampler.sample``): temperature, min-p, top-k, top-p."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import ppl_scaling as pps
from ppl_scaling import Tilted
from ppl_scaling.models.harness import MethodConfig
from ppl_scaling.models.hf import HFLanguageModel
from ppl_scaling.models.lm import Contexts, LanguageModel, check_sampling, process_logprobs, sample_tokens
from ppl_scaling.models.step import StepModel
from ppl_scaling.models.twist import CharClass
from ppl_scaling.models.types import Partial
from test_step_model import BIGRAM, CHARS, ABReward, BigramLM
from tiny_llama import build_tiny_llama


def explicit_proposal(p, temperature=1.0, top_p=1.0, top_k=None, min_p=0.0):
    """The truncated, renormalised, tempered proposal of a probability vector ``p``, by hand."""
    p = np.asarray(p, dtype=np.float64)
    q = np.where(p > 0, p, 0.0) ** (1.0 / temperature)
    q = q / q.sum()
    keep = q > 0
    if min_p > 0:                                   # 1. min-p, relative to the most probable token
        keep &= q >= min_p * q.max()
    if top_k:                                       # 2. top-k, ties with the k-th value kept
        kth = np.sort(np.where(keep, q, -1.0))[::-1][min(top_k, len(q)) - 1]
        keep &= q >= kth
    if top_p < 1:                                   # 3. top-p on the renormalised survivors
        r = np.where(keep, q, 0.0) / np.where(keep, q, 0.0).sum()
        order = np.argsort(-r, kind="stable")
        above = np.concatenate([[0.0], np.cumsum(r[order])[:-1]])
        drop = np.zeros(len(q), bool)
        drop[order] = above >= top_p
        keep &= ~drop
    out = np.where(keep, q, 0.0)
    return out / out.sum()


CONTROLS = [dict(top_p=0.75), dict(top_k=2), dict(min_p=0.45), dict(top_k=1),
            dict(temperature=0.8, top_p=0.8, min_p=0.3), dict(temperature=1.7, top_k=2, top_p=0.9),
            dict(temperature=0.5, min_p=0.05, top_k=3, top_p=0.95)]


# -- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    (dict(top_p=0.0), "top_p must be in"), (dict(top_p=1.5), "top_p must be in"), (dict(top_p=-0.1), "top_p"),
    (dict(top_p=float("nan")), "top_p"), (dict(top_k=-1), "top_k must be an integer"),
    (dict(top_k=2.5), "top_k must be an integer"), (dict(top_k=True), "top_k"), (dict(min_p=1.0), "min_p must be in"),
    (dict(min_p=-0.2), "min_p"), (dict(temperature=0.0), "temperature must be positive"),
])
def test_invalid_controls_are_refused_clearly(kw, match):
    with pytest.raises(ValueError, match=match):
        check_sampling(**{"temperature": 1.0, **kw})
    with pytest.raises(ValueError, match=match):
        StepModel(BigramLM(), "^", step_delimiter=None, **kw)
    with pytest.raises(ValueError, match=match):
        BigramLM().sample_steps(Contexts([[0]]), step_delimiter=None, max_step_tokens=1,
                                generator=torch.Generator().manual_seed(0), **kw)
    with pytest.raises(ValueError, match=match):
        MethodConfig(step_delimiter=None, **kw).step_model(BigramLM(), "^")


def test_off_values_are_normalised():
    assert check_sampling(0.7, 1.0, 0, 0.0) == (0.7, 1.0, None, 0.0)
    assert check_sampling(1, 1, np.int64(5), 0) == (1.0, 1.0, 5, 0.0)
    gen = StepModel(BigramLM(), "^", step_delimiter=None, top_k=0)
    assert gen._controls == {} and gen.top_k is None
    gen = MethodConfig(top_p=0.9, top_k=20, min_p=0.05).step_model(BigramLM(), "^")
    assert (gen.top_p, gen.top_k, gen.min_p) == (0.9, 20, 0.05)


def test_twisted_proposals_refuse_truncation():
    with pytest.raises(NotImplementedError, match="top_p / top_k / min_p"):
        StepModel(BigramLM(), "^", step_delimiter=None, twist=CharClass("ab"), top_p=0.9)
    StepModel(BigramLM(), "^", step_delimiter=None, twist=CharClass("ab"), top_p=1.0, top_k=None)  # off: fine


# -- the proposal against the explicit computation ------------------------------------------


@pytest.mark.parametrize("kw", CONTROLS)
def test_proposal_equals_the_explicit_truncated_distribution(kw):
    logp = torch.log(torch.as_tensor(BIGRAM[:3]))
    for dtype in (torch.float32, torch.float64):
        log_q, log_p = process_logprobs(logp.to(dtype), **kw)
        assert log_q.dtype == dtype
        for row in range(3):
            want = explicit_proposal(BIGRAM[row], **kw)
            np.testing.assert_allclose(log_q[row].exp().double().numpy(), want, atol=1e-6)
            assert (torch.isneginf(log_q[row]).numpy() == (want == 0)).all()   # q = 0 exactly outside
            np.testing.assert_allclose(log_p[row].exp().double().numpy(), BIGRAM[row], atol=1e-6)


def test_top_k_keeps_ties_and_top_k_one_is_greedy():
    # row 1 = (., .3, .4, .3): top-2 keeps both tokens tied at .3, as vLLM does
    log_q, _ = process_logprobs(torch.log(torch.as_tensor(BIGRAM[1:2])), top_k=2)
    assert torch.isfinite(log_q).sum() == 3
    log_q, _ = process_logprobs(torch.log(torch.as_tensor(BIGRAM[2:3])), top_k=1)
    assert log_q[0, 1] == 0.0 and torch.isneginf(log_q[0, [0, 2, 3]]).all()


def test_order_of_operations_is_vllms():
    """min-p before top-p (vLLM's Sampler.sample): the two orders keep different sets here."""
    p = np.array([0.5, 0.3, 0.12, 0.08])
    log_q, _ = process_logprobs(torch.log(torch.as_tensor(p))[None], min_p=0.2, top_p=0.85)
    kept = torch.isfinite(log_q[0]).numpy()
    np.testing.assert_array_equal(kept, [True, True, False, False])        # min-p drops .08, then top-p .12
    np.testing.assert_allclose(log_q[0].exp().numpy(), explicit_proposal(p, min_p=0.2, top_p=0.85), atol=1e-12)
    top_p_first = explicit_proposal(p, top_p=0.85)                          # would keep .12
    assert (top_p_first > 0).sum() == 3
    # top-k reads the distribution left by min-p; top-p the one left by both
    q, _ = process_logprobs(torch.log(torch.as_tensor(p))[None], top_k=3, top_p=0.9)
    np.testing.assert_allclose(q[0].exp().numpy(), explicit_proposal(p, top_k=3, top_p=0.9), atol=1e-12)


@pytest.mark.parametrize("kw", CONTROLS[:5])
def test_sampled_tokens_follow_the_truncated_proposal(kw):
    """sample_tokens draws from the explicit distribution (frequencies within 5 standard errors)
    and reports its log q; tokens outside the kept set never appear."""
    kw = {"temperature": 1.0, **kw}
    n = 20000
    logp = torch.log(torch.as_tensor(BIGRAM[[0, 1, 2]])).repeat_interleave(n, 0)
    tau = kw.pop("temperature")
    tok, lq, lp = sample_tokens(logp, tau, torch.Generator().manual_seed(0), **kw)
    for row in range(3):
        want = explicit_proposal(BIGRAM[row], temperature=tau, **kw)
        t = tok[row * n:(row + 1) * n].numpy()
        freq = np.bincount(t, minlength=4) / n
        assert (freq[want == 0] == 0).all()
        se = np.sqrt(want * (1 - want) / n) + 1e-12
        assert (np.abs(freq - want) < 5 * se + 1e-9).all(), (row, freq, want)
        np.testing.assert_allclose(lq[row * n:(row + 1) * n].exp().double().numpy(), want[t], atol=1e-6)
        np.testing.assert_allclose(lp[row * n:(row + 1) * n].exp().double().numpy(), BIGRAM[row][t], atol=1e-6)


def test_step_log_q_is_the_truncated_proposal_on_the_bigram_lm():
    kw = dict(temperature=0.8, top_p=0.8, min_p=0.3)
    x = pps.smc(StepModel(BigramLM(), "^", step_delimiter=None, max_steps=4, **kw), 64, seed=0).particles
    for ids, lq, lp in zip(x.token_ids, x.log_q, x.log_p):
        prev, want_q, want_p = 0, 0.0, 0.0
        for t in ids:
            q = explicit_proposal(BIGRAM[prev], **kw)
            assert q[t] > 0
            want_q, want_p, prev = want_q + np.log(q[t]), want_p + np.log(BIGRAM[prev, t]), t
        assert lq == pytest.approx(want_q, abs=1e-5) and lp == pytest.approx(want_p, abs=1e-5)


# -- SMC exactness over the truncated proposal (enumeration) ---------------------------------


def exact_truncated_posterior(T, kw, target, lam):
    """π ∝ base(x) exp(lam r(x)); base = the truncated proposal q (target="tempered") or the
    model restricted to q's support, p(x) 1[q(x) > 0] (target="model")."""
    Q = np.array([explicit_proposal(BIGRAM[r], **kw) for r in range(3)])
    reward, post = ABReward(), {}
    for k in range(1, T + 1):
        for toks in itertools.product([1, 2, 3], repeat=k):
            if 3 in toks[:-1] or (k < T and toks[-1] != 3):
                continue
            prev, prob = 0, 1.0
            for t in toks:
                prob *= (Q[prev, t] if target == "tempered" else BIGRAM[prev, t] * (Q[prev, t] > 0))
                prev = t
            if prob == 0:
                continue
            steps = tuple(CHARS[t] if t != 3 else "" for t in toks)
            post[steps] = prob * np.exp(lam * reward.score([Partial("^", steps, True)], np.array([True]))[0])
    Z = sum(post.values())
    return {s: v / Z for s, v in post.items()}, Z


@pytest.mark.parametrize("target, seed", [("tempered", 3), ("model", 4)])
def test_smc_over_the_truncated_proposal_is_exact(target, seed):
    """E[Z_hat / Z] = 1 and E[(Z_hat / Z) Σ W 1{x = s}] = π(s) over independent runs, with π the
    truncated proposal tilted by the reward (tempered), or the model restricted to the
    proposal's support, tilted (model: what p / q corrects to under truncation)."""
    kw, T, R, N = dict(temperature=0.8, top_p=0.8, min_p=0.3), 4, 300, 16
    post, Z = exact_truncated_posterior(T, kw, target, 1.0)
    keys = {s: i for i, s in enumerate(post)}
    fk = Tilted(StepModel(BigramLM(), "^", step_delimiter=None, max_steps=T, target=target, **kw), ABReward(),
                shape="difference", lam=1.0)
    rng = np.random.default_rng(seed)
    ratio, mass, lengths = np.zeros(R), np.zeros((R, len(keys))), set()
    for r in range(R):
        res = pps.smc(fk, N, ess_threshold=0.5, rng=rng)
        ratio[r] = np.exp(res.log_evidence - np.log(Z))
        for w, s in zip(res.weights, res.particles.steps):
            mass[r, keys[s]] += ratio[r] * w          # KeyError: a sequence outside the support
            lengths.add(len(s))
    assert len(lengths) > 2
    se = ratio.std(ddof=1) / np.sqrt(R)
    assert abs(ratio.mean() - 1.0) < 4.5 * se + 1e-9, (ratio.mean(), se)
    pi = np.array(list(post.values()))
    est, est_se = mass.mean(0), mass.std(0, ddof=1) / np.sqrt(R)
    big = pi > 0.01
    z = (est[big] - pi[big]) / np.maximum(est_se[big], 1e-12)
    assert np.abs(z).max() < 4.5, (z, pi[big])


def test_custom_lm_without_controls_still_works_when_they_are_off():
    class OldLM(BigramLM):  # a custom LM whose sample_steps predates the controls
        def sample_steps(self, contexts, *, step_delimiter, max_step_tokens, temperature=1.0, generator):
            return LanguageModel.sample_steps(self, contexts, step_delimiter=step_delimiter,
                                              max_step_tokens=max_step_tokens, temperature=temperature,
                                              generator=generator)

    pps.smc(StepModel(OldLM(), "^", step_delimiter=None, max_steps=2, top_p=1.0, top_k=0, min_p=0.0), 4, seed=0)


# -- the tiny HF Llama -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return HFLanguageModel.from_pretrained(build_tiny_llama(tmp_path_factory.mktemp("tiny_llama_controls")))


def truncated_recompute(lm, context, new_ids, kw):
    """log q and log p of ``new_ids`` after ``context``: full forward passes, explicit proposal."""
    prefixes = [list(context) + list(new_ids[:k]) for k in range(len(new_ids))]
    lp = lm.next_token_logprobs(prefixes).double().exp().numpy()
    lq = sum(np.log(explicit_proposal(lp[k], **kw)[t]) for k, t in enumerate(new_ids))
    return lq, float(sum(np.log(lp[k, t]) for k, t in enumerate(new_ids)))


@pytest.mark.parametrize("kw", [dict(temperature=0.9, top_p=0.7), dict(top_k=2), dict(temperature=1.3, min_p=0.2),
                                dict(temperature=0.8, top_k=3, top_p=0.9, min_p=0.1)])
def test_hf_log_q_equals_a_recompute_of_the_truncated_distribution(hf, kw):
    rows = [hf.encode("ab"), hf.encode("abca\nba"), hf.encode("c")]
    ctx = hf.start(rows).take([0, 1, 2, 0, 1, 2])
    s = hf.sample_steps(ctx, step_delimiter="\n", max_step_tokens=6, generator=torch.Generator().manual_seed(0),
                        **kw)
    for i in range(len(ctx)):
        lq, lp = truncated_recompute(hf, ctx.ids[i], s.token_ids[i], kw)
        assert np.isfinite(s.log_q[i])
        assert s.log_q[i] == pytest.approx(lq, abs=1e-4) and s.log_p[i] == pytest.approx(lp, abs=1e-4)
    # the KV-cached path equals the generic one under the same generator
    slow = LanguageModel.sample_steps(hf, Contexts(ctx.ids), step_delimiter="\n", max_step_tokens=6,
                                      generator=torch.Generator().manual_seed(0), **kw)
    assert slow.token_ids == s.token_ids
    np.testing.assert_allclose(slow.log_q, s.log_q, atol=1e-4)


def test_hf_step_model_with_controls(hf):
    gen = StepModel(hf, "ab", step_delimiter="\n", max_steps=3, max_step_tokens=5, temperature=0.9, top_k=2,
                    target="model")
    res = pps.smc(gen, 8, ess_threshold=0.0, seed=0)   # no resampling: weight = log p - log q
    x = res.particles
    for ids, lq in zip(x.token_ids, x.log_q):
        want, _ = truncated_recompute(hf, gen.prompt_ids, list(ids), dict(temperature=0.9, top_k=2))
        assert lq == pytest.approx(want, abs=1e-4)
    np.testing.assert_allclose(res.log_weights - res.log_weights.max(),
                               (x.log_p - x.log_q) - (x.log_p - x.log_q).max(), atol=1e-6)


# -- what the engines are sent -----------------------------------------------------------------


def test_openai_requests_carry_the_controls_and_neutral_defaults():
    from ppl_scaling.models.openai_backend import OpenAICompatibleLanguageModel

    sent = []

    class Stub(OpenAICompatibleLanguageModel):
        def __init__(self):  # no server: request_steps only
            self.logprobs, self.eos_token_id = True, [2]

        def _fit(self, rows, max_tokens):
            return [list(r) for r in rows]

        def _complete(self, requests):
            sent.extend(body for body, _ in requests)
            return []

    lm = Stub()
    lm.request_steps([[1, 2]], stop="\n", max_tokens=4, temperature=0.7, seeds=[5])
    lm.request_steps([[1, 2]], stop="\n", max_tokens=4, temperature=0.7, seeds=[5], top_p=0.9, top_k=20, min_p=0.05)
    off, on = sent
    assert (off["top_p"], off["top_k"], off["min_p"], off["repetition_penalty"]) == (1.0, -1, 0.0, 1.0)
    assert (off["presence_penalty"], off["frequency_penalty"], off["temperature"]) == (0.0, 0.0, 0.7)
    assert (on["top_p"], on["top_k"], on["min_p"]) == (0.9, 20, 0.05)
