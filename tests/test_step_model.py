"""StepModel (dynamics) tilted by a potential: SMC over a bigram language model matches
the brute-force posterior and its evidence estimate is unbiased; resampling keeps KV
caches right; the ledger counts the work; errors.

Exactness is tested through the unbiasedness identities of SMC, which hold for any
number of particles N: over independent runs r,
    E[Z_hat_r / Z] = 1    and    E[(Z_hat_r / Z) Σ_i W_ri 1{x_ri = s}] = π(s),
with tolerances of 4.5 Monte Carlo standard errors (estimated from the runs).
"""
from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch

import ppl_scaling as pps
from ppl_scaling import Tilted
from ppl_scaling.errors import PotentialError
from ppl_scaling.models.hf import HFLanguageModel
from ppl_scaling.models.lm import LanguageModel
from ppl_scaling.models.step import StepModel
from ppl_scaling.models.toy import TOY_LM_PATH
from ppl_scaling.models.types import Partial
from ppl_scaling.potentials import Potential
from tiny_llama import build_tiny_llama

# Tokens: 0 = "^" (BOS), 1 = "a", 2 = "b", 3 = EOS. Row = previous token.
BIGRAM = np.array([[0.0, 0.5, 0.3, 0.2],
                   [0.0, 0.3, 0.4, 0.3],
                   [0.0, 0.6, 0.15, 0.25],
                   [0.25, 0.25, 0.25, 0.25]])
CHARS = "^ab"


class BigramLM(LanguageModel):
    """The smallest custom LanguageModel: a bigram table, with EOS."""

    eos_token_id = 3

    def next_token_logprobs(self, contexts):
        return torch.log(torch.as_tensor(BIGRAM[[c[-1] for c in contexts]]))

    def encode(self, text):
        return [CHARS.index(ch) for ch in text]

    def decode(self, ids):
        return "".join(CHARS[i] for i in ids if i in (1, 2))


class ABReward(Potential):
    """Rewards prefixes with many a's; a finished generation ending in "b" gets a bonus."""

    def prefix(self, partials):
        return np.array([0.6 * p.completion.count("a") - 0.4 * p.completion.count("b") for p in partials])

    def complete(self, partials):
        return self.prefix(partials) + np.array([0.9 if p.completion.endswith("b") else 0.0 for p in partials])


def exact_posterior(T, temperature, target, lam):
    """π(steps) ∝ base(x) exp(lam r(x)) over every generation of at most T one-token steps."""
    q = BIGRAM ** (1.0 / temperature)
    q = q / q.sum(1, keepdims=True)
    base = BIGRAM if target == "model" else q
    reward = ABReward()
    post = {}
    for k in range(1, T + 1):
        for toks in itertools.product([1, 2, 3], repeat=k):
            if 3 in toks[:-1] or (k < T and toks[-1] != 3):
                continue  # EOS only at the end; without EOS the generation runs to T steps
            prev, prob = 0, 1.0
            for t in toks:
                prob, prev = prob * base[prev, t], t
            steps = tuple(CHARS[t] if t != 3 else "" for t in toks)
            r = reward.score([Partial("^", steps, True)], np.array([True]))[0]
            post[steps] = prob * np.exp(lam * r)
    Z = sum(post.values())
    return {s: v / Z for s, v in post.items()}, Z


def check_unbiased(fk, post, Z, *, R, N, ess_threshold, seed, min_lengths=3):
    """Over R runs: E[Z_hat / Z] = 1 and E[(Z_hat / Z) Σ_i W_i 1{x_i = s}] = pi(s) for every likely s,
    within 4.5 Monte Carlo standard errors; finished particles have at least ``min_lengths`` lengths."""
    keys = {s: i for i, s in enumerate(post)}
    rng = np.random.default_rng(seed)
    ratio, mass = np.zeros(R), np.zeros((R, len(keys)))
    lengths = set()
    for r in range(R):
        res = pps.smc(fk, N, ess_threshold=ess_threshold, rng=rng)
        ratio[r] = np.exp(res.log_evidence - np.log(Z))
        for w, s in zip(res.weights, res.particles.steps):
            if w > 0:
                mass[r, keys[s]] += ratio[r] * w
            lengths.add(len(s))
    assert len(lengths) >= min_lengths, "finished particles should have different lengths"
    se = ratio.std(ddof=1) / np.sqrt(R)
    assert abs(ratio.mean() - 1.0) < 4.5 * se + 1e-9, (ratio.mean(), se)   # 1e-9: exact runs have se = 0
    pi = np.array(list(post.values()))
    est, est_se = mass.mean(0), mass.std(0, ddof=1) / np.sqrt(R)
    big = pi > 0.01
    z = (est[big] - pi[big]) / est_se[big]
    assert np.abs(z).max() < 4.5, (z, pi[big])
    return ratio


