"""KV reuse of the separator PRM (ppl_scaling.models.prm_cache, HFStepScorer): scores equal a
full recompute across SMC-like rounds (resampling, rows of different lengths, split calls),
only new tokens are fed and counted, and the store's eviction rules hold. Tiny random models
built offline, float32."""
import os
import string

import numpy as np
import pytest
import torch

from ppl_scaling.ledger import recording
from ppl_scaling.models.prm_cache import PrefixKVStore, full_attention
from ppl_scaling.models.rewards import ProcessRewardModel
from ppl_scaling.models.scorers import HFStepScorer
from ppl_scaling.models.types import Partial

CHARS = string.ascii_letters + string.digits + " +-=:?.|<>/\n"
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
SEP = "<extra_0>"


def _tokenizer(chat_template=True):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", SEP, *CHARS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                  additional_special_tokens=[SEP])
    if chat_template:
        tok.chat_template = TEMPLATE
    return tok


def _model(kind):
    import transformers

    tok = _tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, num_labels=2,
                  pad_token_id=0, initializer_range=0.3)
    cls, cfg = {
        "qwen2_token": (transformers.Qwen2ForTokenClassification, transformers.Qwen2Config),
        "llama_token": (transformers.LlamaForTokenClassification, transformers.LlamaConfig),
        "llama_lm": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
    }[kind]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls(cfg(**common)).eval()
    return model.float(), tok


KINDS = ["qwen2_token", "llama_token", "llama_lm"]


@pytest.fixture(scope="module", params=KINDS)
def prm(request):
    model, tok = _model(request.param)
    options = {"candidate_tokens": ("a", "b")} if request.param == "llama_lm" else {}
    return model, tok, options


def _scorers(model, tok, options, **reuse):
    fresh = HFStepScorer(model, tok, mode="separator", batch_size=3, **options, **reuse)
    full = HFStepScorer(model, tok, mode="separator", reuse_cache=False, **options)
    return fresh, full


def _step(rng):
    return "".join(rng.choice(list("abcxyz0123456789+-= ")) for _ in range(rng.integers(1, 9))) + "\n"


PROMPTS = ["Q: 12+5-3?", "Q: what is 7 times 8 minus 2, please?"]


def _smc_rounds(rng, n=6, rounds=5):
    """Particles (prompt, steps) over ``rounds`` rounds: each round resamples (duplicates,
    drops) and extends every particle by a random step; prompts of different lengths."""
    parts = [(PROMPTS[i % 2], ()) for i in range(n)]
    for _ in range(rounds):
        idx = np.sort(rng.integers(0, n, n))                       # multinomial resampling
        parts = [(parts[i][0], parts[i][1] + (_step(rng),)) for i in idx]
        yield parts


def _key(scorer, prompt, steps):
    """The token ids of the formatted text up to and including its last separator."""
    return tuple(scorer.tokenizer(scorer.format(prompt, steps))["input_ids"][:_key_len(scorer, prompt, steps)])


def _first_round(scorer, parts):
    """(tokens fed, prefixes stored) when nothing is stored yet: each distinct text once, and
    the distinct texts of one prompt share their common prefix before the first separator."""
    fed, stored = 0, set()
    for prompt in {p for p, _ in parts}:
        keys = {_key(scorer, p, s) for p, s in parts if p == prompt}
        fed, stored = fed + sum(len(k) for k in keys), stored | keys
        head = os.path.commonprefix([k[:k.index(scorer.separator_id)] for k in keys])
        if len(keys) > 1 and head:
            fed, stored = fed - (len(keys) - 1) * len(head), stored | {head}
    return fed, stored


def _key_len(scorer, prompt, steps):
    """Tokens of the formatted text up to and including its last separator."""
    ids = scorer.tokenizer(scorer.format(prompt, steps))["input_ids"]
    return len(ids) - ids[::-1].index(scorer.separator_id) if steps else 0


def test_reuse_equals_full_recompute_over_smc_rounds(prm):
    model, tok, options = prm
    assert full_attention(model)
    reuse, full = _scorers(model, tok, options)
    assert reuse.kv_store is not None and full.kv_store is None
    fast, slow = ProcessRewardModel(reuse, transform="p"), ProcessRewardModel(full, transform="p")
    rng = np.random.default_rng(0)
    spread, fed_total, full_total = [], 0, 0
    for t, parts in enumerate(_smc_rounds(rng)):
        xs = [Partial(p, s) for p, s in parts]
        # finished and unfinished particles may reach the scorer as two calls in one step
        split = len(xs) // 3 if t else 0
        with recording() as fed:
            got = np.concatenate(fast.step_scores(xs[:split]) + fast.step_scores(xs[split:]))
        with recording() as read:
            want = np.concatenate(slow.step_scores(xs))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        spread.append(want)
        # exactly the new tokens, once per distinct prefix: after the stored parent's last separator
        expect = (sum(_key_len(reuse, p, s) - _key_len(reuse, p, s[:-1]) for p, s in set(parts)) if t else
                  _first_round(reuse, parts)[0])
        assert fed.reward_tokens == expect
        fed_total, full_total = fed_total + fed.reward_tokens, full_total + read.reward_tokens
    assert np.std(np.concatenate(spread)) > 0.01           # the scores depend on the text
    assert fed_total < full_total / 2


