"""HFLanguageModel: loading, KV-cached step sampling equal to a full recompute, resampling
reorders cache rows, fast path equal to the generic path, ledger counts, errors.

The model is a tiny randomly initialised Llama over a 7-token character vocabulary,
saved to a temporary directory and loaded back through ``from_pretrained``."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ppl_scaling import smc
from ppl_scaling.ledger import recording
from ppl_scaling.models.hf import HFLanguageModel, KVContexts
from ppl_scaling.models.lm import Contexts, LanguageModel
from ppl_scaling.models.step import StepModel
from tiny_llama import build_tiny_llama


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return HFLanguageModel.from_pretrained(build_tiny_llama(tmp_path_factory.mktemp("tiny_llama")))


def recomputed_logprob(lm, context, new_ids):
    """log p(new_ids | context) by full forward passes without a cache."""
    if not new_ids:
        return 0.0
    prefixes = [list(context) + list(new_ids[:k]) for k in range(len(new_ids))]
    lp = lm.next_token_logprobs(prefixes)
    return float(lp[torch.arange(len(new_ids)), torch.as_tensor(new_ids)].double().sum())


def test_loads_through_from_pretrained(lm):
    assert lm.eos_token_id == [2]
    assert lm.encode("ab\nc") == [1, 3, 4, 6, 5]
    assert lm.decode(lm.encode("ab\nc")) == "ab\nc"


def test_kv_cached_logprobs_equal_full_recompute(lm):
    """Several steps with rows of different lengths, EOS rows dropped and a resampling
    reorder (with duplicates) between steps: every step's log p equals a recompute."""
    ctx = lm.start([lm.encode("ab"), lm.encode("abca\nba"), lm.encode("")])
    g = torch.Generator().manual_seed(3)
    lengths_differ = False
    for step in range(6):
        s = lm.sample_steps(ctx, step_delimiter="\n", max_step_tokens=7, temperature=0.8, generator=g)
        for r in range(len(ctx)):
            assert s.log_p[r] == pytest.approx(recomputed_logprob(lm, ctx.ids[r], s.token_ids[r]), abs=1e-4)
            assert s.contexts.ids[r] == ctx.ids[r] + tuple(s.token_ids[r])
        lengths_differ |= len({len(t) for t in s.token_ids}) > 1
        alive = np.flatnonzero(~s.eos)
        if alive.size == 0:
            break
        A = np.random.default_rng(step).choice(alive, size=4)  # resample, duplicates likely
        ctx = s.contexts.take(A)
    assert lengths_differ


def test_temperature_proposal_vs_model_logprobs(lm):
    ctx = lm.start([lm.encode("a")] * 3)
    s = lm.sample_steps(ctx, step_delimiter="\n", max_step_tokens=5, temperature=0.5,
                        generator=torch.Generator().manual_seed(0))
    for r in range(3):
        ids, lq = list(ctx.ids[r]), 0.0
        for t in s.token_ids[r]:
            lq += float(torch.log_softmax(lm.next_token_logprobs([ids])[0] / 0.5, -1)[t])
            ids.append(t)
        assert s.log_q[r] == pytest.approx(lq, abs=1e-4)
    assert not np.allclose(s.log_q, s.log_p)


def test_fast_path_equals_generic_path(lm):
    """Same generator seed: the KV-cached sampler draws exactly the tokens the generic
    (recompute-everything) sampler draws, with the same log-probabilities."""
    rows = [lm.encode("ab"), lm.encode("c\nab"), lm.encode("b"), lm.encode("bbb")]
    fast = lm.sample_steps(lm.start(rows), step_delimiter="\n", max_step_tokens=8, temperature=0.9,
                           generator=torch.Generator().manual_seed(7))
    slow = LanguageModel.sample_steps(lm, Contexts(rows), step_delimiter="\n", max_step_tokens=8,
                                      temperature=0.9, generator=torch.Generator().manual_seed(7))
    assert fast.token_ids == slow.token_ids
    assert fast.texts == slow.texts
    np.testing.assert_allclose(fast.log_p, slow.log_p, atol=1e-4)
    np.testing.assert_array_equal(fast.eos, slow.eos)
    np.testing.assert_array_equal(fast.delimited, slow.delimited)