def check_smc_against_enumeration(R, N, T, *, temperature, target, shape, lam, ess_threshold, seed):
    post, Z = exact_posterior(T, temperature, target, lam)
    fk = Tilted(StepModel(BigramLM(), "^", step_delimiter=None, max_steps=T, temperature=temperature,
                          target=target), ABReward(), shape=shape, lam=lam)
    check_unbiased(fk, post, Z, R=R, N=N, ess_threshold=ess_threshold, seed=seed)


def test_smc_matches_enumerated_posterior_and_unbiased_evidence():
    check_smc_against_enumeration(R=300, N=16, T=4, temperature=1.0, target="tempered", shape="difference",
                                  lam=1.0, ess_threshold=0.5, seed=0)


def test_temperature_correction_targets_the_model():
    """Sampling at τ = 0.6 with target="model" weights by p / q_τ: the posterior is p · exp(r)."""
    check_smc_against_enumeration(R=300, N=16, T=4, temperature=0.6, target="model", shape="max",
                                  lam=1.0, ess_threshold=1.0, seed=1)


def test_tempered_target_without_correction():
    """target="tempered" (the PF paper's choice): the posterior is q_τ · exp(r)."""
    check_smc_against_enumeration(R=300, N=16, T=3, temperature=0.6, target="tempered", shape="difference",
                                  lam=0.5, ess_threshold=1.0, seed=2)


def test_plain_sampling_and_the_ledger():
    fk = StepModel(BigramLM(), "^", step_delimiter=None, max_steps=5)
    res = pps.smc(fk, 64, ess_threshold=0.0, seed=0)
    np.testing.assert_array_equal(res.log_weights, 0.0)
    assert res.log_evidence == pytest.approx(0.0)
    x = res.particles
    assert res.ledger.tokens == x.num_tokens.sum()
    assert res.ledger.reward_calls == 0
    assert res.ledger.forward_passes >= x.num_tokens.max()  # one pass per token position at least
    assert all(p.finished for p in x.partials())
    assert fk.texts(x)[0] == "^" + x.completions()[0]
    assert fk.view(0, x) == x.partials()


def test_the_tilt_scores_moved_particles_once_per_step():
    """reward_calls = the number of (particle, step) moves: finished particles are frozen."""
    fk = Tilted(StepModel(BigramLM(), "^", step_delimiter=None, max_steps=5), ABReward())
    res = pps.smc(fk, 64, ess_threshold=0.0, seed=0)
    x = res.particles
    assert res.ledger.reward_calls == sum(len(s) for s in x.steps)
    np.testing.assert_allclose(res.log_weights, ABReward().score(x.partials(), x.finished))  # difference: r(x)
    np.testing.assert_allclose(x.reward, res.log_weights)  # the tilt carries the final rewards


def test_delimiter_never_produced_gives_max_token_steps():
    fk = StepModel(BigramLM(), "^", step_delimiter="\n", max_steps=3, max_step_tokens=2)
    x = pps.smc(fk, 32, seed=0).particles
    for steps, ids in zip(x.steps, x.token_ids):
        assert all(len(s) == 2 for s in steps[:-1])  # 2 tokens, no delimiter
        assert len(ids) in (2 * len(steps) - 1, 2 * len(steps))
        assert ids[-1] == 3 or (len(steps) == 3 and len(ids) == 6)  # EOS, or cut at max_steps


def test_stop_pattern_ends_particles():
    fk = StepModel(BigramLM(), "^", step_delimiter=None, max_steps=10, stop=r"bb")
    x = pps.smc(fk, 64, seed=0).particles
    for c, ids, f in zip(x.completions(), x.token_ids, x.finished):
        assert f
        assert c.endswith("bb") or ids[-1] == 3 or len(ids) == 10
        assert "bb" not in c[:-1]