def test_first_limits_the_reused_prefix_and_duplicates_are_fed_once(prm):
    model, tok, options = prm
    reuse, full = _scorers(model, tok, options)
    p, (a, b, c, d) = PROMPTS[0], ("1+2=3\n", "3-1=2\n", "x\n", "yz\n")
    requests = [(p, (a, b, c), 0), (p, (a, b, c), 0), (PROMPTS[1], (d,), 0)]
    with recording() as led:
        got = reuse(requests)
    assert led.reward_tokens == _key_len(reuse, p, (a, b, c)) + _key_len(reuse, PROMPTS[1], (d,))
    for g, w in zip(got, full(requests)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    # (a, b, c) is stored, but scoring steps 1.. must not start after step 1's separator
    later = [(p, (a, b, c), 1), (p, (a, b, d), 2), (p, (a, b, c, d), 3), (p, (a,), 1)]
    with recording() as led:
        got = reuse(later)
    assert [len(g) for g in got] == [2, 1, 1, 0]
    # (a, b, c) from step 1 and (a, b, d) from step 2: nothing stored, but they share the prompt and a
    assert led.reward_tokens == (_key_len(reuse, p, (a, b, c)) + _key_len(reuse, p, (a, b, d))
                                 - (_key_len(reuse, p, (a,)) - 1)
                                 + _key_len(reuse, p, (a, b, c, d)) - _key_len(reuse, p, (a, b, c)))
    for g, w in zip(got, full(later)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_a_text_that_does_not_extend_a_stored_prefix_is_computed_in_full(prm):
    model, tok, options = prm

    def numbered(prompt, steps):  # the header changes with the number of steps: no stored key is a prefix
        return f"{len(steps)}|{prompt}\n" + "".join(s.strip() + SEP for s in steps)

    reuse = HFStepScorer(model, tok, mode="separator", format=numbered, **options)
    full = HFStepScorer(model, tok, mode="separator", format=numbered, reuse_cache=False, **options)
    steps = ("1+2=3\n", "3-1=2\n")
    reuse([(PROMPTS[0], steps[:1], 0)])
    with recording() as led:
        got = reuse([(PROMPTS[0], steps, 1)])
    assert led.reward_tokens == _key_len(reuse, PROMPTS[0], steps)
    np.testing.assert_allclose(got[0], full([(PROMPTS[0], steps, 1)])[0], rtol=1e-5, atol=1e-6)


def test_eviction_keeps_recent_rounds_and_the_token_bound(prm):
    model, tok, options = prm
    reuse, full = _scorers(model, tok, options)
    fast, slow = ProcessRewardModel(reuse, transform="p"), ProcessRewardModel(full, transform="p")
    store, stored = reuse.kv_store, set()
    for t, parts in enumerate(_smc_rounds(np.random.default_rng(1), rounds=4)):
        xs = [Partial(p, s) for p, s in parts]
        np.testing.assert_allclose(np.concatenate(fast.step_scores(xs)), np.concatenate(slow.step_scores(xs)),
                                   rtol=1e-5, atol=1e-6)
        stored |= {_key(reuse, p, s) for p, s in parts} | (set() if t else _first_round(reuse, parts)[1])
        # what is left at step D = t + 1: the prefixes of D - 1 and D steps (the prompts' shared heads have 0)
        depth = {k: k.count(reuse.separator_id) for k in stored}
        assert set(store._entries) == {k for k in stored if t <= depth[k] <= t + 1}
        assert store.tokens == sum(len(k) for k in store._entries)
    bounded, _ = _scorers(model, tok, options, max_cache_tokens=400)  # room for 2 or 3 prefixes
    fast = ProcessRewardModel(bounded, transform="p")
    slow.clear_cache()
    for parts in _smc_rounds(np.random.default_rng(2), rounds=4):
        xs = [Partial(p, s) for p, s in parts]
        np.testing.assert_allclose(np.concatenate(fast.step_scores(xs)), np.concatenate(slow.step_scores(xs)),
                                   rtol=1e-5, atol=1e-6)
        assert 0 < bounded.kv_store.tokens <= 400


def test_prefix_store_rules():
    store = PrefixKVStore(max_tokens=10)
    store.put((1, 2, 3), "kv123", "p", 1)
    store.put((1, 2, 3, 4, 5), "kv12345", "p", 2)
    assert store.longest([1, 2, 3, 4, 5, 6], [3, 5, 6]) == (5, "kv12345")
    assert store.longest([1, 2, 3, 4, 5, 6], [3]) == (3, "kv123")
    assert store.longest([1, 2, 9], [1, 2, 3]) == (0, None)
    store.put(tuple(range(11)), "too long", "p", 3)             # longer than the bound: not stored
    assert len(store) == 2 and store.tokens == 8
    store.put((7, 8, 9), "kv789", "q", 1)                       # 11 tokens: the least recently used goes
    assert list(store._entries) == [(1, 2, 3), (7, 8, 9)] and store.tokens == 6
    store.clear()
    assert len(store) == 0 and store.tokens == 0

    store = PrefixKVStore(max_tokens=None)
    for key, group, depth in [((7, 8, 9), "q", 1), ((1,), "p", 1), ((1, 2), "p", 2), ((1, 3), "p", 2),
                              ((1, 2, 3), "p", 3)]:
        store.put(key, "kv", group, depth)
    store.end_call({"p": 3, "q": 1})                            # p at step 3 keeps depths 2 and 3
    assert list(store._entries) == [(7, 8, 9), (1, 2), (1, 3), (1, 2, 3)]
    store.end_call({"p": 5})                                    # q, not scored, keeps its entry
    assert list(store._entries) == [(7, 8, 9)] and store.tokens == 3
    for _ in range(6):                                          # calls 3-8 score r only
        store.end_call({"r": 1})
    assert len(store) == 1
    store.end_call({"r": 1})                                    # q unscored in 4 x 2 calls (q, r): over
    assert len(store) == 0 and store.tokens == 0 and not store._last_call
    with pytest.raises(ValueError, match="max_tokens"):
        PrefixKVStore(max_tokens=0)


def test_runs_on_other_prompts_sharing_the_scorer_do_not_age_entries(prm):
    """As in models.lockstep: one scorer, a score cache per run, the runs' calls interleaved
    (here 4 runs, so 4 calls between two calls of one run)."""
    model, tok, options = prm
    reuse, full = _scorers(model, tok, options)
    prompts = PROMPTS + ["Q: 1+1?", "Q: 9-3+4?"]
    runs = [ProcessRewardModel(reuse, transform="p") for _ in prompts]
    slow = ProcessRewardModel(full, transform="p")
    rng = np.random.default_rng(3)
    parts = [[(q, ())] * 3 for q in prompts]
    for t in range(4):
        for i, run in enumerate(runs):
            parts[i] = [(p, s + (_step(rng),)) for p, s in parts[i]]
            xs = [Partial(p, s) for p, s in parts[i]]
            with recording() as fed:
                got = np.concatenate(run.step_scores(xs))
            np.testing.assert_allclose(got, np.concatenate(slow.step_scores(xs)), rtol=1e-5, atol=1e-6)
            expect = (sum(_key_len(reuse, p, s) - _key_len(reuse, p, s[:-1]) for p, s in set(parts[i])) if t else
                      _first_round(reuse, parts[i])[0])
            assert fed.reward_tokens == expect


def test_reuse_off_reads_whole_texts_and_sliding_windows_are_not_reused():
    import transformers

    model, tok = _model("llama_token")
    full = HFStepScorer(model, tok, mode="separator", reuse_cache=False)
    steps = ("1+2=3\n", "3-1=2\n")
    with recording() as led:
        full([(PROMPTS[0], steps, 1)])
    assert led.reward_tokens == len(tok(full.format(PROMPTS[0], steps))["input_ids"])
    cfg = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, num_labels=2, pad_token_id=0,
                                   use_sliding_window=True, sliding_window=8, max_window_layers=0)
    sliding = transformers.Qwen2ForTokenClassification(cfg)
    assert not full_attention(sliding)
    assert not full_attention(transformers.MistralForTokenClassification(transformers.MistralConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2)))                                   # Mistral's window applies to every layer
    assert HFStepScorer(sliding, tok, mode="separator").kv_store is None


def test_a_model_that_ignores_the_cache_is_refused():
    model, tok = _model("llama_token")

    class NoCache(torch.nn.Module):  # reads the whole input, never the cache it is given
        def __init__(self):
            super().__init__()
            self.inner, self.config = model, model.config

        def forward(self, input_ids, attention_mask, position_ids, use_cache, cache):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)

    scorer = HFStepScorer(NoCache(), tok, mode="separator")
    with pytest.raises(NotImplementedError, match=r"reuse_cache=False"):
        scorer([(PROMPTS[0], ("1+2=3\n",), 0)])