def test_resampled_rows_continue_like_their_ancestors(lm):
    """take(A) then a step == re-encoding the ancestors' tokens from scratch then the same step."""
    s = lm.sample_steps(lm.start([lm.encode("a"), lm.encode("ccb\n"), lm.encode("ab")]), step_delimiter="\n",
                        max_step_tokens=4, generator=torch.Generator().manual_seed(1))
    A = [2, 0, 2, 1, 1]
    resampled = s.contexts.take(A)
    fresh = lm.start([s.contexts.ids[a] for a in A])
    kw = dict(step_delimiter="\n", max_step_tokens=6, temperature=1.0)
    a = lm.sample_steps(resampled, generator=torch.Generator().manual_seed(5), **kw)
    b = lm.sample_steps(fresh, generator=torch.Generator().manual_seed(5), **kw)
    assert a.token_ids == b.token_ids
    np.testing.assert_allclose(a.log_p, b.log_p, atol=1e-4)


def test_one_token_per_step_and_concat(lm):
    ctx = lm.start([lm.encode("a"), lm.encode("abc")])
    s = lm.sample_steps(ctx, step_delimiter=None, max_step_tokens=50, generator=torch.Generator().manual_seed(0))
    assert [len(t) for t in s.token_ids] == [1, 1]
    both = KVContexts.concat([s.contexts, lm.start([lm.encode("b\nb")])])
    assert len(both) == 3 and both.ids[2] == tuple(lm.encode("b\nb"))
    nxt = lm.sample_steps(both, step_delimiter="\n", max_step_tokens=3, generator=torch.Generator().manual_seed(2))
    for r in range(3):
        assert nxt.log_p[r] == pytest.approx(recomputed_logprob(lm, both.ids[r], nxt.token_ids[r]), abs=1e-4)