def test_bad_inputs():
    lm = BigramLM()
    with pytest.raises(ValueError, match="non-empty prompt"):
        StepModel(lm, "")
    with pytest.raises(ValueError, match="step_delimiter"):
        StepModel(lm, "^", step_delimiter="")
    with pytest.raises(ValueError, match="temperature"):
        StepModel(lm, "^", temperature=0.0)
    with pytest.raises(ValueError, match="max_steps"):
        StepModel(lm, "^", max_steps=0)
    with pytest.raises(ValueError, match="target"):
        StepModel(lm, "^", target="posterior")
    with pytest.raises(TypeError, match="potential"):
        StepModel(lm, "^", potential=ABReward())  # dynamics never see a reward: tilt them
    gen = StepModel(lm, "^", step_delimiter=None)
    with pytest.raises(TypeError, match="Potential"):
        Tilted(gen, 3.0)
    with pytest.raises(PotentialError, match="NaN"):
        pps.smc(Tilted(gen, lambda ps: np.full(len(ps), np.nan)), 4, seed=0)
    with pytest.raises(PotentialError, match="shape"):
        pps.smc(Tilted(gen, lambda ps: np.zeros(len(ps) + 1)), 4, seed=0)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return HFLanguageModel.from_pretrained(build_tiny_llama(tmp_path_factory.mktemp("tiny_llama")))


def test_resampling_keeps_kv_caches_with_their_particles(tiny_lm):
    """SMC resampling at every step on the KV-cached model: each final particle's
    accumulated log p equals a full recompute of its token sequence."""
    reward = lambda ps: np.array([p.completion.count("a") - 0.5 * p.completion.count("c") for p in ps])  # noqa: E731
    gen = StepModel(tiny_lm, "ab", step_delimiter="\n", max_steps=5, max_step_tokens=5, temperature=0.8)
    res = pps.smc(Tilted(gen, reward, lam=1.5), 8, ess_threshold=1.0, seed=0, store_history=True)
    x = res.particles
    assert res.resampled[1:].all() and len(set(res.ancestors[1].tolist())) < 8
    assert_logp_matches_recompute(tiny_lm, gen.prompt_ids, x)
    assert len(set(x.num_tokens.tolist())) > 1
    # finished particles hold no cache rows (and so cost no compute)
    assert all(len(h.contexts) == (~h.finished).sum() for h in res.history)
    assert any(0 < h.finished.sum() < 8 for h in res.history)


def assert_logp_matches_recompute(lm, prompt_ids, x):
    for ids, lp in zip(x.token_ids, x.log_p):
        ctx = [prompt_ids + list(ids[:k]) for k in range(len(ids))]
        full = lm.next_token_logprobs(ctx)[torch.arange(len(ids)), torch.as_tensor(ids)].double().sum()
        assert lp == pytest.approx(float(full), abs=1e-4)


def test_particle_gibbs_reference_rows_join_the_kv_batch(tiny_lm):
    """Conditional SMC pins a reference particle from an earlier run into slot 0
    (``StepState.where``, concatenating KV rows of two runs): log-probs stay exact."""
    from ppl_scaling.samplers import particle_gibbs

    reward = lambda ps: np.array([p.completion.count("b") for p in ps], dtype=float)  # noqa: E731
    gen = StepModel(tiny_lm, "ab", step_delimiter="\n", max_steps=4, max_step_tokens=4)
    out = particle_gibbs(Tilted(gen, reward), 4, 3, seed=1)
    assert len(out.trajectories) == 3
    assert_logp_matches_recompute(tiny_lm, gen.prompt_ids, out.particles)   # the last sweep
    for path in out.trajectories:   # the reference drawn from every sweep, at its last step
        assert_logp_matches_recompute(tiny_lm, gen.prompt_ids, path[-1])



class NoModelLogprobs(BigramLM):
    def sample_steps(self, contexts, **kw):
        s = super().sample_steps(contexts, **kw)
        s.log_p[:] = np.nan
        return s


