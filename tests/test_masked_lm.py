"""Hugging Face masked LMs through ``HFDenoiser`` / ``MaskedDiffusionModel.from_pretrained`` (tiny
random BERT and ModernBERT built offline, loaded by path), the unmasking schedules (LLaDA's fixed
counts, semi-autoregressive blocks, low-confidence remasking), time conditioning (MDLM), the
transition density checked exactly by enumeration on a tiny vocabulary, and FK steering."""
import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_text_diffusion import IndependentTokens, check_tilted_count, count_ones
from tiny_llama import sharpen

import ppl_scaling as pps
from ppl_scaling.diffusion.masked import MaskedDiffusionModel, MaskedState
from ppl_scaling.diffusion.masked_lm import HFDenoiser, mdlm_sigma
from ppl_scaling.ledger import recording
from ppl_scaling.tilt import Tilted

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = list("abcdefgh")
CONFIGS = [("binomial", "random", None), ("binomial", "low_confidence", None), ("fixed", "random", None),
           ("fixed", "low_confidence", None), ("fixed", "low_confidence", 2), ("binomial", "random", 2)]


def build_masked_lm(path, arch):
    """A random 2-layer BERT or ModernBERT masked LM and a word-level tokenizer with [MASK]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (BertConfig, BertForMaskedLM, ModernBertConfig, ModernBertForMaskedLM,
                              PreTrainedTokenizerFast)

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]")
    size = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=64, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if arch == "bert":
            model = BertForMaskedLM(BertConfig(**size))
        else:
            model = ModernBertForMaskedLM(ModernBertConfig(**size, cls_token_id=2, sep_token_id=3, bos_token_id=2,
                                                           eos_token_id=3, global_attn_every_n_layers=1))
        sharpen(model, 3.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["bert", "modernbert"])
def masked_lm(request, tmp_path_factory):
    return build_masked_lm(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return build_masked_lm(tmp_path_factory.mktemp("bert"), "bert")


def trajectory(mdm, N, rng):
    """The states x_0 .. x_K of one run of the base sampler."""
    xs = [mdm.M0(N, rng)]
    for t in range(1, mdm.T):
        xs.append(mdm.M(t, xs[-1], rng))
    return xs


@pytest.mark.parametrize("schedule, remasking, block_length", CONFIGS)
def test_plumbing(masked_lm, schedule, remasking, block_length):
    """From a path: the mask id from the tokenizer, the prompt "[CLS] a b [SEP]" kept at every step,
    one denoiser evaluation per particle and step, shapes, every mask filled at the end."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(masked_lm)
    mdm = MaskedDiffusionModel.from_pretrained(masked_lm, prompt="a b", gen_length=5, num_steps=6, schedule=schedule,
                                               remasking=remasking, block_length=block_length)
    prompt = torch.tensor(tok("a b")["input_ids"])
    assert mdm.mask_id == tok.mask_token_id == 4 and mdm.L == 9 and isinstance(mdm.denoiser, HFDenoiser)
    N = 16
    with recording() as ledger:
        xs = trajectory(mdm, N, np.random.default_rng(0))
    assert ledger.nfe == N * mdm.K
    for x in xs:
        assert x.tokens.shape == (N, 9) and torch.equal(x.tokens[:, :4], prompt.expand(N, 4))
    assert xs[0].logp.shape == (N, 9, len(SPECIAL) + len(WORDS)) and (xs[0].tokens[:, 4:] == 4).all()
    assert xs[-1].logp is None and (xs[-1].tokens != 4).all()