def test_ledger_counts_of_the_fast_path(lm):
    """start: one pass over the cached prompt tokens; a step: one pass per token position,
    the sampled tokens, and each row's pending token as prefill; a recompute: every token."""
    prompt = lm.encode("ab")
    with recording() as L:
        ctx = lm.start([prompt]).take(np.zeros(4, dtype=np.int64))
    assert (L.forward_passes, L.prefill_tokens, L.tokens) == (1, len(prompt) - 1, 0)
    g = torch.Generator().manual_seed(0)
    with recording() as L:
        s = lm.sample_steps(ctx, step_delimiter="\n", max_step_tokens=5, generator=g)
    assert L.tokens == sum(len(t) for t in s.token_ids)
    assert L.forward_passes == max(len(t) for t in s.token_ids)
    assert L.prefill_tokens == 4
    alive = np.flatnonzero(~s.eos)
    assert alive.size > 0
    with recording() as L:
        s2 = lm.sample_steps(s.contexts.take(alive), step_delimiter="\n", max_step_tokens=5, generator=g)
    assert (L.tokens, L.prefill_tokens) == (sum(len(t) for t in s2.token_ids), alive.size)
    assert L.forward_passes == max(len(t) for t in s2.token_ids)
    with recording() as L:
        lm.next_token_logprobs([prompt, prompt[:2]])
    assert (L.forward_passes, L.prefill_tokens, L.tokens) == (1, len(prompt) + 2, 0)


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFLanguageModel.from_pretrained(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFLanguageModel.from_pretrained(str(tmp_path / "no_such_model"))


def test_bad_inputs(lm, tmp_path):
    with pytest.raises(ValueError, match="at least one token"):
        lm.start([[]])
    with pytest.raises(TypeError, match="KVContexts"):
        lm.sample_steps(Contexts([[1, 3]]), step_delimiter="\n", max_step_tokens=2,
                        generator=torch.Generator())
    with pytest.raises(ValueError, match="unknown dtype"):
        HFLanguageModel.from_pretrained(build_tiny_llama(tmp_path / "m"), dtype="float33")


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_other_architectures_match_full_recompute(lm, arch):
    """The cache layout (explicit positions, holes, reordering) is architecture-agnostic."""
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        if arch == "gpt2":
            model = GPT2LMHeadModel(GPT2Config(vocab_size=7, n_embd=64, n_layer=2, n_head=2, n_positions=256,
                                               bos_token_id=1, eos_token_id=2))
        else:
            model = Qwen2ForCausalLM(Qwen2Config(vocab_size=7, hidden_size=64, intermediate_size=128,
                                                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                                 bos_token_id=1, eos_token_id=2))
    other = HFLanguageModel(model, lm.tokenizer)
    test_kv_cached_logprobs_equal_full_recompute(other)
    test_resampled_rows_continue_like_their_ancestors(other)


class UniformLM(LanguageModel):
    """A custom model that records nothing itself: uniform over the tiny vocabulary."""

    eos_token_id = 2

    def __init__(self, decoder: HFLanguageModel) -> None:
        self.decoder = decoder

    def next_token_logprobs(self, contexts: list[list[int]]) -> torch.Tensor:
        return torch.full((len(contexts), 7), -math.log(7))

    def decode(self, ids) -> str:
        return self.decoder.decode(ids)


@pytest.mark.parametrize("custom", [False, True])
def test_generic_path_records_each_forward_pass_once(lm, custom):
    """One forward pass per token position and the whole rows re-read as prefill, whether the
    model records its own calls (HF's recompute) or not (the generic path records for it)."""
    model = UniformLM(lm) if custom else lm
    rows = [lm.encode("ab"), lm.encode("a"), lm.encode("ab")]
    with recording() as L:
        s = LanguageModel.sample_steps(model, Contexts(rows), step_delimiter="\n", max_step_tokens=4,
                                       generator=torch.Generator().manual_seed(0))
    n = [len(t) for t in s.token_ids]
    assert len(set(n)) > 1  # rows stop at different positions
    assert L.forward_passes == max(n)
    assert L.tokens == sum(n)
    assert L.prefill_tokens == sum(len(r) + k for r, n_r in zip(rows, n) for k in range(n_r))


def test_smc_run_ledger_counts_every_sampled_token(lm):
    """Plain sampling (no potential, no resampling): the run's ledger holds exactly the
    tokens its particles carry, and equals what a recording around the run sees."""
    fk = StepModel(lm, "ab", step_delimiter="\n", max_steps=4, max_step_tokens=5, temperature=0.9)
    with recording() as L:
        res = smc(fk, 6, seed=0)
    assert res.ledger.tokens == L.tokens == sum(len(t) for t in res.particles.token_ids) > 0
    assert res.ledger.forward_passes == L.forward_passes > 0
    assert res.ledger.prefill_tokens == L.prefill_tokens >= 6


# --- context length -------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_path(tmp_path_factory):
    """The tiny Llama with a 16-position context (RoPE: the limit changes no weight)."""
    import json

    path = build_tiny_llama(tmp_path_factory.mktemp("tiny_llama_16"))
    cfg = json.loads((path / "config.json").read_text())
    cfg["max_position_embeddings"] = 16
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_context_length_is_read_from_config_or_tokenizer(lm, short_path):
    from ppl_scaling.models.hf import hf_context_length

    assert lm.context_length == 512                       # the config's max_position_embeddings
    assert lm.tokenizer.model_max_length > 10**20         # the tokenizer's "unset" sentinel ...
    assert HFLanguageModel.from_pretrained(short_path).context_length == 16
    assert HFLanguageModel.from_pretrained(short_path, context_length=8).context_length == 8

    class Cfg:  # no position limit in the config: the tokenizer's real one, never the sentinel
        pass

    class Model:
        config = Cfg()

    class Tok:
        model_max_length = 4096

    assert hf_context_length(Model(), Tok()) == 4096
    Tok.model_max_length = int(1e30)
    assert hf_context_length(Model(), Tok()) is None      # ... is ignored
    Cfg.n_positions = 1024
    assert hf_context_length(Model(), Tok()) == 1024
    with pytest.raises(ValueError, match="truncate"):
        HFLanguageModel.from_pretrained(short_path, truncate="right")
    with pytest.raises(ValueError, match="context_length"):
        HFLanguageModel.from_pretrained(short_path, context_length=0)


def test_over_long_inputs_are_refused_with_the_lengths(short_path):
    from ppl_scaling.models.lm import ContextLengthError

    lm = HFLanguageModel.from_pretrained(short_path)
    with pytest.raises(ContextLengthError, match=r"20 tokens.*16 tokens") as err:
        lm.start([lm.encode("abc" * 6 + "a")])            # BOS + 19 characters
    assert (err.value.length, err.value.limit) == (20, 16)
    assert isinstance(err.value, ValueError)
    ctx = lm.start([lm.encode("abcabcabc")])              # 10 tokens
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ContextLengthError, match=r"10 tokens plus 8 new tokens \(18\).*16 tokens"):
        lm.sample_steps(ctx, step_delimiter="\n", max_step_tokens=8, generator=g)
    s = lm.sample_steps(ctx, step_delimiter="\n", max_step_tokens=6, generator=g)  # 16: fits
    assert len(s.contexts.ids[0]) <= 16
    with pytest.raises(ContextLengthError, match="17 tokens"):
        lm.next_token_logprobs([lm.encode("abcd" * 4)])
    with pytest.raises(ContextLengthError, match="no room"):
        lm.sample_steps(lm.start([[1]]), step_delimiter="\n", max_step_tokens=16, generator=g)
    # a run that outgrows the context fails with the lengths, not deep inside the model
    fk = StepModel(lm, "abcab", step_delimiter="\n", max_steps=8, max_step_tokens=4)
    with pytest.raises(ContextLengthError, match="exceeds the context length of 16 tokens"):
        smc(fk, 3, seed=0)


