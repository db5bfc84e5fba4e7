"""Reward models as potentials (PRMs on tiny random HF models, ORMs, verifiers, judges),
their compute in the ledger, the PF paper's tilt, and answer extraction / equivalence."""
import contextlib
import math

import numpy as np
import pytest
import torch

from ppl_scaling import smc
from ppl_scaling.errors import PotentialError
from ppl_scaling.ledger import record, recording
from ppl_scaling.models.answers import extract_answer, extract_boxed, is_equivalent, normalize_answer
from ppl_scaling.models.rewards import LLMJudge, OutcomeRewardModel, ProcessRewardModel, Verifier, transform_log_p
from ppl_scaling.models.scorers import HFStepScorer
from ppl_scaling.models.step import StepModel
from ppl_scaling.models.types import Partial
from ppl_scaling.potentials import Potential, check_potential
from ppl_scaling.samplers.particle_filtering import paper_tilt, pf_paper
from ppl_scaling.shapes import FKShape
from ppl_scaling.tilt import Tilted

Q = "Q:1+2\n"


def step_prefixes(x):
    return [Partial(x.prompt, x.steps[:k]) for k in range(len(x.steps))]


# --- answers -------------------------------------------------------------------------

@pytest.mark.parametrize("text, answer", [
    ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{\\frac{a^{2}}{b_{1}}} and more", "\\frac{a^{2}}{b_{1}}"),
    ("first \\boxed{3} then \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\boxed 5", "5"),
    ("24+5=29\nA:29\n", "29"),
    ("Q: 1+2\n1+2=3\nA: 3", "3"),
    ("The answer is $12$.", "12"),
    ("Thus the answer is \\boxed{7}.", "7"),
    ("no answer here", None),
    ("unclosed \\boxed{3", None),
    ("A:\n", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_extract_custom_regex_and_boxed():
    assert extract_answer("Final: 42 units; Final: 43", r"Final:\s*(\d+)") == "43"
    assert extract_answer("value=7", r"\d+") == "7"
    assert extract_answer("nothing", r"Final:(\d+)") is None
    assert extract_boxed("\\fbox{x}") == "x"


@pytest.mark.parametrize("a, b, same", [
    ("\\frac{1}{2}", "0.5", True), ("1/2", "0.5", True), ("\\dfrac12", "\\frac{1}{2}", True),
    ("24", "24.0", True), ("1,000", "1000", True), ("1,2", "12", False), ("3", "4", False),
    ("0.333", "1/3", False), ("x+1", "1+x", True), ("\\sqrt{2}/2", "\\frac{\\sqrt 2}{2}", True),
    ("\\text{(B)}", "(B)", True), ("$5$.", "5", True), (None, "3", False), ("", "", False),
])
def test_is_equivalent(a, b, same):
    assert is_equivalent(a, b) is same


def test_normalize_answer():
    assert normalize_answer(" $\\left( 1, 2 \\right)$. ") == "(1,2)"


# --- PRM aggregation and caching on a fake scorer -----------------------------------

P_STEP = {"a\n": 0.9, "b\n": 0.5, "c\n": 0.2, "a\nb\nc\n": 0.3}


class FakeScorer:
    """p(step) from a table, independent of the context; records what it is asked."""

    name = "fake"

    def __init__(self, table=P_STEP):
        self.table, self.requests = table, []

    def __call__(self, requests):
        self.requests.extend(requests)
        return [np.array([self.table[s] for s in steps[first:]]) for _, steps, first in requests]


ABC = Partial(Q, ("a\n", "b\n", "c\n"))


@pytest.mark.parametrize("aggregation, p", [
    ("last", 0.2), ("min", 0.2), ("prod", 0.9 * 0.5 * 0.2), ("model", 0.3),
])
@pytest.mark.parametrize("transform", ["log", "logit", "p"])
def test_prm_aggregation_and_transform(aggregation, p, transform):
    prm = ProcessRewardModel(FakeScorer(), aggregation=aggregation, transform=transform)
    expect = {"log": math.log(p), "logit": math.log(p / (1 - p)), "p": p}[transform]
    np.testing.assert_allclose(prm.score([ABC, Partial(Q)]), [expect, 0.0])


def test_prm_min_differs_from_last():
    prm = ProcessRewardModel(FakeScorer(), aggregation="min", transform="p")
    np.testing.assert_allclose(prm.score([Partial(Q, ("c\n", "a\n"))]), [0.2])


def test_logit_transform_clips():
    r = transform_log_p(np.array([-np.inf, 0.0, np.log(0.5)]), "logit")
    np.testing.assert_allclose(r, [math.log(1e-7 / (1 - 1e-7)), -math.log(1e-7 / (1 - 1e-7)), 0.0])


def test_prm_scores_each_prefix_once():
    scorer = FakeScorer()
    prm = ProcessRewardModel(scorer)
    prm.score([Partial(Q, ("a\n",)), Partial(Q, ("a\n",))])
    prm.score([Partial(Q, ("a\n", "b\n")), Partial(Q, ("a\n", "b\n")), Partial(Q, ("a\n", "c\n"))])
    prm.score([Partial(Q, ("b\n",)), Partial(Q, ("b\n", "c\n"))])  # nested: one request
    prm.configured(aggregation="prod").score([ABC])
    assert scorer.requests == [
        (Q, ("a\n",), 0),
        (Q, ("a\n", "b\n"), 1), (Q, ("a\n", "c\n"), 1),
        (Q, ("b\n", "c\n"), 0),
        (Q, ("a\n", "b\n", "c\n"), 2),
    ]
    prm.clear_cache()
    prm.score([ABC])
    assert scorer.requests[-1] == (Q, ABC.steps, 0)


def test_prm_contract_and_errors():
    prm = ProcessRewardModel(FakeScorer(), aggregation="prod")
    xs = [ABC, Partial(Q, ("b\n",)), Partial(Q)]
    check_potential(prm, xs, prefixes=step_prefixes)
    with pytest.raises(ValueError, match="aggregation"):
        ProcessRewardModel(FakeScorer(), aggregation="mean")
    with pytest.raises(TypeError, match="Partial"):
        prm.score(["a string"])
    wrong = ProcessRewardModel(lambda reqs: [np.zeros(5) for _ in reqs])
    with pytest.raises(PotentialError, match="5 scores for 3 new steps"):
        wrong.score([ABC])


@pytest.mark.parametrize("bad, step", [(2.0, 1), (-0.5, 0), (float("nan"), 2), (1.5, 2)])
def test_prm_refuses_step_scores_outside_0_1(bad, step):
    table = dict(P_STEP)
    table[ABC.steps[step]] = bad
    prm = ProcessRewardModel(FakeScorer(table))
    with pytest.raises(PotentialError, match=rf"p = {bad!r} for step {step} \(0-based\).*\[0, 1\]"):
        prm.score([ABC])
    fn = ProcessRewardModel.from_function(lambda prompt, steps: [0.5] * (len(steps) - 1) + [bad], name="checker")
    with pytest.raises(PotentialError, match=rf"checker.*p = {bad!r} for step 1"):
        fn.score([Partial(Q, ("a\n", "b\n"))])


def test_prm_clips_float_rounding_and_keeps_0_and_1():
    prm = ProcessRewardModel(FakeScorer({"a\n": 1.0 + 1e-9, "b\n": -1e-9, "c\n": 1.0}), transform="log")
    r = prm.score([Partial(Q, ("a\n",)), Partial(Q, ("b\n",)), Partial(Q, ("c\n",))])
    assert r[0] == 0.0 and r[1] == -np.inf and r[2] == 0.0  # log 1 = 0 (never > 0), log 0 = -inf: rejected


# --- tiny random Hugging Face PRMs, saved and loaded through from_pretrained ------

def _tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = "0123456789+-=:QA\n abc?"
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<extra_0>"] + list(chars))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                   additional_special_tokens=["<extra_0>"])


def _save_tiny(path, cls_name, pad_token_id=0, num_labels=2):
    import transformers

    tok = _tokenizer()
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
        num_labels=num_labels, pad_token_id=pad_token_id, architectures=[cls_name])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(transformers, cls_name)(cfg).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("prms")
    specs = {"token": ("LlamaForTokenClassification", 0), "seq": ("LlamaForSequenceClassification", 0),
             "seq_nopad": ("LlamaForSequenceClassification", None), "lm": ("LlamaForCausalLM", 0)}
    return {k: (root / k, *_save_tiny(root / k, cls, pad)) for k, (cls, pad) in specs.items()}


XS = [Partial(Q, ("1+2=3\n",)), Partial(Q, ("1+2=3\n", "A:3\n")), Partial(Q, ("1+2=4\n", "A:4\n", "c\n")),
      Partial(Q)]


def _probs(logits):
    return torch.softmax(logits.float(), -1)[..., 1].numpy()


@contextlib.contextmanager
def counting_forwards(model):
    """The batch size of every forward call of ``model`` (a list, filled while inside)."""
    rows = []
    handle = model.register_forward_hook(lambda m, args, kwargs, out: rows.append(kwargs["input_ids"].shape[0]),
                                         with_kwargs=True)
    try:
        yield rows
    finally:
        handle.remove()


def _num_tokens(tok, texts):
    return sum(len(tok(t)["input_ids"]) for t in texts)


def test_separator_prm_matches_a_manual_forward(tiny):
    path, model, tok = tiny["token"]
    prm = ProcessRewardModel.from_pretrained(path, aggregation="min", transform="p")
    assert prm.scorer.mode == "separator"
    text = Q.rstrip("\n") + "\n1+2=4<extra_0>A:4<extra_0>c<extra_0>"
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    expect = _probs(logits[ids[0] == tok.convert_tokens_to_ids("<extra_0>")])
    np.testing.assert_allclose(prm.step_scores([XS[2]])[0], expect, rtol=1e-5)
    np.testing.assert_allclose(prm.score([XS[2]]), [expect.min()], rtol=1e-5)
    check_potential(prm, XS, prefixes=step_prefixes, atol=1e-5, rtol=1e-5)


def test_separator_prm_scores_new_prefixes_only(tiny):
    prm = ProcessRewardModel.from_pretrained(tiny["token"][0])
    scorer = prm.scorer
    texts = [scorer.format(x.prompt, x.steps) for x in XS[:3]]
    with counting_forwards(scorer.model) as rows, recording() as ledger:
        prm.score(XS[:1] * 3)
        assert sum(rows) == 1
        assert (ledger.reward_calls, ledger.reward_tokens) == (3, _num_tokens(scorer.tokenizer, texts[:1]))
        prm.score(XS)
        assert sum(rows) == 3  # the 2- and 3-step prefixes; 0 steps needs no model
        prm.score(XS)
        assert (sum(rows), len(rows)) == (3, 2)
    # the tokens the model read, padding excluded (the second forward pads the shorter text); the
    # 2-step text extends the stored 1-step one, so only its new tokens are fed (KV reuse)
    assert ledger.reward_tokens == _num_tokens(scorer.tokenizer, texts) - _num_tokens(scorer.tokenizer, texts[:1])
    assert ledger.reward_calls == 3 + 4 + 4
    assert (ledger.tokens, ledger.forward_passes) == (0, 0)  # a reward model's compute is its own


def test_model_aggregation_reads_the_completion_as_one_step(tiny):
    path, model, tok = tiny["token"]
    prm = ProcessRewardModel.from_pretrained(path, aggregation="model", transform="log")
    ids = torch.tensor([tok(Q.rstrip("\n") + "\n" + XS[1].completion.strip() + "<extra_0>")["input_ids"]])
    with torch.no_grad():
        expect = np.log(_probs(model(input_ids=ids).logits[0, -1]))
    np.testing.assert_allclose(prm.score(XS[1:2]), [expect], rtol=1e-5)


def test_lm_head_prm_with_candidate_tokens(tiny):
    path, model, tok = tiny["lm"]
    prm = ProcessRewardModel.from_pretrained(path, candidate_tokens=("a", "b"), transform="p")
    ids = torch.tensor([tok(Q.rstrip("\n") + "\n1+2=3<extra_0>")["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    a, b = tok.convert_tokens_to_ids(["a", "b"])
    expect = torch.softmax(logits[[a, b]], -1)[0].item()
    np.testing.assert_allclose(prm.score(XS[:1]), [expect], rtol=1e-5)


@pytest.mark.parametrize("which", ["seq", "seq_nopad"])
def test_classifier_prm_scores_each_step_prefix(tiny, which):
    path, model, tok = tiny[which]
    prm = ProcessRewardModel.from_pretrained(path, aggregation="prod", transform="log")
    assert prm.scorer.mode == "classifier"
    x = XS[2]
    expect = []
    for k in range(1, 4):
        ids = torch.tensor([tok(Q + "".join(x.steps[:k]))["input_ids"]])
        with torch.no_grad():
            expect.append(_probs(model(input_ids=ids).logits[0]))
    with counting_forwards(prm.scorer.model) as rows, recording() as ledger:
        np.testing.assert_allclose(prm.step_scores([x])[0], expect, rtol=1e-5)
        np.testing.assert_allclose(prm.score([x]), [np.log(expect).sum()], rtol=1e-5)
        check_potential(prm, XS, prefixes=step_prefixes, atol=1e-5, rtol=1e-5)
    assert sum(rows) == 5  # the 5 distinct step prefixes of XS, once each
    prefixes = {Q + "".join(p.steps[:k]) for p in XS for k in range(1, len(p.steps) + 1)}
    assert len(prefixes) == 5 and ledger.reward_tokens == _num_tokens(tok, prefixes)
    if which == "seq_nopad":  # loaded with the tokenizer's pad id; without one, one text per forward
        assert prm.scorer.model.config.pad_token_id == tok.pad_token_id
        model.config.pad_token_id = None
        bare = ProcessRewardModel(HFStepScorer(model, tok, mode="classifier"), aggregation="prod")
        with counting_forwards(model) as rows, recording() as ledger:
            np.testing.assert_allclose(bare.score(XS), prm.score(XS), rtol=1e-5)
        assert len(rows) == 5 and ledger.reward_tokens == _num_tokens(tok, prefixes)


def test_separator_format_uses_the_chat_template(tiny):
    _, model, tok = tiny["token"]
    tok = _tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}")
    scorer = HFStepScorer(model, tok, mode="separator", system_prompt="be good")
    assert scorer.format("Q?", ["a\n\n", " b\n\n"]) == \
        "<system>be good\n<user>Q?\n<assistant>a<extra_0>b<extra_0>\n"
    plain = HFStepScorer(model, _tokenizer(), mode="separator")
    assert plain.format("Q?\n", ["a\n\n", "b\n"]) == "Q?\na<extra_0>b<extra_0>"


def test_prm_nan_names_model_and_step(tiny):
    prm = ProcessRewardModel.from_pretrained(tiny["token"][0])
    with torch.no_grad():
        prm.scorer.model.score.weight.fill_(float("nan"))
    with pytest.raises(PotentialError, match=r"PRM token returned NaN at step 0"):
        prm.score(XS[:1])


def test_prm_bad_inputs(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ProcessRewardModel.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a single token"):
        ProcessRewardModel.from_pretrained(tiny["token"][0], separator="<step>")
    prm = ProcessRewardModel.from_pretrained(tiny["token"][0])
    with pytest.raises(ValueError, match="must not contain the separator"):
        prm.score([Partial(Q, ("1<extra_0>2\n",))])


@pytest.mark.parametrize("which", ["token", "seq"])
def test_prm_refuses_a_prefix_longer_than_its_context(tiny, which):
    from ppl_scaling.models.lm import ContextLengthError

    prm = ProcessRewardModel.from_pretrained(tiny[which][0])
    assert prm.scorer.context_length == 128            # the config's max_position_embeddings
    long_step = "1+2=3\n" * 30                         # 180 characters, one token each
    xs = [Partial(Q, ("1+2=3\n", long_step))]
    with pytest.raises(ContextLengthError, match=r"PRM (token|seq): the prefix ending at step 1 \(0-based\) "
                                                 r"of the prompt 'Q:1\+2\\n' is 1\d\d tokens long, over the "
                                                 r"model's context length of 128 tokens") as err:
        prm.score(xs)
    assert err.value.limit == 128 and err.value.length > 128 and isinstance(err.value, ValueError)
    short = ProcessRewardModel(HFStepScorer(prm.scorer.model, prm.scorer.tokenizer, mode=prm.scorer.mode,
                                            context_length=8), aggregation="last")
    with pytest.raises(ContextLengthError, match="context length of 8 tokens"):
        short.score(XS[:1])
    assert np.isfinite(prm.score(XS[:2])).all()         # ordinary prefixes still score


def test_toy_prm_loads_and_scores():
    """The bundled learned toy PRM through the classifier-head path (its quality is
    measured by scripts/train_toy_prm.py, not here)."""
    from ppl_scaling.models import toy

    if not (toy.TOY_PRM_PATH / "model.safetensors").exists():
        pytest.skip("toy PRM not trained yet (make toy-models)")
    check_toy_prm(toy.TOY_PRM_PATH)


def check_toy_prm(path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    prm = ProcessRewardModel.from_pretrained(path, aggregation="last", transform="p")
    assert prm.scorer.mode == "classifier"
    q = "Q:24+5-4\n"
    xs = [Partial(q, ("24+5=29\n", "29-4=25\n", "A:25\n")), Partial(q, ("24+5=31\n", "31-4=27\n")),
          Partial(q, ("24+5=29\n",)), Partial(q)]
    p = prm.score(xs)
    assert ((p[:3] > 0) & (p[:3] < 1)).all() and p[3] == 0.0
    model, tok = AutoModelForSequenceClassification.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        manual = [torch.softmax(model(**tok(x.text, return_tensors="pt")).logits[0], -1)[1].item() for x in xs[:3]]
    np.testing.assert_allclose(p[:3], manual, rtol=1e-5)
    check_potential(prm, xs, prefixes=step_prefixes, atol=1e-5, rtol=1e-5)


def test_exact_step_checker_as_a_prm():
    from ppl_scaling.models import toy

    prm = ProcessRewardModel.from_function(toy.step_correctness, aggregation="last", transform="log")
    q = "Q:24+5-4\n"
    good = Partial(q, ("24+5=29\n", "29-4=25\n", "A:25\n"))
    bad = Partial(q, ("24+5=31\n", "31-4=27\n"))
    np.testing.assert_array_equal(prm.score([good, bad, Partial(q, good.steps[:1])]), [0.0, -np.inf, 0.0])
    check_potential(prm, [good, bad], prefixes=step_prefixes)  # a wrong step stays rejected
    with pytest.raises(PotentialError, match="one probability per step"):
        ProcessRewardModel.from_function(lambda prompt, steps: [1.0]).score([good])


# --- outcome rewards, verifiers, judges, products --------------------------------

def test_outcome_reward_model_scores_finished_only():
    orm = OutcomeRewardModel(ProcessRewardModel(FakeScorer(), aggregation="model"))
    np.testing.assert_allclose(orm.score([ABC, ABC], np.array([False, True])), [0.0, math.log(0.3)])
    fn_orm = OutcomeRewardModel(lambda xs: [len(x.steps) for x in xs])
    np.testing.assert_array_equal(fn_orm.score([ABC], True), [3.0])


def test_verifier():
    has_answer = Verifier(lambda s: extract_answer(s) is not None)
    done = Partial(Q, ("1+2=3\n", "A:3\n"))
    open_ = Partial(Q, ("1+2=3\n",))
    np.testing.assert_array_equal(has_answer.score([done, open_], True), [0.0, -np.inf])
    np.testing.assert_array_equal(has_answer.score([done, open_], False), [0.0, 0.0])
    soft = Verifier(lambda s: "A:" in s, penalty=-2.0, on_prefix=True)
    np.testing.assert_array_equal(soft.score([done, open_]), [0.0, -2.0])
    length = Verifier(lambda s: -0.1 * len(s), text="full")
    np.testing.assert_allclose(length.score([open_], True), [-0.1 * len(open_.text)])
    with pytest.raises(ValueError, match="penalty"):
        Verifier(bool, penalty=math.inf)
    correct = Verifier(lambda s: is_equivalent(extract_answer(s), "3"))
    check_potential(correct, [done, open_, Partial(Q, ("A:4\n",))], prefixes=step_prefixes)


class CharLM:
    """A fake language model over characters: log p(next | context) depends on the
    last character only (a fixed random bigram table)."""

    def __init__(self, bos=True, records=True):
        self.records = records
        self.vocab = sorted(set("QA:0123456789+-=\n? YesNoIthiscr.uwvab")) + ["<bos>"]
        self.bos = bos
        rng = np.random.default_rng(0)
        V = len(self.vocab)
        self.table = torch.log_softmax(torch.tensor(rng.normal(size=(V, V))), -1)
        self.calls = 0

    def encode(self, text):
        return [self.vocab.index("<bos>")] * self.bos + [self.vocab.index(c) for c in text]

    def next_token_logprobs(self, contexts):
        self.calls += 1
        if self.records:  # as a backend does
            record(forward_passes=1, prefill_tokens=sum(len(c) for c in contexts))
        return self.table[[c[-1] for c in contexts]]


@pytest.mark.parametrize("records", [True, False])
def test_llm_judge_yes_probability(records):
    lm = CharLM(records=records)
    judge = LLMJudge(lm, template="{prompt}{completion}Is this correct?", no=None)
    x = Partial(Q, ("1+2=3\n",))
    ids = lm.encode(judge.template.format(prompt=Q, completion=x.completion) + "Yes")
    n_ctx = len(ids) - 3
    expect = sum(lm.table[ids[j - 1], ids[j]].item() for j in range(n_ctx, len(ids)))
    np.testing.assert_allclose(judge.score([x], True), [expect])
    np.testing.assert_array_equal(judge.score([x], False), [0.0])
    # normalised against "No": log P(Yes) - log(P(Yes) + P(No))
    ids_no = lm.encode(judge.template.format(prompt=Q, completion=x.completion) + "No")
    lp_no = sum(lm.table[ids_no[j - 1], ids_no[j]].item() for j in range(n_ctx, len(ids_no)))
    norm = LLMJudge(lm, template=judge.template)
    calls = lm.calls
    with recording() as ledger:
        np.testing.assert_allclose(norm.score([x, x], True), [expect - np.logaddexp(expect, lp_no)] * 2)
    # the judge's work is counted once (by its language model, or by the judge if the model
    # records nothing): 2 forwards (Yes, No) over the contexts of the 3 + 2 answer tokens,
    # and the 2 reward calls
    contexts = (n_ctx + n_ctx + 1 + n_ctx + 2) + (n_ctx + n_ctx + 1)
    spent = {k: v for k, v in ledger.as_dict().items() if v and k != "wall_s"}
    assert lm.calls - calls == 2
    assert spent == {"forward_passes": 2, "prefill_tokens": contexts, "reward_calls": 2}
    calls = lm.calls
    norm.score([x], True)
    assert lm.calls == calls  # cached by text
    check_potential(norm, [x, ABC], finished=np.array([True, True]))


def test_products_and_tempering_of_reward_models():
    prm = ProcessRewardModel(FakeScorer(), aggregation="prod")
    ver = Verifier(lambda s: s.endswith("c\n"))
    combo = prm ** 0.5 * ver
    xs = [ABC, Partial(Q, ("a\n", "b\n"))]
    np.testing.assert_allclose(combo.score(xs, True), [0.5 * math.log(0.09), -np.inf])
    np.testing.assert_allclose(combo.score(xs, False), [0.5 * math.log(0.09), 0.5 * math.log(0.45)])
    assert isinstance(combo, Potential)
    check_potential(combo, xs, prefixes=step_prefixes)


# --- the PF paper's tilt drives a StepModel to the odds-tilted target ----------------

BIGRAM = np.array([[0.0, 0.5, 0.3, 0.2],   # rows: previous token ^ a b EOS; columns: next token
                   [0.0, 0.3, 0.4, 0.3],
                   [0.0, 0.6, 0.15, 0.25],
                   [0.25, 0.25, 0.25, 0.25]])


def _bigram_lm():
    from ppl_scaling.models.lm import LanguageModel

    class Bigram(LanguageModel):
        eos_token_id = 3

        def next_token_logprobs(self, contexts):
            return torch.log(torch.as_tensor(BIGRAM[[c[-1] for c in contexts]]))

        def encode(self, text):
            return ["^ab".index(ch) for ch in text]

        def decode(self, ids):
            return "".join("^ab"[i] for i in ids if i in (1, 2))

    return Bigram()


def _bigram_dynamics(T):
    """One token per step after the prompt "^", at most T steps: pure dynamics."""
    return StepModel(_bigram_lm(), "^", step_delimiter=None, max_steps=T)


def _p_good(text):  # a PRM that likes a's: p = sigmoid(#a - #b - 0.5)
    return 1.0 / (1.0 + math.exp(-(text.count("a") - text.count("b") - 0.5)))


class PrefixScorer:
    name = "prefix"

    def __call__(self, requests):
        return [np.array([_p_good("".join(steps[:j + 1])) for j in range(first, len(steps))])
                for _, steps, first in requests]


def test_paper_tilt_is_the_pf_paper_weighting():
    prm = ProcessRewardModel(FakeScorer(), aggregation="last")
    dynamics = _bigram_dynamics(3)
    fk = paper_tilt(dynamics, prm, softmax_temperature=0.5)
    assert fk.shape == FKShape("last", 2.0) and fk.potential.transform == "logit"
    assert fk.dynamics is dynamics and fk.potential.aggregation == "last"
    assert paper_tilt(dynamics, prm, aggregation="model").potential.aggregation == "model"
    assert fk.potential._cache is prm._cache  # same model, shared scores
    # at an intermediate step the selection probabilities are softmax(logit(p_t) / T)
    xs = [Partial(Q, ("a\n",)), Partial(Q, ("b\n",)), Partial(Q, ("c\n",))]
    r = fk.potential.score(xs)
    logG, acc = fk.shape.step(fk.shape.init(3), r)
    p = np.array([0.9, 0.5, 0.2])
    odds = (p / (1 - p)) ** 2.0
    np.testing.assert_allclose(np.exp(logG) / np.exp(logG).sum(), odds / odds.sum())
    # the final potential makes the product exactly exp(lam * r_final)
    r2 = fk.potential.score([Partial(Q, ("a\n", "b\n"))] * 3)
    logG2, _ = fk.shape.step(acc, r2, final=True)
    np.testing.assert_allclose(logG + logG2, 2.0 * r2)
    with pytest.raises(ValueError, match="temperature"):
        paper_tilt(dynamics, prm, softmax_temperature=0.0)
    assert Tilted(dynamics, prm, shape="max", lam=3.0).shape == FKShape("max", 3.0)


def test_pf_paper_resamples_multinomially_at_every_step():
    dynamics, prm = _bigram_dynamics(3), ProcessRewardModel(PrefixScorer())
    res = pf_paper(dynamics, 64, potential=prm, softmax_temperature=0.5, seed=3)
    assert res.info["ess_threshold"] == 1.0 and res.info["selection"] == "multinomial"
    assert res.resampled.size > 1 and all(res.resampled[1:])
    ref = smc(paper_tilt(dynamics, prm, 0.5), 64, ess_threshold=1.0, resampling="multinomial", seed=3)
    np.testing.assert_array_equal(res.log_weights, ref.log_weights)
    assert res.particles.partials() == ref.particles.partials()
    np.testing.assert_array_equal(res.rewards, ref.particles.reward)  # the paper's final pick reads these


def test_pf_paper_targets_the_odds_tilted_model():
    import itertools

    T, temperature = 3, 0.5
    prm = ProcessRewardModel(PrefixScorer())
    # exact: Z = Σ_x p(x) (p_good(x) / (1 - p_good(x)))^(1/temperature), and E[#a] under the target
    Z, mean_a = 0.0, 0.0
    for k in range(1, T + 1):
        for toks in itertools.product([1, 2, 3], repeat=k):
            if 3 in toks[:-1] or (k < T and toks[-1] != 3):
                continue
            prob = np.prod([BIGRAM[a, b] for a, b in zip((0,) + toks[:-1], toks)])
            text = "".join("^ab"[t] for t in toks if t != 3)
            odds = _p_good(text) / (1 - _p_good(text))
            Z += prob * odds ** (1 / temperature)
            mean_a += prob * odds ** (1 / temperature) * text.count("a")
    mean_a /= Z
    dynamics = _bigram_dynamics(T)
    Zs, means = [], []
    for seed in range(20):
        res = pf_paper(dynamics, 400, potential=prm, softmax_temperature=temperature, seed=seed)
        Zs.append(np.exp(res.log_evidence))
        counts = np.array([p.completion.count("a") for p in res.particles.partials()])
        means.append(float(res.weights @ counts))
    assert all(res.resampled[1:])  # resampling at every step
    se = np.std(Zs, ddof=1) / np.sqrt(len(Zs))
    assert abs(np.mean(Zs) - Z) < 5 * se, (np.mean(Zs), Z, se)   # unbiased evidence
    se = np.std(means, ddof=1) / np.sqrt(len(means))
    assert abs(np.mean(means) - mean_a) < 5 * se, (np.mean(means), mean_a, se)  # bias O(1/N) << se