@pytest.mark.parametrize("schedule, remasking, block_length", CONFIGS)
def test_tokens_revealed_per_step_follow_the_schedule(bert, schedule, remasking, block_length):
    """"fixed": exactly LLaDA's counts (7 positions in 4 steps: 2, 2, 2, 1; blocks of 2 with 2 steps
    each: 1 per step); "binomial": Binomial(m, 1 / r_t) (mean within 5 standard errors); with blocks
    only the current block's positions change and each block is complete at its last step;
    revealed tokens never change."""
    G, K, N = 7, 4 if block_length is None else 8, 400
    mdm = MaskedDiffusionModel.from_pretrained(bert, gen_length=G, num_steps=K, schedule=schedule,
                                               remasking=remasking, block_length=block_length)
    expected = [2, 2, 2, 1] if block_length is None else [1, 1, 1, 1, 1, 1, 1, 0]
    assert mdm.counts == expected
    xs = trajectory(mdm, N, np.random.default_rng(1))
    for t in range(1, K + 1):
        before, after = xs[t - 1].tokens == mdm.mask_id, xs[t].tokens == mdm.mask_id
        new = before & ~after
        assert not (after & ~before).any()
        assert torch.equal(xs[t].tokens[~before], xs[t - 1].tokens[~before])
        if block_length is not None:
            block = torch.arange(G) // block_length == (t - 1) // (K // 4)
            assert not new[:, ~block].any()
            if t % (K // 4) == 0:
                assert not after[:, block].any()
        if schedule == "fixed":
            assert (new.sum(-1) == expected[t - 1]).all()
        else:
            m, q = mdm.eligible(t, xs[t - 1].tokens).sum(-1).double(), 1 / mdm.steps_left(t)
            c = new.sum(-1).double()
            se = math.sqrt(float((m * q * (1 - q)).sum())) + 1e-9
            assert abs(float(c.sum() - (m * q).sum())) < 5 * se + 1e-9


class ContextTable:
    """A fixed random denoiser whose prediction at each position depends on its position and on
    every token of the sequence (vocab 0..2, mask token 3), for exact checks by enumeration."""

    def __init__(self, L, V=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.pos = 1.5 * torch.randn(L, V, generator=g)
        self.ctx = torch.randn(V, V, generator=g)

    def __call__(self, tokens):
        return self.pos + self.ctx[tokens].mean(1, keepdim=True)


def exact_final_law(mdm, states):
    """P(x_K = s) for every s in ``states`` (all (V+1)^L sequences), by forward recursion with the
    transition matrices exp(logpt) (each row checked to sum to one where reachable)."""
    S = len(states)
    law = torch.zeros(S, dtype=torch.float64)
    law[(states == mdm.template).all(-1).nonzero()[0, 0]] = 1.0
    rows, cols = np.arange(S).repeat(S), np.tile(np.arange(S), S)
    for t in range(1, mdm.T):
        xp = MaskedState(states, mdm.predict(states, t - 1)).take(rows)
        P = torch.from_numpy(np.exp(mdm.logpt(t, xp, MaskedState(states[cols], None)))).reshape(S, S)
        reach = law > 0
        np.testing.assert_allclose(P[reach].sum(1).numpy(), 1.0, atol=1e-6)
        law = law @ P
    return law


@pytest.mark.parametrize("denoiser", ["context", "independent"])
@pytest.mark.parametrize("schedule, remasking, block_length", CONFIGS)
def test_transition_density_is_exact(denoiser, schedule, remasking, block_length):
    """On V = 3 tokens + mask, L = 4 with a one-token prompt: exp(logpt) sums to one over all 4^4
    next states, the law of x_K it implies matches the sampler's frequencies (max deviation within
    5 binomial standard errors), and SMC on q(x) exp(lam #ones(x)) estimates E[#ones] and Z of that
    exact law. "independent" (identical predictions at every position) exercises the ties of
    low-confidence remasking."""
    L, K = 4, 3 if block_length is None else 4
    net = ContextTable(L) if denoiser == "context" else IndependentTokens([0.5, 0.2, 0.3])
    mdm = MaskedDiffusionModel(net, L, 3, num_steps=K, schedule=schedule, remasking=remasking,
                               block_length=block_length, prompt=[2])
    states = torch.tensor(list(itertools.product(range(4), repeat=L)))
    law = exact_final_law(mdm, states)
    assert abs(float(law.sum()) - 1) < 1e-6 and float(law[(states == 3).any(-1)].sum()) < 1e-12

    n = 20000
    x = mdm.sample(n, np.random.default_rng(2))
    index = (x * 4 ** torch.arange(L - 1, -1, -1)).sum(-1)
    freq = torch.bincount(index, minlength=len(states)).double() / n
    se = torch.sqrt(law * (1 - law) / n)
    assert ((freq - law).abs() <= 5 * se + 2e-3).all(), float((freq - law).abs().max())

    lam, N, runs = 1.5, 200, 20
    ones = count_ones(states)
    tilted = law * torch.exp(lam * ones)
    exact_mean, exact_logZ = float((tilted * ones).sum() / tilted.sum()), math.log(float(tilted.sum()))
    check_tilted_count(Tilted(mdm, count_ones, lam=lam), exact_mean, exact_logZ, N=N, runs=runs, seed=3)


def test_logpt_broadcasts_and_rules_out_impossible_moves():
    """A 1-particle x is broadcast against every xp; changing a revealed token, revealing outside
    the current block, or (fixed schedule) revealing the wrong number of tokens has density 0;
    ``Tilted`` forwards logpt."""
    mdm = MaskedDiffusionModel(ContextTable(4), 4, 3, num_steps=4, schedule="fixed", remasking="low_confidence",
                               block_length=2)
    x0 = mdm.M0(5, np.random.default_rng(0))
    x1 = mdm.M(1, x0, np.random.default_rng(1))
    lp = mdm.logpt(1, x0, x1.take(np.array([0])))
    assert lp.shape == (5,) and np.isfinite(lp).all()
    for bad in ([[3, 3, 0, 3]], [[0, 1, 3, 3]], [[3, 3, 3, 3]]):      # block 0: 1 token per step
        assert np.isneginf(mdm.logpt(1, x0, MaskedState(torch.tensor(bad), None))).all()
    x2 = mdm.M(2, x1, np.random.default_rng(2))
    changed = x2.tokens.clone()
    changed[:, :2] = (changed[:, :2] + 1) % 3
    assert np.isneginf(mdm.logpt(2, x1, MaskedState(changed, None))).all()
    fk = Tilted(mdm, count_ones, lam=1.0)
    s0 = fk.M0(5, np.random.default_rng(0))
    assert fk.logpt(1, s0, fk.M(1, s0, np.random.default_rng(1))).shape == (5,)


def test_particle_gibbs_with_ancestor_sampling_runs():
    """logpt and ``MaskedState.where`` are what particle Gibbs' ancestor sampling and frozen slots
    need: the reference paths keep the prompt and end with every mask filled."""
    from ppl_scaling.samplers.particle_gibbs import particle_gibbs

    mdm = MaskedDiffusionModel(ContextTable(4), 4, 3, num_steps=3, schedule="fixed", remasking="low_confidence",
                               prompt=[2])
    out = particle_gibbs(Tilted(mdm, count_ones, lam=1.0, shape="last"), 4, 3, ancestor_sampling=True, seed=0)
    for path in out.trajectories:
        assert all(int(x.tokens[0, 0]) == 2 for x in path) and (path[-1].tokens != 3).all()


class TinyMDLM(torch.nn.Module):
    """MDLM's interface: forward(input_ids, timesteps) -> MaskedLMOutput-like (logits), mask = V - 1."""

    def __init__(self, V=5):
        super().__init__()
        self.config = SimpleNamespace(model_type="mdlm", vocab_size=V)
        self.proj = torch.nn.Embedding(V, V)
        self.seen = []

    def forward(self, input_ids, timesteps=None):
        self.seen.append(timesteps.clone())
        return SimpleNamespace(logits=self.proj(input_ids) + timesteps[:, None, None])


def test_time_conditioning_passes_mdlm_sigma():
    """A forward taking ``timesteps`` gets sigma(s) = -log(1 - (1 - 1e-3) s) at s = 1 - t/K for the
    states t = 0..K-1; the mask id of an "mdlm" config is its last token; micro-batches give the
    same logits."""
    net = TinyMDLM()
    mdm = MaskedDiffusionModel.from_pretrained(net, gen_length=6, num_steps=4, batch_size=3)
    assert mdm.mask_id == 4 and mdm.denoiser.time_conditioning
    mdm.sample(7, np.random.default_rng(0))
    assert [len(s) for s in net.seen] == [3, 3, 1] * 4
    per_step = torch.stack([torch.cat(net.seen[3 * t: 3 * t + 3]) for t in range(4)])
    expected = mdlm_sigma(1 - torch.arange(4.0) / 4)
    torch.testing.assert_close(per_step, expected[:, None].expand(4, 7))
    tokens = torch.randint(0, 5, (7, 6))
    s = torch.rand(7)
    whole = HFDenoiser(net, 4)(tokens, s)
    torch.testing.assert_close(HFDenoiser(net, 4, batch_size=2)(tokens, s), whole)
    assert not HFDenoiser(net, 4, time_conditioning=False).time_conditioning


def mean_reward(fk, N, runs, rng, token):
    """The weighted mean count of ``token`` of each of ``runs`` independent SMC runs with N particles."""
    out = []
    for _ in range(runs):
        res = pps.smc(fk, N, rng=rng)
        out.append(float(np.sum(res.weights * (res.particles.tokens == token).double().sum(-1).numpy())))
    return np.array(out)


@pytest.mark.parametrize("schedule, remasking, block_length", [("binomial", "random", None),
                                                               ("fixed", "low_confidence", 3)])
def test_fk_steering_raises_the_reward(bert, schedule, remasking, block_length):
    """r = count of the word "a" in 6 generated tokens: FK steering at lam = 3 beats lam = 0 at the
    same N = 8 by more than 4 standard errors of the run-to-run spread (12 runs each)."""
    a = 5
    mdm = MaskedDiffusionModel.from_pretrained(bert, prompt="b c", gen_length=6, num_steps=6, schedule=schedule,
                                               remasking=remasking, block_length=block_length)

    def count_a(tokens):
        return (tokens == a).double().sum(-1)

    rng = np.random.default_rng(4)
    base = mean_reward(Tilted(mdm, count_a, lam=0.0), 8, 12, rng, a)
    steered = mean_reward(Tilted(mdm, count_a, lam=3.0), 8, 12, rng, a)
    se = math.hypot(base.std(ddof=1) / math.sqrt(12), steered.std(ddof=1) / math.sqrt(12))
    assert steered.mean() - base.mean() > 4 * se, (base.mean(), steered.mean(), se)


def test_bad_input():
    net = IndependentTokens([0.5, 0.5])
    with pytest.raises(ValueError, match="schedule"):
        MaskedDiffusionModel(net, 4, 2, schedule="cosine")
    with pytest.raises(ValueError, match="remasking"):
        MaskedDiffusionModel(net, 4, 2, remasking="top_k")
    with pytest.raises(ValueError, match="block_length"):
        MaskedDiffusionModel(net, 4, 2, block_length=0)
    with pytest.raises(ValueError, match="multiple of the number of blocks"):
        MaskedDiffusionModel(net, 4, 2, num_steps=3, block_length=2)
    with pytest.raises(ValueError, match="more than seq_len"):
        MaskedDiffusionModel(net, 4, 2, prompt=[0, 1, 0, 1, 0])
    with pytest.raises(ValueError, match="nothing to generate"):
        MaskedDiffusionModel(net, 4, 2, prompt=[0, 1, 0, 1])
    with pytest.raises(ValueError, match="temperature"):
        MaskedDiffusionModel(net, 4, 2, temperature=0.0)
    with pytest.raises(ValueError, match="mask_token_id"):
        MaskedDiffusionModel.from_pretrained(torch.nn.Linear(2, 2), gen_length=4)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        MaskedDiffusionModel.from_pretrained(TinyMDLM(), prompt="a b", gen_length=4)
    with pytest.raises(ValueError, match="batch_size"):
        HFDenoiser(TinyMDLM(), 4, batch_size=0)