def test_left_truncation_when_asked(short_path):
    lm = HFLanguageModel.from_pretrained(short_path, truncate="left")
    full = lm.encode("abc" * 6 + "a")                     # 20 tokens
    ctx = lm.start([full, lm.encode("ab")])
    assert ctx.ids[0] == tuple(full[-16:]) and ctx.ids[1] == tuple(lm.encode("ab"))
    g = torch.Generator().manual_seed(1)
    with recording() as L:
        s = lm.sample_steps(ctx, step_delimiter="\n", max_step_tokens=5, generator=g)
    assert s.contexts.ids[0][:11] == tuple(full[-11:])    # re-encoded from its last 16 - 5 tokens
    assert s.contexts.ids[1][:3] == tuple(lm.encode("ab"))  # a row that fits is untouched
    assert L.prefill_tokens >= 10                         # the re-encoding is on the ledger
    for r, context in enumerate((full[-11:], lm.encode("ab"))):
        assert s.log_p[r] == pytest.approx(recomputed_logprob(lm, context, s.token_ids[r]), abs=1e-4)
    lp = lm.next_token_logprobs([full])
    assert torch.allclose(lp, lm.next_token_logprobs([full[-16:]]))
    # a whole run keeps going past the context, each step reading the last tokens
    res = smc(StepModel(lm, "abcab", step_delimiter="\n", max_steps=8, max_step_tokens=4), 3, seed=0)
    assert max(len(t) for t in res.particles.token_ids) + len(lm.encode("abcab")) > 16