def test_target_model_needs_model_logprobs():
    pps.smc(StepModel(NoModelLogprobs(), "^", step_delimiter=None, max_steps=2), 4, seed=0)  # tempered: fine
    with pytest.raises(ValueError, match="target='tempered'"):
        pps.smc(StepModel(NoModelLogprobs(), "^", step_delimiter=None, max_steps=2, target="model"), 4, seed=0)


@pytest.mark.skipif(not (TOY_LM_PATH / "config.json").exists(), reason="the toy LM is not trained (make toy-models)")
def test_toy_task_end_to_end():
    """The bundled toy LM, loaded by path, steered by the exact step checker: well-formed
    answer lines, and the weighted vote of the particles is the right answer."""
    from ppl_scaling.models.toy import check_steps, extract_answer, load_split

    lm = HFLanguageModel.from_pretrained(TOY_LM_PATH)
    problem = next(p for p in load_split("test") if p.difficulty == 3)
    checker = lambda ps: np.array([0.0 if check_steps(problem.question, p.steps) else -4.0 for p in ps])  # noqa: E731
    gen = StepModel(lm, problem.prompt, step_delimiter="\n", max_steps=problem.difficulty + 3,
                    max_step_tokens=16, stop=r"A:-?\d+\n")
    res = pps.smc(Tilted(gen, checker), 16, seed=0)
    x = res.particles
    assert x.finished.all()
    line = re.compile(r"(\d+[+-]\d+=\d+|A:-?\d+)\n")
    assert sum(all(line.fullmatch(s) for s in steps) for steps in x.steps) >= 12
    votes: dict = {}
    for w, c in zip(res.weights, x.completions()):
        votes[extract_answer(c)] = votes.get(extract_answer(c), 0.0) + w
    assert max(votes, key=votes.get) == problem.answer, votes
    assert res.ledger.tokens == x.num_tokens.sum() and res.ledger.reward_calls >= 16


def test_logpt_is_the_step_log_probability_of_the_proposal():
    """StepModel.logpt: log q_τ of the one-step extension (from the bigram table), -inf for a
    state that does not extend the parent, 0 for a finished parent kept as it is."""
    gen = StepModel(BigramLM(), "^", step_delimiter=None, max_steps=3, temperature=0.7)
    x1 = gen.M0(6, np.random.default_rng(4))
    x2 = gen.M(1, x1, np.random.default_rng(1))
    q = BIGRAM ** (1 / 0.7)
    q = q / q.sum(1, keepdims=True)
    lp = gen.logpt(1, x1, x2)
    for i in range(6):
        prev, new = x1.token_ids[i], x2.token_ids[i]
        expected = 0.0 if x1.finished[i] else np.log(q[prev[-1], new[-1]])
        assert lp[i] == pytest.approx(expected, abs=1e-6)   # float32 log-probs
    shifted = x2.take(np.roll(np.arange(6), 1))   # other particles' extensions
    other = [i for i in range(6) if x2.token_ids[(i - 1) % 6][:1] != x1.token_ids[i]]
    assert other and np.all(np.isneginf(gen.logpt(1, x1, shifted)[other]))


def test_particle_gibbs_with_ancestor_sampling_targets_the_enumerated_posterior():
    """PGAS over the tilted bigram model (path states: ancestor sampling picks among the
    reference's identical parents) samples pi(x) ∝ q(x) exp(r(x)): the frequency of every
    likely generation among the references is within 4.5 batch-means errors of pi."""
    from ppl_scaling.samplers import particle_gibbs

    T = 3
    post, _ = exact_posterior(T, 1.0, "tempered", 1.0)
    fk = Tilted(StepModel(BigramLM(), "^", step_delimiter=None, max_steps=T), ABReward())
    out = particle_gibbs(fk, 4, 1500, ancestor_sampling=True, seed=2)
    assert out.info["ancestor_sampling"] is True
    finals = [path[-1].steps[0] for path in out.trajectories][100:]
    keys = [s for s, p in post.items() if p > 0.03]
    hits = np.array([[f == s for s in keys] for f in finals], dtype=float)
    batches = hits[: len(hits) // 25 * 25].reshape(25, -1, len(keys)).mean(1)
    se = batches.std(0, ddof=1) / np.sqrt(25)
    pi = np.array([post[s] for s in keys])
    assert np.all(np.abs(hits.mean(0) - pi) < 4.5 * se + 1e-9), (hits.mean(0), pi, se)
